"""DeepSpeed JSON of a stage: the ZeRO knobs of ``ds_configs/{zero}.json`` + the keys the run config owns.

The JSONs ship inside the package as ``pixeldit.ds_configs`` (the repository's ``ds_configs/`` folder, mapped
in pyproject.toml) and are read with ``importlib.resources``, so a wheel install finds them too;
``deepspeed.config_dir`` points at another folder of JSONs instead.

Micro batch, gradient accumulation, train batch size, precision and gradient clipping are defined once, in
the run config; ``build_ds_config`` fills them in and raises a ConfigError naming the file and key when the
JSON sets a different value ("auto" counts as unset). Gradient clipping is per stage (``stages[].grad_clip``,
else ``optim.grad_clip``): each stage builds its own engine. ``optimizer``/``scheduler`` sections are refused:
the trainer builds the optimizer and the LR schedule (optim.py). With ``optim.name=came`` the JSON must keep
the partition layouts ``pixeldit.train.zero_partitions`` knows (``CAME_REFUSED``).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixeldit.errors import ConfigError

from .config import RunConfig, StageConfig

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DS_CONFIGS_PACKAGE = "pixeldit.ds_configs"
_AUTO = "auto"
# ZeRO JSON settings under which CAME's flat partitions cannot be mapped back to matrices:
# (path in the JSON, refused(value, whole JSON), why)
CAME_REFUSED = (
    (("zero_optimization", "elastic_checkpoint"), lambda v, ds: bool(v),
     "elastic checkpoints re-slice optimizer states by position"),
    (("zero_optimization", "zero_hpz_partition_size"), lambda v, ds: v not in (0, 1), "hierarchical partitions"),
    (("zero_optimization", "mics_shard_size"), lambda v, ds: v not in (-1, 0), "MiCS shards"),
    (("data_types", "grad_accum_dtype"), lambda v, ds: v in ("fp32", "float32") and zero_stage(ds) == 1,
     "ZeRO-1 with fp32 gradient accumulation runs through BF16_Optimizer"),
)


def ds_config_path(cfg: RunConfig) -> Traversable:
    """``{zero}.json`` in ``deepspeed.config_dir``, or the one shipped in ``pixeldit.ds_configs``."""
    if cfg.deepspeed.config_dir:
        folder: Traversable = Path(cfg.deepspeed.config_dir)
        where = f"deepspeed.config_dir={cfg.deepspeed.config_dir!r}"
    else:
        where = f"the package {DS_CONFIGS_PACKAGE}"
        try:
            folder = resources.files(DS_CONFIGS_PACKAGE)
        except ModuleNotFoundError:
            raise ConfigError(f"{where} is not installed: install pixeldit (pip install -e . in a checkout) or set "
                              f"deepspeed.config_dir to a folder of ZeRO JSONs") from None
    path = folder / f"{cfg.deepspeed.zero}.json"
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found (deepspeed.zero={cfg.deepspeed.zero!r}, looked in "
                          f"{where})")
    return path


def build_ds_config(cfg: RunConfig, stage: StageConfig, world_size: int) -> dict[str, Any]:
    """The ZeRO JSON completed with the keys the run config owns; a conflicting JSON value is an error."""
    path = ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    owned = {
        "train_micro_batch_size_per_gpu": (stage.micro_batch, f"stages[{stage.name}].micro_batch"),
        "gradient_accumulation_steps": (stage.grad_accum, f"stages[{stage.name}].grad_accum"),
        "train_batch_size": (stage.micro_batch * stage.grad_accum * world_size,
                             "micro_batch x grad_accum x world size"),
        "gradient_clipping": (stage.clip(cfg.optim), f"stages[{stage.name}].grad_clip"
                              if stage.grad_clip is not None else "optim.grad_clip"),
    }
    if cfg.optim.name == "came":  # DeepSpeed only runs optimizers outside its own list with this flag
        owned["zero_allow_untested_optimizer"] = (True, "optim.name=came")
    for key, (value, source) in owned.items():
        if key in ds and ds[key] != _AUTO and ds[key] != value:
            raise ConfigError(f"{path}: '{key}' = {ds[key]!r} conflicts with {source} = {value!r} in the run "
                              f"config; remove '{key}' from the JSON (the run config defines it)")
        ds[key] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: remove the '{section}' section; the trainer builds the optimizer and its "
                              f"LR schedule from the run config (optim.*, stages[].lr)")
    want = {"bf16": cfg.deepspeed.precision == "bf16", "fp16": False}
    for key, enabled in want.items():
        got = ds.get(key, {}).get("enabled", _AUTO)
        if got != _AUTO and bool(got) != enabled:
            raise ConfigError(f"{path}: '{key}.enabled' = {got!r} conflicts with deepspeed.precision = "
                             f"{cfg.deepspeed.precision!r}; remove '{key}' from the JSON")
        ds[key] = {**ds.get(key, {}), "enabled": enabled}
    if "zero_optimization" not in ds or "stage" not in ds["zero_optimization"]:
        raise ConfigError(f"{path}: needs zero_optimization.stage")
    if cfg.optim.name == "came":
        for keys, refused, why in CAME_REFUSED:
            node: Any = ds
            for k in keys:
                node = node.get(k) if isinstance(node, dict) else None
            if node is not None and refused(node, ds):
                raise ConfigError(f"{path}: '{'.'.join(keys)}' = {node!r} with optim.name=came ({why}); valid "
                                  f"combinations: came with the ZeRO-1/2/3 layouts of ds_configs/ (remove the key), "
                                  f"or optim.name=adamw")
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config["zero_optimization"]["stage"])
