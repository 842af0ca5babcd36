"""pixeldit-sample: images from a release folder or a training checkpoint (its consolidated EMA weights).

    pixeldit-sample --model releases/t2i --prompt "a red circle on a white background" --prompt "a blue square" \\
        --num-per-prompt 4 --out samples/ --seed 0
    pixeldit-sample --model runs/imagenet_xl --class-id 207 360 --cfg-scale 3.25 --cfg-interval 0.0 0.9 --steps 100
    pixeldit-sample --model runs/imagenet_xl/checkpoints/step_00400000 --class-id 1 --sampler heun --steps 50

``--model``: a release folder (config.json), a training run folder (uses checkpoints/latest) or a step
folder. Sampler, steps, CFG scale/interval and time shift default to the release config (for a training
checkpoint: the paper's defaults with the stage's shift). Writes one PNG per image, ``grid.png`` (one row
per prompt / class id) and ``prompts.json`` ([{file, prompt | class_id, seed}]). Seed-reproducible: image i
starts from noise drawn on the CPU with seed + i, whatever the batch size or device.

Text-to-image models: the text encoder is the one named in the model's config (a local folder or a Hugging
Face cache entry; for a training checkpoint, the folder the run used), or ``--text-encoder PATH``.
A user error is one line and exit code 2; --traceback (or PIXELDIT_TRACEBACK=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from pixeldit import run_folder
from pixeldit.diffusion import generate, image_grid, to_uint8
from pixeldit.errors import CheckpointError, CliParser, ConfigError, cli_main
from pixeldit.models import PixelDiT

from .config import CONFIG_FILE, DTYPES, ReleaseConfig, add_sampler_flags, sampler_flags
from .export import load_training_model
from .reader import from_pretrained, load_text_encoder

PROG = "pixeldit-sample"


def load_any(path: str, device: str = "cpu") -> tuple[PixelDiT, ReleaseConfig, str]:
    """(model, config, text encoder folder) of a release folder, or of a training run / step folder (its
    consolidated EMA weights; the text encoder folder the run used, where it exists here; else '')."""
    folder = Path(path)
    if (folder / CONFIG_FILE).exists():
        return (*from_pretrained(path, device=device), "")
    markers = (run_folder.META, run_folder.LATEST, f"{run_folder.CHECKPOINTS}/{run_folder.LATEST}")
    if not any((folder / m).exists() for m in markers):
        raise CheckpointError(f"--model {path}: not a release folder ({CONFIG_FILE}), a training run folder "
                              f"({run_folder.CHECKPOINTS}/{run_folder.LATEST}) or a checkpoint step folder "
                              f"({run_folder.META}); pass one of those")
    step_dir = run_folder.resolve_checkpoint(folder)
    model, cfg = load_training_model(step_dir, "ema", device)
    trained_with = run_folder.read_meta(step_dir).get("text_encoder", "")
    return model, cfg, trained_with if trained_with and os.path.isdir(trained_with) else ""


def build_conditions(model: PixelDiT, cfg: ReleaseConfig, a: argparse.Namespace, device: str,
                     text_encoder_path: str = ""):
    """(cond, null_cond, labels): the model's condition kwargs for every image to generate, and their labels."""
    args = model.args
    if args.conditioning == "class":
        if not a.class_id or a.prompt:
            raise ConfigError(f"{args.name} is a class-conditional model: pass --class-id (not --prompt)")
        bad = [c for c in a.class_id if not 0 <= c < args.num_classes]
        if bad:
            raise ConfigError(f"--class-id {bad}: outside the model's classes 0..{args.num_classes - 1}")
        ids = [c for c in a.class_id for _ in range(a.num_per_prompt)]
        y = torch.tensor(ids, device=device)
        return {"y": y}, model.null_condition(len(ids), device), [{"class_id": c} for c in ids]
    if not a.prompt or a.class_id:
        raise ConfigError(f"{args.name} is a text-to-image model: pass --prompt or --prompts-file (not --class-id)")
    encoder = load_text_encoder(cfg, a.text_encoder or text_encoder_path or None, device)
    prompts = [p for p in a.prompt for _ in range(a.num_per_prompt)]
    emb, mask = encoder.encode(prompts)  # (N, T, C), (N, T)
    null_emb, null_mask = encoder.encode_null(len(prompts))
    return ({"context": emb, "context_mask": mask}, {"context": null_emb, "context_mask": null_mask},
            [{"prompt": p} for p in prompts])


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="release folder, or training run / step folder")
    ap.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    ap.add_argument("--prompts-file", help="text file, one prompt per line")
    ap.add_argument("--class-id", type=int, nargs="+", default=[], help="class ids (class-conditional models)")
    ap.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt / class id")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=None, help="default: the training resolution")
    ap.add_argument("--width", type=int, default=None, help="default: --height")
    add_sampler_flags(ap)
    ap.add_argument("--text-encoder", default="", metavar="PATH",
                    help="local folder of the text encoder (default: the one named in the model's config)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=list(DTYPES), default="fp32", help="bf16: autocast (GPU)")
    return ap


@torch.no_grad()
def run(argv: list[str]) -> None:
    """The command itself; raises on user errors (``main`` turns them into one line and exit code 2)."""
    a = build_parser().parse_args(argv)
    if a.prompts_file:
        a.prompt += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    if a.num_per_prompt < 1 or a.batch_size < 1:
        raise ConfigError("--num-per-prompt and --batch-size must be >= 1")
    model, cfg, text_encoder_path = load_any(a.model, a.device)
    kw = cfg.sampler.override(**sampler_flags(a)).generate_kwargs()
    h = a.height or cfg.resolution
    w = a.width or h
    p = model.args.patch_size
    if h % p or w % p:
        raise ConfigError(f"--height/--width must be multiples of the patch size {p}, got {h}x{w}")
    cond, null_cond, labels = build_conditions(model, cfg, a, a.device, text_encoder_path)
    n = len(labels)
    noise = torch.stack([torch.randn(3, h, w, generator=torch.Generator().manual_seed(a.seed + i)) for i in range(n)])
    autocast = (torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16) if a.precision == "bf16"
                else contextlib.nullcontext())
    chunks = []
    for s in tqdm(range(0, n, a.batch_size), desc="batches", disable=n <= a.batch_size):
        sl = slice(s, s + a.batch_size)
        with autocast:
            x = generate(model, {k: v[sl] for k, v in cond.items()}, {k: v[sl] for k, v in null_cond.items()},
                         noise=noise[sl].to(a.device), progress=True, **kw)  # (b, 3, H, W)
        chunks.append(x.float().cpu())
    samples = torch.cat(chunks)  # (n, 3, H, W) in [-1, 1]
    images = to_uint8(samples)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f"{i:04d}.png"
        Image.fromarray(img).save(out_dir / name)
        entries.append({"file": name, **label, "seed": a.seed + i})
    nrow = a.num_per_prompt if a.num_per_prompt > 1 else math.ceil(math.sqrt(n))
    Image.fromarray(to_uint8(image_grid(samples, nrow)[None])[0]).save(out_dir / "grid.png")
    (out_dir / "prompts.json").write_text(json.dumps(entries, indent=1))
    print(f"{n} images ({h}x{w}, {kw['sampler']}, {kw['steps']} steps, CFG {kw['cfg_scale']} on "
          f"{list(kw['cfg_interval'])}, shift {kw['shift']}) -> {out_dir}; grid: {out_dir / 'grid.png'}")


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
