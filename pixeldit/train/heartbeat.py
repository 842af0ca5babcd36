"""The trainer's per-rank heartbeat: a small JSON file a supervisor watches to tell a live rank from a hung one.

    heartbeat = build_heartbeat(rank)          # PIXELDIT_HEARTBEAT unset: a no-op object
    heartbeat.beat("start", step)              # after start-up (each stage: engine built, checkpoint loaded)
    heartbeat.beat("step", step, seconds)      # after every optimizer step (its wall time)
    heartbeat.beat("save", step)               # after every checkpoint save ("validation" likewise)
    heartbeat.beat("done", step)               # the run returned

The file (the path in ``PIXELDIT_HEARTBEAT``) holds ONE record, rewritten atomically
(``pixeldit.storage.write_text_atomic``) at each beat::

    {"rank": 1, "host": "n2", "pid": 4242, "step": 17, "time": 1767000000.0, "phase": "step",
     "median_step_s": 0.84}

``median_step_s`` is the median wall time of the last ``WINDOW`` steps (None before the first step). A beat costs
one small write and a rename, without fsync (a crash may lose a beat, a reader never sees half of one): no
collective, no device synchronisation (the step's time is the host time the trainer measures anyway). A rename
over a file can still take milliseconds on a busy disk, so "step" beats are written at most every
``MIN_INTERVAL_S`` (every step's time still enters the median); every other phase is written at once.
The launcher's supervisor (``launchers.supervisor``) reads it with ``read_heartbeat``; this module owns the
record's fields.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal, get_args

from pixeldit.storage import write_text_atomic

HEARTBEAT_VAR = "PIXELDIT_HEARTBEAT"  # the file path; set by the launcher's supervisor for its child
Phase = Literal["start", "step", "save", "validation", "done"]
PHASES: tuple[str, ...] = get_args(Phase)
FIELDS = ("rank", "host", "pid", "step", "time", "phase", "median_step_s")
WINDOW = 32  # steps in the median
MIN_INTERVAL_S = 1.0  # between two written "step" beats (the watchdog's limits are much longer)


class Heartbeat:
    """Writes the heartbeat record of one rank; with ``path=None`` every call does nothing."""

    def __init__(self, path: str | os.PathLike | None, rank: int, min_interval_s: float = MIN_INTERVAL_S):
        self.path = Path(path) if path else None
        self.rank, self.min_interval_s = rank, min_interval_s
        self.written_at = float("-inf")  # time.monotonic() of the last write
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # several slurmd may share a host
        self.step_seconds: deque[float] = deque(maxlen=WINDOW)

    def beat(self, phase: Phase, step: int, step_seconds: float | None = None) -> None:
        """Record that the rank finished ``phase`` at optimizer step ``step`` (``step_seconds``: that step's
        wall time, for phase "step")."""
        if self.path is None:
            return
        if phase not in PHASES:
            raise ValueError(f"heartbeat phase {phase!r}; valid values: {', '.join(PHASES)}")
        if step_seconds is not None:
            self.step_seconds.append(float(step_seconds))
        now = time.monotonic()
        if phase == "step" and now - self.written_at < self.min_interval_s:
            return
        self.written_at = now
        record = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": int(step), "time": time.time(),
                  "phase": phase, "median_step_s": self.median_step_s()}
        write_text_atomic(self.path, json.dumps(record), durable=False)  # atomic, no fsync: a beat is cheap

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None


def build_heartbeat(rank: int) -> Heartbeat:
    """The heartbeat of this rank: to the file named by ``PIXELDIT_HEARTBEAT``, or a no-op when it is unset."""
    return Heartbeat(os.environ.get(HEARTBEAT_VAR) or None, rank)


def read_heartbeat(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last record written to ``path``, or None while there is none (atomic writes: never a partial one)."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"heartbeat file {path}: fields {missing} missing; it is written by "
                         f"pixeldit.train.heartbeat (is another program writing to it?)")
    return record
