"""Write a release folder atomically: config.json, model.safetensors (or shards + index), README.md.

The folder is built beside its destination (``{out}.tmp``) and renamed into place at the end, so a crash
never leaves a half-written release under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import CONFIG_FILE, ReleaseConfig
from .safe_load import SHARD_INDEX, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def shard_state(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split into consecutive shards (sorted keys) of at most ``max_bytes`` each; a larger tensor gets its own."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        n = state[key].numel() * state[key].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += n
    return shards


def model_card(cfg: ReleaseConfig, name: str) -> str:
    a = cfg.args()
    s = cfg.sampler
    if a.conditioning == "text":
        cond = f"text prompts (text encoder: {cfg.text_encoder or 'set --text-encoder'})"
        example = '--prompt "a red circle on a white background" --num-per-prompt 4'
    else:
        cond = f"{a.num_classes} class ids (null class {a.num_classes} for guidance)"
        ids = [c for c in (207, 360, 387) if c < a.num_classes] or list(range(min(3, a.num_classes)))
        example = f"--class-id {' '.join(map(str, ids))} --num-per-prompt 2"
    return f"""# {name}

PixelDiT {a.name}: a pixel-space diffusion transformer ({a.depth} patch blocks, {a.pixel_depth} pixel blocks,
width {a.hidden_size}, patch {a.patch_size}), conditioned on {cond}.
Trained for {cfg.step} steps; weights from curriculum stage "{cfg.stage}" at base resolution {cfg.resolution}.
Weights: {cfg.weights.upper()} in {cfg.dtype}, safetensors (no pickle).

## Load

```python
from pixeldit.release import from_pretrained
model, config = from_pretrained("{name}")  # no deepspeed, no GPU needed; strict load
```

## Sample

```bash
pixeldit-sample --model {name} {example} --out samples/ --seed 0
```

Defaults (config.json "sampler"): {s.sampler}, {s.steps} steps, CFG scale {s.cfg_scale} on t in
[{s.cfg_interval[0]}, {s.cfg_interval[1]}] (t = 1 is noise), time shift {s.shift}. Override with --sampler,
--steps, --cfg-scale, --cfg-interval, --shift. In Python:

```python
from pixeldit.diffusion import generate
images = generate(model, cond, null_cond, noise=noise, **config.sampler.generate_kwargs())  # (B, 3, H, W) in [-1, 1]
```
"""


def save_release(state: dict[str, torch.Tensor], cfg: ReleaseConfig, out_dir: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``state`` (``PixelDiT.state_dict()`` keys, already in ``cfg.dtype``) and ``cfg``; returns the folder."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = shard_state(state, max_shard_bytes)
    meta = {"format": "pt", "pixeldit_format_version": str(cfg.format_version)}
    if len(shards) == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2))
    (tmp / CONFIG_FILE).write_text(cfg.to_json())
    (tmp / "README.md").write_text(model_card(cfg, out.name))
    old = out.with_name(out.name + ".old")
    if out.exists():  # keep the previous release until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
