"""pixeldit-eval: evaluate a release, training run or step folder under a pinned protocol.

    pixeldit-eval releases/xl --classes 0-999 --images-per-prompt 50 --metrics fid fd_dinov2 \\
        --reference /data/imagenet-val --inception weights/inception-2015-12-05.pt --dinov2 weights/dinov2-large \\
        --sampler flow_unipc --steps 32 --cfg-scale 3.25 --cfg-interval 0.0 0.9 --out evals/xl
    pixeldit-eval runs/t2i --prompts prompts.txt --metrics clip_score --clip weights/clip-vit-large-patch14 --out e/
    pixeldit-eval releases/t2i --geneval geneval/prompts/evaluation_metadata.jsonl --images-per-prompt 4 --out e/
    pixeldit-eval releases/t2i --dpg-bench ELLA/dpg_bench/prompts --images-per-prompt 4 --out e/

Exactly one prompt set: --prompts FILE (.txt or .jsonl), --classes IDS ("0-999", "1,5,7"), --geneval FILE
(GenEval's evaluation_metadata.jsonl) or --dpg-bench DIR (DPG-Bench's prompts folder). Sampling flags
default to the model's release defaults and the training resolution; the resolved protocol is recorded in
{out}/results.json with the metrics, the extractors' weight fingerprints and the reference statistics used.
Reference statistics are computed once per dataset root and cached in {reference}/eval_stats (--stats-cache
elsewhere). For a release folder the results are also added as a table to its README.md (--no-model-card:
not). Mistakes in the arguments end with one line naming the culprit and exit code 2 (--traceback, or
PIXELDIT_TRACEBACK=1, shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os

from pixeldit.diffusion.samplers import SAMPLERS
from pixeldit.errors import CliParser, cli_main

from .protocol import METRICS, PRECISIONS, EvalProtocol, EvalResources

PROG = "pixeldit-eval"


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="release folder, training run folder (checkpoints/latest) or step folder")
    ap.add_argument("--out", required=True, help="output folder (images, results.json)")
    sets = ap.add_mutually_exclusive_group(required=True)
    sets.add_argument("--prompts", help="prompt file: .txt (one per line) or .jsonl ({\"prompt\", \"id\"})")
    sets.add_argument("--classes", help="class ids, e.g. 0-999 or 1,5,7")
    sets.add_argument("--geneval", help="GenEval's evaluation_metadata.jsonl (your copy)")
    sets.add_argument("--dpg-bench", help="DPG-Bench's prompts folder (your copy)")
    g = ap.add_argument_group("protocol (recorded with the results)")
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the release's")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--cfg-scale", type=float, default=None)
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"))
    g.add_argument("--shift", type=float, default=None)
    g.add_argument("--seed", type=int, default=0, help="image j of prompt i: seed + i * images_per_prompt + j")
    g.add_argument("--resolution", type=int, default=None, help="square images; default: the training resolution")
    g.add_argument("--metrics", nargs="*", choices=METRICS, default=[])
    g.add_argument("--reference", default="", help="dataset root or image folder for fid / fd_dinov2")
    g.add_argument("--reference-images", type=int, default=50_000)
    r = ap.add_argument_group("resources (do not change the numbers)")
    r.add_argument("--inception", default="", help="inception-2015-12-05.pt (clean-fid's FID Inception) or its folder")
    r.add_argument("--dinov2", default="", help="transformers DINOv2 folder (FD-DINOv2)")
    r.add_argument("--clip", default="", help="transformers CLIP folder (CLIP score)")
    r.add_argument("--text-encoder", default="", help="override the model config's text encoder folder")
    r.add_argument("--stats-cache", default="", help="reference statistics folder (default {reference}/eval_stats)")
    r.add_argument("--device", default=EvalResources.device)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast (GPU)")
    r.add_argument("--workers", type=int, default=2, help="reference image decoding processes")
    r.add_argument("--no-save-images", action="store_true", help="prompt files / class ids: keep no PNGs")
    r.add_argument("--no-model-card", action="store_true", help="do not add the results to a release's README.md")
    return ap


def protocol_from_args(a: argparse.Namespace) -> EvalProtocol:
    kind, source = next((k, v) for k, v in (("prompts", a.prompts), ("classes", a.classes), ("geneval", a.geneval),
                                            ("dpg_bench", a.dpg_bench)) if v is not None)
    return EvalProtocol(prompts=kind, source=source, images_per_prompt=a.images_per_prompt, sampler=a.sampler,
                        steps=a.steps, cfg_scale=a.cfg_scale,
                        cfg_interval=tuple(a.cfg_interval) if a.cfg_interval else None, shift=a.shift, seed=a.seed,
                        resolution=a.resolution, metrics=tuple(a.metrics), reference=a.reference,
                        reference_images=a.reference_images)


def resources_from_args(a: argparse.Namespace) -> EvalResources:
    return EvalResources(inception=a.inception, dinov2=a.dinov2, clip=a.clip, text_encoder=a.text_encoder,
                         stats_cache=a.stats_cache, device=a.device, batch_size=a.batch_size, precision=a.precision,
                         workers=a.workers, save_images=not a.no_save_images, model_card=not a.no_model_card)


def run(argv: list[str]) -> None:
    a = build_parser().parse_args(argv)
    from .run import run_eval  # torch, transformers: after argument parsing

    result = run_eval(a.target, protocol_from_args(a), a.out, resources_from_args(a), progress=True)
    print(json.dumps({"metrics": result["metrics"], "images": result["num_images"], "sampling": result["sampling"],
                      "results": os.path.join(a.out, "results.json"),
                      **({"model_card": result["model_card"]} if "model_card" in result else {})}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """pixeldit-eval; user errors: one line, exit code 2 (``pixeldit.errors.cli_main``)."""
    return cli_main(PROG, run, argv)
