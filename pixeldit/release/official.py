"""Official NVlabs/PixelDiT checkpoints <-> PixelDiT release folders: the key map (the files and the
``pixeldit-official`` command: ``official_cli``).

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
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

import torch

from pixeldit.models import MODEL_SIZES, ModelArgs, build_model

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
