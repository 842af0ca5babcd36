"""pixeldit-sample: images from a release folder or a training checkpoint (its consolidated EMA weights).

    pixeldit-sample --model releases/t2i --prompt "a red circle on a white background" --prompt "a blue square" \\
        --num-per-prompt 4 --out samples/ --seed 0
    pixeldit-sample --model runs/imagenet_xl --class-id 207 360 --cfg-scale 3.25 --cfg-interval 0.1 1.0 --steps 100
    pixeldit-sample --model runs/imagenet_xl/checkpoints/step_00400000 --class-id 1 --sampler heun --steps 50

``--model``: a release folder (config.json), a training run folder (uses checkpoints/latest) or a step
folder. Sampler, steps, CFG scale/interval and time shift default to the release config (for a training
checkpoint: the paper's defaults with the stage's shift). Writes one PNG per image, ``grid.png`` (one row
per prompt / class id) and ``prompts.json`` ([{file, prompt | class_id, seed}]). Seed-reproducible: image i
starts from noise drawn on the CPU with seed + i, whatever the batch size or device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pixeldit.diffusion import SAMPLERS, TextEncoder, generate, image_grid
from pixeldit.models import PixelDiT
from pixeldit.release import CONFIG_FILE, ReleaseConfig, from_pretrained


def load_any(path: str, device: str = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """A release folder, or a training run/step folder (consolidated EMA weights)."""
    if (Path(path) / CONFIG_FILE).exists():
        return from_pretrained(path, device=device)
    from pixeldit.train.export import load_training_model  # deepspeed is only needed for training checkpoints

    return load_training_model(path, "ema", device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (same rounding as the trainer's preview grids)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def build_conditions(model: PixelDiT, cfg: ReleaseConfig, a: argparse.Namespace, device: str):
    """(cond, null_cond, labels): the model's condition kwargs for every image to generate, and their labels."""
    args = model.args
    if args.conditioning == "class":
        if not a.class_id or a.prompt:
            raise SystemExit(f"{args.name} is a class-conditional model: pass --class-id (not --prompt)")
        bad = [c for c in a.class_id if not 0 <= c < args.num_classes]
        if bad:
            raise SystemExit(f"class ids {bad} outside 0..{args.num_classes - 1}")
        ids = [c for c in a.class_id for _ in range(a.num_per_prompt)]
        y = torch.tensor(ids, device=device)
        return {"y": y}, model.null_condition(len(ids), device), [{"class_id": c} for c in ids]
    if not a.prompt or a.class_id:
        raise SystemExit(f"{args.name} is a text-to-image model: pass --prompt or --prompts-file (not --class-id)")
    enc_path = a.text_encoder or cfg.text_encoder
    if not enc_path:
        raise SystemExit("no text encoder: the model's config names none; pass --text-encoder PATH")
    encoder = TextEncoder.from_pretrained(enc_path, system_prompt=cfg.system_prompt, max_length=args.text_len,
                                          device=device, keep_padding_states=args.text_padding == "unmasked")
    if encoder.dim != args.text_dim:
        raise SystemExit(f"text encoder {enc_path} has width {encoder.dim}, the model expects {args.text_dim}")
    prompts = [p for p in a.prompt for _ in range(a.num_per_prompt)]
    emb, mask = encoder.encode(prompts)  # (N, T, C), (N, T)
    null_emb, null_mask = encoder.encode_null(len(prompts))
    return ({"context": emb, "context_mask": mask}, {"context": null_emb, "context_mask": null_mask},
            [{"prompt": p} for p in prompts])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pixeldit-sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="release folder, or training run / step folder")
    ap.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    ap.add_argument("--prompts-file", help="text file, one prompt per line")
    ap.add_argument("--class-id", type=int, nargs="+", default=[], help="class ids (class-conditional models)")
    ap.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt / class id")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=None, help="default: the training resolution")
    ap.add_argument("--width", type=int, default=None, help="default: --height")
    ap.add_argument("--sampler", choices=list(SAMPLERS), default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg-scale", type=float, default=None, help="1 disables guidance")
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                    help="apply CFG for t in [T_LO, T_HI] (t = 1 is noise)")
    ap.add_argument("--shift", type=float, default=None, help="time-grid shift")
    ap.add_argument("--text-encoder", default="", help="override the text encoder path of the model config")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (GPU)")
    return ap


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.prompts_file:
        a.prompt += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    if a.num_per_prompt < 1 or a.batch_size < 1:
        raise SystemExit("--num-per-prompt and --batch-size must be >= 1")
    model, cfg = load_any(a.model, a.device)
    d = cfg.sampler
    kw = {"sampler": a.sampler or d.sampler, "steps": a.steps or d.steps,
          "cfg_scale": d.cfg_scale if a.cfg_scale is None else a.cfg_scale,
          "cfg_interval": tuple(a.cfg_interval) if a.cfg_interval else tuple(d.cfg_interval),
          "shift": d.shift if a.shift is None else a.shift}
    h = a.height or cfg.resolution
    w = a.width or h
    p = model.args.patch_size
    if h % p or w % p:
        raise SystemExit(f"height and width must be multiples of the patch size {p}, got {h}x{w}")
    cond, null_cond, labels = build_conditions(model, cfg, a, a.device)
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


if __name__ == "__main__":
    main()
