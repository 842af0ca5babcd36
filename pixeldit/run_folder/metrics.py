"""``{run_dir}/metrics.jsonl``: evaluation records keyed by step, appended by the trainer and eval jobs at once."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pixeldit.errors import CheckpointError

from .layout import METRIC_KINDS, METRICS


def append_metrics(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record ({"step": int, "kind": METRIC_KINDS, metric: value, ...}) to ``{run_dir}/metrics.jsonl``
    as one strict-JSON line, under an exclusive lock: the trainer and eval jobs append to it concurrently."""
    import fcntl

    if record.get("kind") not in METRIC_KINDS or not isinstance(record.get("step"), int):
        raise ValueError(f"metrics record needs an integer step and kind in {METRIC_KINDS}, got {record}")
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    path = Path(run_dir) / METRICS
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``{run_dir}/metrics.jsonl`` in file order ([] without the file). A step re-run after a
    resume appends its record again: readers take the last record of a (step, kind)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):  # a line cut by a crash mid-write: the last one only
                break
            raise CheckpointError(f"{path}:{n} is not valid JSON ({err})") from None
    return records
