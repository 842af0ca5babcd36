"""pixeldit-sample: images from a release folder or a training checkpoint (EMA weights).

    pixeldit-sample --model releases/t2i --prompt "a red circle on a white background" --prompt "a blue square" \\
        --num-per-prompt 4 --out samples/ --seed 0
    pixeldit-sample --model runs/imagenet_xl --class-id 207 360 --cfg-scale 3.25 --cfg-interval 0.1 1.0 --steps 100

Writes one PNG per image, ``grid.png`` and ``prompts.json`` ([{file, prompt|class_id, seed}]). The same
seed gives the same images: image i starts from noise drawn with seed + i.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixeldit.diffusion import SAMPLERS, TextEncoder, generate
from pixeldit.models import PixelDiT, build_model
from pixeldit.release import CONFIG_FILE, ReleaseConfig, SamplerDefaults, from_pretrained


def load_any(path: str, device: str = "cpu") -> tuple[PixelDiT, ReleaseConfig]:
    """A release folder, or a training run/step folder (consolidated EMA weights)."""
    if (Path(path) / CONFIG_FILE).exists():
        return from_pretrained(path, device=device)
    from pixeldit.models import ModelArgs
    from pixeldit.train.checkpoint import read_meta
    from pixeldit.train.ema import consolidate_ema
    from pixeldit.train.export import resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    model = build_model(ModelArgs.from_dict(meta["model_args"]))
    model.load_state_dict(consolidate_ema(step_dir), strict=True)
    cfg = ReleaseConfig(model_args=meta["model_args"], resolution=meta.get("resolution", 256),
                        stage=meta.get("stage_name", ""), step=meta["step"], weights="ema", dtype="fp32",
                        text_encoder=meta.get("text_encoder", ""), system_prompt=meta.get("system_prompt", ""),
                        sampler=SamplerDefaults(shift=float(meta.get("shift", 1.0))))
    return model.to(device).eval(), cfg


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, nrow: int) -> None:
    n, h, w, _ = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * h, nrow * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    Image.fromarray(grid).save(path)


def build_conditions(model: PixelDiT, cfg: ReleaseConfig, a: argparse.Namespace, device: str):
    """(cond, null_cond, labels) for every image to generate."""
    args = model.args
    if args.conditioning == "class":
        if not a.class_id:
            raise SystemExit("this is a class-conditional model: pass --class-id")
        bad = [c for c in a.class_id if not 0 <= c < args.num_classes]
        if bad:
            raise SystemExit(f"class ids {bad} outside 0..{args.num_classes - 1}")
        ids = [c for c in a.class_id for _ in range(a.num_per_prompt)]
        y = torch.tensor(ids, device=device)
        return {"y": y}, model.null_condition(len(ids), device), [{"class_id": c} for c in ids]
    if not a.prompt:
        raise SystemExit("this is a text-to-image model: pass --prompt")
    enc_path = a.text_encoder or cfg.text_encoder
    if not enc_path:
        raise SystemExit("no text encoder: the model's config names none; pass --text-encoder PATH")
    encoder = TextEncoder.from_pretrained(enc_path, system_prompt=cfg.system_prompt, max_length=args.text_len,
                                          device=device)
    prompts = [p for p in a.prompt for _ in range(a.num_per_prompt)]
    emb, mask = encoder.encode(prompts)
    ne, nm = encoder.encode_null(len(prompts))
    return ({"context": emb, "context_mask": mask}, {"context": ne, "context_mask": nm},
            [{"prompt": p} for p in prompts])


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pixeldit-sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="release folder, or training run/step folder")
    ap.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    ap.add_argument("--prompts-file", help="text file, one prompt per line")
    ap.add_argument("--class-id", type=int, nargs="*", default=[])
    ap.add_argument("--num-per-prompt", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=None, help="default: the training resolution")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--sampler", choices=list(SAMPLERS), default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg-scale", type=float, default=None)
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=None)
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--text-encoder", default="", help="override the text encoder path of the model config")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.prompts_file:
        a.prompt += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    model, cfg = load_any(a.model, a.device)
    d = cfg.sampler
    sampler, steps = a.sampler or d.sampler, a.steps or d.steps
    scale = d.cfg_scale if a.cfg_scale is None else a.cfg_scale
    interval = tuple(a.cfg_interval) if a.cfg_interval else tuple(d.cfg_interval)
    shift = d.shift if a.shift is None else a.shift
    h, w = a.height or cfg.resolution, a.width or a.height or cfg.resolution
    cond, null_cond, labels = build_conditions(model, cfg, a, a.device)
    n = len(labels)
    noise = torch.stack([torch.randn(3, h, w, generator=torch.Generator().manual_seed(a.seed + i)) for i in range(n)])
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for s in range(0, n, a.batch_size):
        sl = slice(s, s + a.batch_size)
        batch = generate(model, noise[sl].to(a.device), {k: v[sl] for k, v in cond.items()},
                         null_cond={k: v[sl] for k, v in null_cond.items()}, steps=steps, sampler=sampler,
                         cfg_scale=scale, cfg_interval=interval, shift=shift, progress=True)
        images.append(to_uint8(batch))
    images_np = np.concatenate(images)
    entries = []
    for i, (img, label) in enumerate(zip(images_np, labels)):
        name = f"{i:04d}.png"
        Image.fromarray(img).save(out_dir / name)
        entries.append({"file": name, **label, "seed": a.seed + i})
    save_grid(images_np, out_dir / "grid.png", nrow=a.num_per_prompt if a.num_per_prompt > 1 else math.ceil(math.sqrt(n)))
    (out_dir / "prompts.json").write_text(json.dumps(entries, indent=1))
    print(f"{n} images ({h}x{w}, {sampler}, {steps} steps, CFG {scale} on {list(interval)}) -> {out_dir}; grid: "
          f"{out_dir / 'grid.png'}")


if __name__ == "__main__":
    main()
