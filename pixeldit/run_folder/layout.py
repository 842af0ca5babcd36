"""The names of the run-folder format (the package docstring draws the tree): constants, paths, ``meta.json``
and the ``latest`` pointer (read and written here; which folder to trust is ``integrity``)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pixeldit.errors import CheckpointError
from pixeldit.storage import TMP_MARK, is_tmp, write_json_atomic, write_text_atomic

RUN_CONFIG = "config.yaml"
LOSSES = "losses.jsonl"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
STEP_PREFIX = "step_"
UNIVERSAL_PREFIX = "universal_"
EMA_FILE = "ema_rank{rank:05d}.pt"
RNG_FILE = "rng_rank{rank:05d}.pt"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
HASH = "sha256"
VERIFY_MODES = ("size", "full")  # checkpoint_problem: sizes only (a stat per file), or sizes and SHA-256
METRICS = "metrics.jsonl"
EVALS = "evals"
# metrics.jsonl "kind": the trainer's validation loss, an eval job's results, the runtime preflight of every start
# (pixeldit.train.node_check), a straggler window (pixeldit.train.stragglers)
METRIC_KINDS = ("val", "eval", "preflight", "straggler")
LOCK = "trainer.lock"  # {run_dir}/trainer.lock: the trainer holding the run folder (pixeldit.train.run_lock)
LATEST_MAX_BYTES = 256
EMA_LAYOUTS = ("full", "zero3")
STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d+)")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def staging_dirname(step: int) -> str:
    """The folder every rank writes step ``step`` into before rank 0 renames it: one name all ranks agree on,
    recognised as a leftover by ``pixeldit.storage.is_tmp``."""
    return f".{step_dirname(step)}{TMP_MARK}all-ranks"


def is_save_leftover(name: str) -> bool:
    """A staging or replaced step folder, or a temp ``latest``, left by an interrupted save (never read).
    Other temp names (e.g. a universal conversion in progress) are not a save's to delete."""
    return is_tmp(name) and name.startswith((f".{STEP_PREFIX}", f".{LATEST}"))


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK


def preview_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SAMPLES / f"{step_dirname(step)}.png"


def step_dirs(checkpoints: str | os.PathLike) -> list[Path]:
    """The complete step folders under ``checkpoints``, oldest first."""
    root = Path(checkpoints)
    found = [p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_NAME.fullmatch(p.name).group(1)))


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(step_dir) / META
    if not path.exists():
        raise CheckpointError(f"{path} not found: {step_dir} is not a complete checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged: use an older "
                              f"step folder") from None


def write_meta(step_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    write_json_atomic(Path(step_dir) / META, meta)


def latest_name(checkpoints: str | os.PathLike) -> str | None:
    """The step folder name held by ``checkpoints/latest``; None when there is no pointer.

    Raises ``CheckpointError`` when the pointer is not a step folder name (binary garbage, empty, oversized).
    """
    pointer = Path(checkpoints) / LATEST
    try:
        with open(pointer, "rb") as f:
            raw = f.read(LATEST_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is damaged (not text)") from None
    if len(raw) > LATEST_MAX_BYTES or not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} is damaged (holds {name[:40]!r}, not a {STEP_PREFIX}N folder name)")
    return name


def step_of(step_dir: str | os.PathLike) -> int:
    """The step number of a step folder name or path."""
    m = STEP_NAME.fullmatch(Path(step_dir).name)
    if m is None:
        raise ValueError(f"{step_dir}: not a {STEP_PREFIX}N folder")
    return int(m.group(1))


def write_latest(checkpoints: str | os.PathLike, step_dir: str | os.PathLike) -> None:
    write_text_atomic(Path(checkpoints) / LATEST, Path(step_dir).name)


def universal_dirname(step_dir: str | os.PathLike) -> str:
    return UNIVERSAL_PREFIX + Path(step_dir).name


def is_universal_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DeepSpeed universal checkpoint folder of ours (a ``zero/`` folder and meta.json)."""
    p = Path(path)
    return (p / "zero").is_dir() and (p / META).exists()


def rank_files(step_dir: str | os.PathLike) -> list[Path]:
    """Our per-rank files of a step folder (EMA and RNG), in the order of their names."""
    prefixes = (EMA_FILE.split("{")[0], RNG_FILE.split("{")[0])
    return sorted(f for f in Path(step_dir).iterdir() if f.is_file() and f.name.startswith(prefixes))


def eval_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the eval job of step ``step``: ``{run_dir}/evals/step_{N:08d}``."""
    return Path(run_dir) / EVALS / step_dirname(step)
