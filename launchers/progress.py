"""Training progress of a submitted run, followed from outside the job: step, loss, steps/s, time left.

    follow_progress(run_dir, total_steps, done=job.done)     # returns when done() is true

The job's own progress bar goes to its log files (``pixeldit-submit tail``); this reads the run's
``losses.jsonl`` (one record per optimizer step, written by rank 0) from where it ended at the call, and
shows one live line: rewritten in place on a terminal, or printed every ``line_every_s`` seconds otherwise
(logs of CI or ``nohup`` stay short). The rate is the steps seen over the last ``window_s`` seconds of wall
time, so it includes data loading, checkpoints and stage changes; the time left is the remaining steps at
that rate.
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from pixeldit.run_folder import LOSSES


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class ProgressReader:
    """Reads the step records appended to ``{run_dir}/losses.jsonl`` since ``offset`` (whole lines only)."""

    path: Path
    offset: int = 0
    _partial: bytes = b""

    @classmethod
    def from_end(cls, run_dir: str | Path) -> "ProgressReader":
        """A reader that skips what the file already holds (records of an earlier job of the run)."""
        path = Path(run_dir) / LOSSES
        return cls(path, path.stat().st_size if path.exists() else 0)

    def new_records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = self._partial + f.read()
        self.offset += len(data) - len(self._partial)
        *lines, self._partial = data.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


@dataclass
class ProgressLine:
    """The state behind the live line: last step, loss, and (time, step) samples for the rate."""

    total_steps: int
    window_s: float = 60.0
    step: int = 0
    stage: int = 0
    loss: float | None = None
    samples: deque = field(default_factory=deque)  # (wall time, step)

    def update(self, records: list[dict], now: float) -> None:
        for r in records:
            self.step, self.stage = int(r["step"]), int(r.get("stage", 0))
            if r.get("loss") is not None and r["loss"] == r["loss"]:  # skip NaN of a skipped step
                self.loss = float(r["loss"])
        self.samples.append((now, self.step))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Steps per second over the window, None before two samples with progress between them."""
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def text(self) -> str:
        if self.step == 0:
            return "waiting for the first step (the job loads data and builds the model)"
        rate = self.rate()
        loss = f"loss {self.loss:.4f}" if self.loss is not None else "loss -"
        speed = f"{rate:.1f} steps/s, {format_duration((self.total_steps - self.step) / rate)} left" if rate else \
            "measuring speed"
        return f"step {self.step}/{self.total_steps} (stage {self.stage})  {loss}  {speed}"


def follow_progress(run_dir: str | Path, total_steps: int, done: Callable[[], bool], *, prefix: str = "",
                    interval_s: float = 1.0, line_every_s: float = 30.0, window_s: float = 60.0,
                    stream: TextIO | None = None, reader: ProgressReader | None = None) -> ProgressLine:
    """Show the run's progress until ``done()`` is true; returns the final state.

    ``reader`` defaults to one that starts at the current end of losses.jsonl: make it before submitting when
    the run folder may already hold records of an earlier job.
    """
    stream = stream or sys.stdout
    live = stream.isatty()
    reader = reader or ProgressReader.from_end(run_dir)
    line = ProgressLine(total_steps, window_s)
    last_print = float("-inf")
    while True:
        finished = done()
        now = time.monotonic()
        line.update(reader.new_records(), now)
        if live:
            stream.write(f"\r\x1b[2K{prefix}{line.text()}")
            stream.flush()
        elif finished or now - last_print >= line_every_s:
            print(f"{prefix}{line.text()}", file=stream, flush=True)
            last_print = now
        if finished:
            break
        time.sleep(interval_s)
    if live:
        stream.write("\n")
        stream.flush()
    return line
