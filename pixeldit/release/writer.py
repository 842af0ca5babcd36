"""Write a release folder atomically: config.json, model.safetensors (or shards + index), README.md.

The folder is built beside its destination (``pixeldit.storage.tmp_path``) and renamed into place at the end
(``replace_dir``), so a crash never leaves a half-written release under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixeldit.errors import ConfigError
from pixeldit.storage import replace_dir, tmp_path

from .config import CONFIG_FILE, ReleaseConfig
from .reader import TEXT_ENCODER_FLAG
from .safe_load import SHARD_INDEX, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as the Hugging Face default
MODEL_CARD = "README.md"


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
        cond = (f"text prompts (text encoder: {cfg.text_encoder or 'not recorded'}; give a local copy with "
                f"{TEXT_ENCODER_FLAG} PATH)")
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
    if os.path.isabs(cfg.text_encoder):
        raise ConfigError(f"text_encoder={cfg.text_encoder!r}: a release records the text encoder by name, not by "
                          f"a local path (pixeldit.release.config.text_encoder_name)")
    out = Path(out_dir)
    tmp = Path(tmp_path(out))
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, state, cfg, out.name, max_shard_bytes)
        replace_dir(tmp, out)  # the previous release stays complete until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_files(folder: Path, state: dict[str, torch.Tensor], cfg: ReleaseConfig, name: str,
                 max_shard_bytes: int) -> None:
    shards = shard_state(state, max_shard_bytes)
    meta = {"format": "pt", "pixeldit_format_version": str(cfg.format_version)}
    if len(shards) == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / shard_name), metadata=meta)
            weight_map.update({k: shard_name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2))
    (folder / CONFIG_FILE).write_text(cfg.to_json())
    (folder / MODEL_CARD).write_text(model_card(cfg, name))
