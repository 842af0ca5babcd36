"""Official NVlabs/PixelDiT checkpoints <-> PixelDiT release folders.

    pixeldit-official import imagenet256_pixeldit_xl_epoch320.ckpt releases/xl-official
    pixeldit-official import pixeldit_t2i_v1.pth releases/t2i-official --allow-pickle
    pixeldit-official export releases/t2i-official pixeldit_t2i.safetensors

Import reads an official checkpoint (the class-conditional ImageNet XL ``.ckpt`` files of
nvidia/PixelDiT-ImageNet, the text-to-image ``pixeldit_t2i_v1.pth`` of nvidia/PixelDiT-1300M-1024px, with or
without PiT post-modulation, or a ``.safetensors`` of bare official keys as ComfyUI loads them), infers the
architecture from the tensor shapes and writes a release folder (config.json + safetensors) that
``pixeldit.release.from_pretrained`` loads. Export writes a release of an official-style model back in the
official layout: ``.safetensors`` with bare official keys, or ``.pth`` holding ``{"state_dict": ...}`` under the
official training wrappers (text: ``core.``; class: ``denoiser.`` and ``ema_denoiser.``).

Imported models get ``layer_style="official"`` (the reference's layer details, see ``ModelArgs``),
``rope_positions="normalized"`` and, for text models, ``text_padding="unmasked"`` plus the official system
prompt, so they compute what the official code computes. The key map (``official_to_ours`` /
``ours_to_official``) is exact and lossless in both directions; besides renames it

- reorders the patch-embedding input columns: the official model unfolds patches channel-major (C, p, p),
  ours row-major (p, p, C);
- permutes the query/key channels of every attention head (rows of the fused QKV weights, q/k RMSNorm weights):
  official RoPE rotates interleaved pairs (4k, 4k+1) by the column and (4k+2, 4k+3) by the row, ours rotates
  pairs (k, q+k) by the row and (2q+k, 3q+k) by the column, q = head_dim / 4. Attention scores are unchanged by
  a permutation shared by q and k;
- negates the output head of class-conditional models: the official ImageNet models run time from noise at 0
  to data at 1 and predict x - noise; ours predict noise - x0 with t = 1 noise (the model feeds 1 - t to the
  official timestep features itself). Text models share our convention (model time 1000 t);
- prunes the text stream of the last MM-DiT block: nothing reads its output, so import keeps only what makes
  its keys and values (``norm_y1``, the K/V rows of ``qkv_y``, ``k_norm_y``, the shift/scale rows of
  ``adaLN_modulation_txt``) and drops its query rows, ``q_norm_y``, ``proj_y``, ``norm_y2``, ``mlp_y`` and the
  gate/MLP rows of its modulation. Export re-creates them as zeros (RMSNorm weights as ones): an identity text
  update that the image output never sees.

Checkpoint files: safetensors and ``torch.load(weights_only=True)`` files load directly. The official files
also hold pickled training metadata; ``--allow-pickle`` loads those with full unpickling, which can run code
from the file: only for files from a source you trust (the official Hugging Face repositories).
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from pixeldit.conditioning.text_encoder import OFFICIAL_SYSTEM_PROMPT
from pixeldit.models import MODEL_SIZES, ModelArgs, build_model

from pixeldit.errors import CliParser, cli_main
from pixeldit.storage import atomic_local_file

from . import DTYPES, ReleaseConfig, SamplerDefaults, from_pretrained
from .config import CLASS_CFG_INTERVAL
from .safe_load import UnsafeCheckpointError, safe_load
from .writer import DEFAULT_MAX_SHARD_BYTES, save_release

# Prefixes of the official training wrappers, tried in order: Lightning module (c2i), PixDiTTrainer (t2i), bare.
WRAPPER_PREFIXES = {"ema": ("ema_denoiser.", "core.", ""), "raw": ("denoiser.", "core.", "")}
PROBE_KEY = "s_embedder.proj.weight"  # every official model has it; locates the wrapper prefix
TEXT_ENCODER = "gemma-2-2b-it"  # the official text encoder (pass its local folder when sampling)


# ------------------------------------------------------------------------------ tensor transforms


def rope_channel_order(head_dim: int) -> torch.Tensor:
    """Index ``src`` with ``ours[..., j] = official[..., src[j]]`` over the channels of one attention head.

    Official channels 4k, 4k+1 (column pair) and 4k+2, 4k+3 (row pair) of frequency k go to ours 2q+k, 3q+k
    and k, q+k (q = head_dim / 4).
    """
    q = head_dim // 4
    k = torch.arange(q)
    return torch.cat([4 * k + 2, 4 * k + 3, 4 * k, 4 * k + 1])


def _qk_rows(w: torch.Tensor, head_dim: int, to_ours: bool, parts: tuple[str, ...]) -> torch.Tensor:
    """Permute the head channels of the q and k parts of a fused projection (rows: part, head, channel)."""
    order = rope_channel_order(head_dim)
    order = order if to_ours else torch.argsort(order)
    x = w.reshape(len(parts), -1, head_dim, *w.shape[1:])  # (parts, heads, hd, ...)
    x = torch.stack([x[i][:, order] if name in "qk" else x[i] for i, name in enumerate(parts)])
    return x.reshape(w.shape)


def _head_channels(w: torch.Tensor, to_ours: bool) -> torch.Tensor:
    """q/k RMSNorm weight (head_dim,) in the other channel order."""
    order = rope_channel_order(w.shape[0])
    return w[order if to_ours else torch.argsort(order)].contiguous()


def _patch_columns(w: torch.Tensor, channels: int, p: int, to_ours: bool) -> torch.Tensor:
    """Patch-embedding weight (D, C*p*p): official columns (C, p, p) <-> ours (p, p, C)."""
    D = w.shape[0]
    if to_ours:
        return w.reshape(D, channels, p, p).permute(0, 2, 3, 1).reshape(D, -1).contiguous()
    return w.reshape(D, p, p, channels).permute(0, 3, 1, 2).reshape(D, -1).contiguous()


class Rule:
    """One official key <-> one of our keys, with the transform each way (identity by default)."""

    def __init__(self, official: str, ours: str, to_ours: Callable | None = None, to_official: Callable | None = None):
        self.official, self.ours = official, ours
        self.to_ours = to_ours or (lambda t: t)
        self.to_official = to_official or (lambda t: t)


def _rules(args: ModelArgs) -> tuple[list[Rule], dict[str, Callable[[], torch.Tensor]]]:
    """The key map of one architecture: rules, and the official keys ours prunes with their re-created values."""
    D, p, C = args.hidden_size, args.patch_size, args.in_channels
    hd, phd = D // args.num_heads, args.attn_dim // args.attn_heads
    rules = [
        Rule("s_embedder.proj.weight", "patch_embed.weight",
             lambda t: _patch_columns(t, C, p, True), lambda t: _patch_columns(t, C, p, False)),
        Rule("s_embedder.proj.bias", "patch_embed.bias"),
        Rule("pixel_embedder.proj.weight", "pixel_embed.proj.weight"),
        Rule("pixel_embedder.proj.bias", "pixel_embed.proj.bias"),
        Rule("final_layer.norm.weight", "head.norm.weight"),
    ]
    rules += [Rule(f"t_embedder.mlp.{i}.{w}", f"t_embed.mlp.{i}.{w}") for i in (0, 2) for w in ("weight", "bias")]
    negate = (lambda t: -t) if args.conditioning == "class" else None  # class: official v = x - noise
    rules += [Rule(f"final_layer.linear.{w}", f"head.linear.{w}", negate, negate) for w in ("weight", "bias")]

    def attention(off: str, ours: str, head_dim: int, qkv: str = "qkv", q_norm: str = "q_norm",
                  k_norm: str = "k_norm", proj: str = "proj") -> list[Rule]:
        return [
            Rule(f"{off}.{qkv}.weight", f"{ours}.qkv.weight", lambda t: _qk_rows(t, head_dim, True, ("q", "k", "v")),
                 lambda t: _qk_rows(t, head_dim, False, ("q", "k", "v"))),
            Rule(f"{off}.{q_norm}.weight", f"{ours}.q_norm.weight", lambda t: _head_channels(t, True),
                 lambda t: _head_channels(t, False)),
            Rule(f"{off}.{k_norm}.weight", f"{ours}.k_norm.weight", lambda t: _head_channels(t, True),
                 lambda t: _head_channels(t, False)),
            Rule(f"{off}.{proj}.weight", f"{ours}.proj.weight"),
            Rule(f"{off}.{proj}.bias", f"{ours}.proj.bias"),
        ]

    def mlp(off: str, ours: str) -> list[Rule]:
        return [Rule(f"{off}.{w}.weight", f"{ours}.{w}.weight") for w in ("w1", "w2", "w3")]

    def linear(off: str, ours: str) -> list[Rule]:
        return [Rule(f"{off}.{w}", f"{ours}.{w}") for w in ("weight", "bias")]

    pruned: dict[str, Callable[[], torch.Tensor]] = {}
    if args.conditioning == "class":
        rules.append(Rule("y_embedder.embedding_table.weight", "y_embed.table.weight"))
        for i in range(args.depth):
            o, u = f"patch_blocks.{i}", f"patch_blocks.{i}"
            rules += [Rule(f"{o}.norm1.weight", f"{u}.norm1.weight"), Rule(f"{o}.norm2.weight", f"{u}.norm2.weight")]
            rules += attention(f"{o}.attn", f"{u}.attn", hd)
            rules += mlp(f"{o}.mlp", f"{u}.mlp") + linear(f"{o}.adaLN_modulation.0", f"{u}.adaln.linear")
    else:
        rules += linear("y_embedder.proj", "text_proj.0")
        rules += [Rule("y_embedder.norm.weight", "text_proj.1.weight"), Rule("y_pos_embedding", "text_pos")]
        for i in range(args.depth):
            o, u = f"patch_blocks.{i}", f"patch_blocks.{i}"
            rules += [Rule(f"{o}.norm_x1.weight", f"{u}.img.norm1.weight"),
                      Rule(f"{o}.norm_x2.weight", f"{u}.img.norm2.weight"),
                      Rule(f"{o}.norm_y1.weight", f"{u}.txt.norm1.weight")]
            rules += attention(f"{o}.attn", f"{u}.img.attn", hd, "qkv_x", "q_norm_x", "k_norm_x", "proj_x")
            rules += mlp(f"{o}.mlp_x", f"{u}.img.mlp") + linear(f"{o}.adaLN_modulation_img.0", f"{u}.img.adaln.linear")
            if i < args.depth - 1:
                rules += [Rule(f"{o}.norm_y2.weight", f"{u}.txt.norm2.weight")]
                rules += attention(f"{o}.attn", f"{u}.txt.attn", hd, "qkv_y", "q_norm_y", "k_norm_y", "proj_y")
                rules += mlp(f"{o}.mlp_y", f"{u}.txt.mlp") + linear(f"{o}.adaLN_modulation_txt.0",
                                                                     f"{u}.txt.adaln.linear")
                continue
            # last block: our text stream keeps only its keys/values (K/V rows, shift/scale of its modulation)
            rules += [
                Rule(f"{o}.attn.qkv_y.weight", f"{u}.txt.attn.qkv.weight",
                     lambda t: _qk_rows(t[D:], hd, True, ("k", "v")),
                     lambda t: torch.cat([torch.zeros(D, D, dtype=t.dtype, device=t.device),
                                          _qk_rows(t, hd, False, ("k", "v"))])),
                Rule(f"{o}.attn.k_norm_y.weight", f"{u}.txt.attn.k_norm.weight", lambda t: _head_channels(t, True),
                     lambda t: _head_channels(t, False)),
                Rule(f"{o}.adaLN_modulation_txt.0.weight", f"{u}.txt.adaln.linear.weight",
                     lambda t: t[:2 * D].contiguous(),
                     lambda t: torch.cat([t, torch.zeros(4 * D, D, dtype=t.dtype, device=t.device)])),
                Rule(f"{o}.adaLN_modulation_txt.0.bias", f"{u}.txt.adaln.linear.bias",
                     lambda t: t[:2 * D].contiguous(),
                     lambda t: torch.cat([t, torch.zeros(4 * D, dtype=t.dtype, device=t.device)])),
            ]
            h = args.mlp_hidden
            pruned.update({
                f"{o}.attn.q_norm_y.weight": lambda: torch.ones(hd),
                f"{o}.attn.proj_y.weight": lambda: torch.zeros(D, D),
                f"{o}.attn.proj_y.bias": lambda: torch.zeros(D),
                f"{o}.norm_y2.weight": lambda: torch.ones(D),
                f"{o}.mlp_y.w1.weight": lambda: torch.zeros(h, D),
                f"{o}.mlp_y.w3.weight": lambda: torch.zeros(h, D),
                f"{o}.mlp_y.w2.weight": lambda: torch.zeros(D, h),
            })
    for i in range(args.pixel_depth):
        o, u = f"pixel_blocks.{i}", f"pixel_blocks.{i}"
        rules += linear(f"{o}.compress_to_attn", f"{u}.compaction.compress")
        rules += linear(f"{o}.expand_from_attn", f"{u}.compaction.expand")
        rules += [Rule(f"{o}.norm1.weight", f"{u}.norm1.weight"), Rule(f"{o}.norm2.weight", f"{u}.norm2.weight")]
        rules += attention(f"{o}.attn", f"{u}.compaction.attn", phd)
        rules += linear(f"{o}.mlp.fc1", f"{u}.mlp.fc1") + linear(f"{o}.mlp.fc2", f"{u}.mlp.fc2")
        rules += linear(f"{o}.adaLN_modulation.0", f"{u}.adaln.linear")
    return rules, pruned


# ------------------------------------------------------------------------------- key/shape maps


OFFICIAL_ONLY = {"layer_style": "official", "rope_positions": "normalized", "qk_norm": True}


def check_official_args(args: ModelArgs) -> None:
    """Raise unless ``args`` describe a model the official layout can hold."""
    bad = {k: getattr(args, k) for k, v in OFFICIAL_ONLY.items() if getattr(args, k) != v}
    if bad:
        raise ValueError(f"model {args.name} has {bad}: only models with {OFFICIAL_ONLY} have an official layout")


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``state`` has exactly the ``expected`` keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in set(state) & set(expected)
                   if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        details = [f"{name}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for name, keys in
                   (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{where}: not the official layout of the inferred architecture ({'; '.join(details)})")


def official_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the official checkpoint of this architecture (computed on the meta device)."""
    ours = build_model(args, device="meta").state_dict()
    return {k: tuple(v.shape) for k, v in ours_to_official(ours, args).items()}


