"""The console scripts as pyproject.toml declares them, and one way to run a config through them.

``console_scripts()`` reads the ``[project.scripts]`` table of the source tree (not the installed metadata,
which may be older than the tree); ``entry_point(name)`` imports the function behind a script.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """{script name: "module:function"} of pyproject.toml's [project.scripts]."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    assert section, "pyproject.toml has no [project.scripts] table"
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', section.group(1), re.M))


def entry_point(script: str) -> Callable[[list[str]], int]:
    module, func = console_scripts()[script].split(":")
    return getattr(importlib.import_module(module), func)


def debug_run_config(path: Path, run_dir: Path, data: Path, zero: str = "zero2", steps: int = 1, **top) -> Path:
    """A one-stage CPU run of the debug model on ``data`` (tests/train_helpers.write_tiny_dataset), as YAML."""
    cfg = {"run_dir": str(run_dir), "model": {"size": "debug"}, "deepspeed": {"zero": zero, "precision": "fp32"},
           "data": {"num_workers": 0}, "logging": {"wandb": "disabled", "progress_bar": False},
           "stages": [{"name": "s", "steps": steps, "data_path": str(data), "resolution": 32, "bucket_align": 16,
                       "micro_batch": 2, "lr": 1e-3}], **top}
    path.write_text(yaml.safe_dump(cfg))
    return path
