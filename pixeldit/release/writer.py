"""Write a release folder atomically: config.json, model.safetensors (or shards + index), README.md."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import CONFIG_FILE, ReleaseConfig
from .safe_load import SHARD_INDEX, SINGLE_FILE


def shard_state(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split into consecutive shards of at most ``max_bytes`` each (a tensor larger than that gets its own)."""
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
    cond = ("text prompts" if a.conditioning == "text" else f"{a.num_classes} class ids")
    example = ('--prompt "a red circle on a white background"' if a.conditioning == "text" else "--class-id 1 2 3")
    return f"""# {name}

PixelDiT {a.name} ({a.conditioning}-conditional, pixel space), conditioned on {cond}.
Trained to step {cfg.step} (stage "{cfg.stage}", resolution {cfg.resolution}); weights: {cfg.weights} in {cfg.dtype}.
Text encoder: {cfg.text_encoder or "none"}.

## Load

```python
from pixeldit.release import from_pretrained
model, config = from_pretrained("{name}")   # safetensors only: no pickle, no deepspeed, no GPU needed
```

## Sample

```bash
pixeldit-sample --model {name} {example} --out samples/
```

Defaults: sampler {cfg.sampler.sampler}, {cfg.sampler.steps} steps, CFG {cfg.sampler.cfg_scale} on
t in {list(cfg.sampler.cfg_interval)}, time shift {cfg.sampler.shift}.
"""


def save_release(state: dict[str, torch.Tensor], cfg: ReleaseConfig, out_dir: str | os.PathLike,
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``state`` (PixelDiT.state_dict() keys) and ``cfg`` into a folder built aside and renamed at the end."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in state.items()}
    shards = shard_state(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / CONFIG_FILE).write_text(cfg.to_json())
    (tmp / "README.md").write_text(model_card(cfg, out.name))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