def official_to_ours(state: dict[str, torch.Tensor], args: ModelArgs, where: str = "official checkpoint"
                     ) -> dict[str, torch.Tensor]:
    """Official bare keys -> ``PixelDiT.state_dict()`` keys (checked: exactly the expected keys and shapes)."""
    check_official_args(args)
    check_keys(state, official_shapes(args), where)
    rules, _ = _rules(args)
    return {r.ours: r.to_ours(state[r.official]) for r in rules}


def ours_to_official(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """``PixelDiT.state_dict()`` keys -> official bare keys, pruned weights re-created (zeros, RMSNorm ones)."""
    check_official_args(args)
    rules, pruned = _rules(args)
    missing = sorted({r.ours for r in rules} - set(state))
    if missing:
        raise ValueError(f"weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''} of model {args.name}")
    out = {r.official: r.to_official(state[r.ours]) for r in rules}
    ref = state[rules[0].ours]
    out.update({k: make().to(dtype=ref.dtype, device=ref.device) for k, make in pruned.items()})
    return out


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix} indices {sorted(found)} are not 0..n-1")
    return len(found)


def infer_official_args(state: dict[str, torch.Tensor]) -> ModelArgs:
    """Architecture of an official state dict (bare keys) from its shapes; a matching size keeps its table name."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"not an official PixelDiT checkpoint: no {key!r}")
        return tuple(state[key].shape)

    if "y_embedder.embedding_table.weight" in state:
        conditioning, q_norm = "class", "patch_blocks.0.attn.q_norm.weight"
    elif "y_embedder.proj.weight" in state:
        conditioning, q_norm = "text", "patch_blocks.0.attn.q_norm_x.weight"
    else:
        raise ValueError("not an official PixelDiT checkpoint: neither y_embedder.embedding_table (class) nor "
                         "y_embedder.proj (text) found")
    D, patch_in = shape(PROBE_KEY)
    Dp, C = shape("pixel_embedder.proj.weight")
    p = round((patch_in / C) ** 0.5)
    depth, pixel_depth = _count_blocks(state, "patch_blocks"), _count_blocks(state, "pixel_blocks")
    heads = D // shape(q_norm)[0]
    attn_dim = shape("pixel_blocks.0.compress_to_attn.weight")[0]
    pixel_heads = attn_dim // shape("pixel_blocks.0.attn.q_norm.weight")[0]
    n_mod = shape("pixel_blocks.0.adaLN_modulation.0.weight")[0] // (Dp * p * p)
    if n_mod not in (4, 6):
        raise ValueError(f"pixel_blocks.0.adaLN_modulation has {n_mod} chunks per pixel; expected 6 or 4 "
                         f"(post-modulation)")
    fields = dict(depth=depth, pixel_depth=pixel_depth, hidden_size=D, num_heads=heads, conditioning=conditioning,
                  patch_size=p, pixel_dim=Dp, in_channels=C,
                  pixel_mlp_ratio=shape("pixel_blocks.0.mlp.fc1.weight")[0] / Dp,
                  pixel_attn_dim=None if attn_dim == D else attn_dim,
                  pixel_heads=None if pixel_heads == heads else pixel_heads)
    if conditioning == "class":
        fields["num_classes"] = shape("y_embedder.embedding_table.weight")[0] - 1
    else:
        fields.update(text_dim=shape("y_embedder.proj.weight")[1], text_len=shape("y_pos_embedding")[1])
    official = dict(layer_style="official", rope_positions="normalized", post_modulation=n_mod == 4,
                    text_padding="unmasked" if conditioning == "text" else "masked")
    for size in MODEL_SIZES.values():  # the size table entry it is, if any: its name and REPA block
        if all(getattr(size, k) == v for k, v in fields.items()):
            return replace(size, **fields, **official)
    return ModelArgs(name="official", repa_block=min(8, depth), **fields, **official)


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
