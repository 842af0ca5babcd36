"""Numerical parity with the official PixelDiT model code, and the key/shape fixture of the CI tests.

Developer script (not installed). It imports the official model definitions (``pixdit_core``) from a checkout
of the public repository given on the command line; nothing of that code is part of this project:

    git --git-dir=MIRROR archive HEAD pixdit_core | tar -x -C /tmp/official     # any checkout with pixdit_core/
    python -m tools.parity_official parity --official /tmp/official              # velocities, fp32, CPU
    python -m tools.parity_official fixture --official /tmp/official --out tests/data/official_keys.json

``parity``: for each official variant (class-conditional XL widths, text-to-image T2I widths, each with and
without PiT post-modulation) at reduced depth (2 patch blocks, 1 PiT block) it fills every official parameter
with random values (fan-in scaled, so activations stay O(1)), imports the weights through
``pixeldit.release.official``, runs both models on the same images, times and conditions in fp32 and prints
the largest absolute velocity difference. Time and velocity conventions: official class models take
t_off = 1 - t and predict -v; official text models take 1000 t and predict v (ours: t = 1 noise, v = noise - x0).
It also checks that exporting the imported weights gives back every official tensor bit for bit.

``fixture``: every key and shape of the full-size official models (XL/16 class-conditional and the 1.3B
text-to-image model, each with and without post-modulation), built on the meta device, as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from pixeldit.models import build_model
from pixeldit.release.official import infer_official_args, official_to_ours, ours_to_official

# Official constructor arguments: c2i/configs/pix256_xl.yaml and t2i/configs/PixelDiT_*_stage*.yaml
C2I_XL = dict(in_channels=3, patch_size=16, num_groups=16, hidden_size=1152, patch_depth=26, pixel_depth=4,
              num_classes=1000, pixel_hidden_size=16)
T2I = dict(in_channels=3, patch_size=16, num_groups=24, hidden_size=1536, pixel_hidden_size=16,
           pixel_attn_hidden_size=1152, pixel_num_groups=16, patch_depth=14, pixel_depth=2, num_text_blocks=4,
           txt_embed_dim=2304, txt_max_length=300, use_text_rope=True, text_rope_theta=10000.0, repa_encoder_index=6)
VARIANTS = {
    "c2i-xl": ("c2i", C2I_XL, False), "c2i-xl-postmod": ("c2i", C2I_XL, True),
    "t2i": ("t2i", T2I, False), "t2i-postmod": ("t2i", T2I, True),
}


def official_classes(root: Path):
    """The official model classes, imported from the checkout at ``root`` (must contain pixdit_core/)."""
    if not (root / "pixdit_core" / "pixeldit_t2i.py").is_file():
        raise SystemExit(f"{root} has no pixdit_core/pixeldit_t2i.py: pass a checkout of NVlabs/PixelDiT")
    sys.path.insert(0, str(root))
    from pixdit_core.pixeldit_c2i import PixDiT
    from pixdit_core.pixeldit_t2i import PixDiT_T2I

    return {"c2i": PixDiT, "t2i": PixDiT_T2I}


def source_of(root: Path) -> str:
    """Commit of the checkout when it is a git work tree, else its path."""
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return f"{root} at {rev.stdout.strip()}"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return str(root)


def build_official(classes, variant: str, depth: int | None = None, pixel_depth: int | None = None,
                   device: str | None = None) -> torch.nn.Module:
    kind, kwargs, postmod = VARIANTS[variant]
    kwargs = dict(kwargs, pit_adaln_post_modulation=postmod)
    if depth is not None:
        kwargs.update(patch_depth=depth, pixel_depth=pixel_depth)
    if device is None:
        return classes[kind](**kwargs)
    with torch.device(device):
        return classes[kind](**kwargs)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm weights 1 + N(0, 0.1), biases N(0, 0.1), tables N(0, 1), matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1 and "norm" in name:
            p.copy_(1 + 0.1 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        elif "embedding" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[-1]))


def run_parity(classes, variant: str, hw: tuple[int, int], batch: int = 2, seed: int = 0) -> dict:
    kind = VARIANTS[variant][0]
    official = build_official(classes, variant, depth=2, pixel_depth=1).eval()
    randomize(official, seed)
    off_state = official.state_dict()
    args = infer_official_args(off_state)
    ours = build_model(args).eval()
    ours.load_state_dict(official_to_ours(off_state, args), strict=True)
    back = ours_to_official(ours.state_dict(), args)
    roundtrip = all(torch.equal(back[k], v) for k, v in off_state.items() if not _pruned(k, args))

    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, *hw, generator=g)
    t = torch.rand(batch, generator=g)
    with torch.no_grad():
        if kind == "c2i":
            y = torch.randint(0, 1001, (batch,), generator=g)  # 1000: the null class
            v_off = -official(x, 1 - t, y)
            v_ours = ours(x, t, y=y)
        else:
            ctx = torch.randn(batch, args.text_len, args.text_dim, generator=g)
            mask = torch.ones(batch, args.text_len, dtype=torch.bool)
            mask[:, 20:] = False  # a padded caption: ignored by text_padding=unmasked, as officially
            v_off = official(x, 1000 * t, ctx)
            v_ours = ours(x, t, context=ctx, context_mask=mask)
    diff = (v_ours - v_off).abs().max().item()
    return {"variant": variant, "args": args.name, "hw": list(hw), "max_abs_diff": diff,
            "max_abs_v": v_off.abs().max().item(), "export_roundtrip_exact": roundtrip}


def _pruned(key: str, args) -> bool:
    """Official keys our model does not keep (the last block's text outputs), re-created on export."""
    last = f"patch_blocks.{args.depth - 1}."
    return args.conditioning == "text" and key.startswith(last) and any(
        s in key for s in ("q_norm_y", "proj_y", "norm_y2", "mlp_y", "qkv_y", "adaLN_modulation_txt"))


def write_fixture(classes, source: str, out: Path) -> None:
    """{"source": ..., "variants": {variant: {official key: shape}}}, one key per line."""
    variants = {}
    for variant in VARIANTS:
        model = build_official(classes, variant, device="meta")
        variants[variant] = {k: list(v.shape) for k, v in model.state_dict().items()}
    lines = ["{", f' "source": {json.dumps(source)},', ' "variants": {']
    for i, (variant, keys) in enumerate(variants.items()):
        lines.append(f"  {json.dumps(variant)}: {{")
        lines += [f"   {json.dumps(k)}: {json.dumps(v)}{',' if j < len(keys) - 1 else ''}"
                  for j, (k, v) in enumerate(keys.items())]
        lines.append("  }" + ("," if i < len(variants) - 1 else ""))
    lines += [" }", "}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    assert json.loads(out.read_text())["variants"] == variants
    print(f"{out}: {', '.join(f'{k} {len(v)} keys' for k, v in variants.items())}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.parity_official", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("parity", "fixture"))
    ap.add_argument("--official", required=True, type=Path, help="checkout of NVlabs/PixelDiT (with pixdit_core/)")
    ap.add_argument("--out", type=Path, default=Path("tests/data/official_keys.json"), help="fixture file")
    ap.add_argument("--hw", type=int, nargs=2, action="append", default=None, metavar=("H", "W"),
                    help="image sizes to compare (repeatable; default 64x96 and 256x256)")
    ap.add_argument("--variant", choices=list(VARIANTS), action="append", default=None,
                    help="variants to compare (repeatable; default all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the parity results here")
    ap.add_argument("--source", default=None, help="where the checkout came from, recorded in the fixture")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    classes = official_classes(a.official.resolve())
    if a.command == "fixture":
        write_fixture(classes, a.source or source_of(a.official.resolve()), a.out)
        return
    results = []
    for variant in a.variant or VARIANTS:
        for hw in a.hw or [(64, 96), (256, 256)]:
            t0 = time.time()
            r = run_parity(classes, variant, tuple(hw))
            results.append(r)
            print(f"{r['variant']:15s} {r['args']:9s} {hw[0]}x{hw[1]}: max |v_ours - v_official| = "
                  f"{r['max_abs_diff']:.2e} (max |v| {r['max_abs_v']:.2f}); export round trip exact: "
                  f"{r['export_roundtrip_exact']} ({time.time() - t0:.1f} s)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    worst = max(r["max_abs_diff"] for r in results)
    print(f"worst: {worst:.2e} ({'within' if worst <= 1e-5 else 'ABOVE'} 1e-5)")


if __name__ == "__main__":
    main()
