"""``pixeldit-official``: import an official NVlabs/PixelDiT checkpoint file into a release folder, export a
release back into the official layout (the key map itself: ``pixeldit.release.official``).

    pixeldit-official import imagenet256_pixeldit_xl_epoch320.ckpt releases/xl-official
    pixeldit-official import pixeldit_t2i_v1.pth releases/t2i-official --allow-pickle
    pixeldit-official export releases/t2i-official pixeldit_t2i.safetensors

Checkpoint files: safetensors and ``torch.load(weights_only=True)`` files load directly. The official files
also hold pickled training metadata; ``--allow-pickle`` loads those with full unpickling, which can run code
from the file: only for files from a source you trust (the official Hugging Face repositories).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixeldit.conditioning.text_encoder import OFFICIAL_SYSTEM_PROMPT
from pixeldit.models import ModelArgs

from pixeldit.errors import CliParser, cli_main
from pixeldit.storage import atomic_local_file

from . import DTYPES, ReleaseConfig, SamplerDefaults, from_pretrained
from .config import CLASS_CFG_INTERVAL
from .safe_load import UnsafeCheckpointError, safe_load
from .writer import DEFAULT_MAX_SHARD_BYTES, save_release

from .official import PROBE_KEY, TEXT_ENCODER, WRAPPER_PREFIXES, infer_official_args, official_to_ours, ours_to_official


# ------------------------------------------------------------------------------ reading files


def read_official(path: str | os.PathLike, weights: str = "ema", allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Bare official keys of one checkpoint file: the ``weights`` copy ("ema" or "raw") where it holds both."""
    path = Path(path)
    if weights not in WRAPPER_PREFIXES:
        raise ValueError(f"weights={weights!r}; valid values: {', '.join(WRAPPER_PREFIXES)}")
    if path.suffix == ".safetensors":
        obj = safe_load(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{path} holds pickled objects beyond tensors (the official checkpoints carry training "
                    f"metadata); pass --allow-pickle to unpickle it if you trust its source, e.g. the official "
                    f"Hugging Face repository. Detail: {str(err).splitlines()[0]}") from None
            obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    for prefix in WRAPPER_PREFIXES[weights]:
        if prefix + PROBE_KEY in state:
            return {k[len(prefix):]: v for k, v in state.items()
                    if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    raise ValueError(f"{path}: no official PixelDiT weights ({PROBE_KEY} under any of the prefixes "
                     f"{[p or '(none)' for p in WRAPPER_PREFIXES[weights]]})")


def official_sampler(args: ModelArgs, resolution: int) -> SamplerDefaults:
    """The official inference settings in our time convention (t = 1 noise).

    Class models: FlowDPM 100 steps, CFG 3.25 (3.5 at 512) where the official t is in [0.1, 1.0], i.e. our t in
    [0.0, 0.9]; time shift 1 (2 at 512). Text models: 50 steps, CFG 3.5 everywhere, shift 4 at 1024 (3 below).
    """
    if args.conditioning == "class":
        big = resolution >= 512
        return SamplerDefaults("flow_dpm", 100, 3.5 if big else 3.25, CLASS_CFG_INTERVAL, 2.0 if big else 1.0)
    return SamplerDefaults("flow_dpm", 50, 3.5, (0.0, 1.0), 4.0 if resolution >= 1024 else 3.0)


def import_official(src: str | os.PathLike, out: str | os.PathLike, weights: str = "ema", dtype: str = "fp32",
                    resolution: int | None = None, allow_pickle: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Official checkpoint -> release folder; returns the folder."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid values: {', '.join(DTYPES)}")
    official = read_official(src, weights, allow_pickle)
    args = infer_official_args(official)
    state = official_to_ours(official, args, where=str(src))
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    text = args.conditioning == "text"
    resolution = resolution or (1024 if text else 256)
    cfg = ReleaseConfig(model_args=args.to_dict(), resolution=resolution, stage="official", weights=weights,
                        dtype=dtype, text_encoder=TEXT_ENCODER if text else "",
                        system_prompt=OFFICIAL_SYSTEM_PROMPT if text else "",
                        sampler=official_sampler(args, resolution))
    return save_release(state, cfg, out, max_shard_bytes)


EXPORT_FORMATS = (".safetensors", ".pth")


def export_official(release: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Release folder of an official-style model -> one official-layout file (format from the suffix)."""
    out = Path(out)
    if out.suffix not in EXPORT_FORMATS:
        raise ValueError(f"{out}: unknown format {out.suffix!r}; valid suffixes: {', '.join(EXPORT_FORMATS)}")
    model, _ = from_pretrained(release, dtype=DTYPES[ReleaseConfig.load(release).dtype])  # as stored
    state = ours_to_official({k: v.contiguous() for k, v in model.state_dict().items()}, model.args)
    with atomic_local_file(out) as tmp:
        if out.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
        else:
            prefixes = ("core.",) if model.args.conditioning == "text" else ("denoiser.", "ema_denoiser.")
            torch.save({"state_dict": {p + k: v for p in prefixes for k, v in state.items()}}, tmp)
    return out


# ------------------------------------------------------------------------------------------ CLI

PROG = "pixeldit-official"


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official checkpoint -> release folder")
    imp.add_argument("checkpoint", help="official .ckpt / .pth / .safetensors file")
    imp.add_argument("out", help="release folder to write")
    imp.add_argument("--weights", choices=list(WRAPPER_PREFIXES), default="ema",
                     help="EMA (default) or raw copy, where the file holds both (class-conditional .ckpt)")
    imp.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    imp.add_argument("--resolution", type=int, default=None,
                     help="resolution the weights were trained at (default: 256 class, 1024 text); "
                          "sets the sampler defaults")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="unpickle a checkpoint with training metadata (runs code from the file: "
                          "trusted sources only)")
    exp = sub.add_parser("export", help="release folder -> official layout (.safetensors or .pth)")
    exp.add_argument("release", help="release folder of an official-style model (layer_style=official)")
    exp.add_argument("out", help="file to write: .safetensors (bare keys) or .pth ({'state_dict': wrapped keys})")
    return ap


def run(argv: list[str]) -> None:
    a = build_parser().parse_args(argv)
    if a.command == "import":
        out = import_official(a.checkpoint, a.out, a.weights, a.dtype, a.resolution, a.allow_pickle)
        args = ReleaseConfig.load(out).args()
        print(f"release: {out} ({args.name}, {args.conditioning}, post_modulation={args.post_modulation})")
    else:
        print(f"official layout: {export_official(a.release, a.out)}")


def main(argv: list[str] | None = None) -> int:
    """pixeldit-official; user errors (UnsafeCheckpointError included): one line, exit code 2."""
    return cli_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
