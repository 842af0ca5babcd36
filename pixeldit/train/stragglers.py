"""The straggler report: per-rank step-time percentiles every ``straggler.every`` steps, slow ranks flagged.

    monitor = StragglerMonitor(cfg.straggler, rank, world, device)   # collective (hostnames, once)
    monitor.add(phases.until_sync_s())          # every step, no communication
    if monitor.due(step): report = monitor.report(step)   # collective: one all_gather of 4 floats per rank

What is timed: a rank's own part of a step, from the step's start to its first wait for the other ranks (the
step's stats all-reduce, ``StepPhases.until_sync_s``: data wait, forward passes and the backward passes of
earlier micro-batches; host clock on the CPU, CUDA events on a GPU). The whole step's wall time is the same on
every rank (the collectives line them up), so it cannot tell the slow rank; this part can.

Every window each rank reduces its times to (p50, p90, max, count); one ``all_gather`` brings every rank's
four floats to every rank, and all ranks take the same decisions. A rank whose p50 is more than
``straggler.threshold`` (0.2: 20 %) above the median of the ranks' p50 is slow in that window; slow for
``straggler.windows`` consecutive windows it is flagged, with its host and rank, in the log line, the record
(``{run_dir}/metrics.jsonl``, kind "straggler") and wandb (``straggler/*``).

A test slows one rank with ``PIXELDIT_TEST_SLOW_RANK`` (``pixeldit.train.fault_hooks``).
"""
from __future__ import annotations

import socket
import statistics
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import StragglerSection

def window_stats(times: list[float]) -> tuple[float, float, float]:
    """(p50, p90, max) of a window of step times."""
    arr = np.asarray(times, dtype=np.float64)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 90)), float(arr.max())


def slow_ranks(p50: list[float], threshold: float) -> tuple[float, list[int]]:
    """(median of the ranks' p50, ranks whose p50 is more than ``threshold`` above it)."""
    median = statistics.median(p50)
    return median, [r for r, v in enumerate(p50) if v > (1.0 + threshold) * median]


class StragglerMonitor:
    """Per-rank step-time windows and the slow-rank streaks (module docstring)."""

    def __init__(self, cfg: StragglerSection, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.window: list[float] = []
        self.streak = [0] * world
        hosts: list[Any] = [socket.gethostname()]
        if cfg.every and world > 1 and dist.is_initialized():
            hosts = [None] * world
            dist.all_gather_object(hosts, socket.gethostname())
        self.hosts = [str(h) for h in hosts]

    def add(self, seconds: float | None) -> None:
        if seconds is not None and self.cfg.every:
            self.window.append(seconds)

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def report(self, step: int) -> tuple[dict[str, Any], dict[str, float], str]:
        """Collective: (metrics record, wandb values, log line) of the window ending at ``step``; starts a new one."""
        mine = [*window_stats(self.window), float(len(self.window))] if self.window else [0.0, 0.0, 0.0, 0.0]
        self.window = []
        local = torch.tensor(mine, dtype=torch.float64, device=self.device)
        if self.world > 1 and dist.is_initialized():
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            rows = [p.cpu().tolist() for p in parts]
        else:
            rows = [mine]
        timed = [r for r in range(self.world) if rows[r][3] > 0]
        median, slow = slow_ranks([rows[r][0] for r in timed], self.cfg.threshold) if timed else (0.0, [])
        slow = [timed[i] for i in slow]
        self.streak = [self.streak[r] + 1 if r in slow else 0 for r in range(self.world)]
        flagged = [r for r in range(self.world) if self.streak[r] >= self.cfg.windows]
        ranks = [{"rank": r, "host": self.hosts[r] if r < len(self.hosts) else "?", "p50_s": rows[r][0],
                  "p90_s": rows[r][1], "max_s": rows[r][2], "steps": int(rows[r][3]), "slow_windows": self.streak[r]}
                 for r in range(self.world)]
        record = {"step": step, "kind": "straggler", "median_p50_s": median, "threshold": self.cfg.threshold,
                  "ranks": ranks, "flagged": [{"rank": r, "host": ranks[r]["host"],
                                               "slower_by": ranks[r]["p50_s"] / median - 1.0 if median else None}
                                              for r in flagged]}
        values = {"straggler/median_p50_s": median, "straggler/flagged": float(len(flagged)),
                  **{f"straggler/rank{r}_p50_s": rows[r][0] for r in range(self.world)}}
        return record, values, self._line(step, ranks, median, flagged)

    def _line(self, step: int, ranks: list[dict[str, Any]], median: float, flagged: list[int]) -> str:
        fastest = min(ranks, key=lambda r: r["p50_s"])
        slowest = max(ranks, key=lambda r: r["p50_s"])
        line = (f"step {step}: rank step times (to the first sync) p50 median {median:.3f} s; fastest rank "
                f"{fastest['rank']} ({fastest['host']}) {fastest['p50_s']:.3f} s; slowest rank {slowest['rank']} "
                f"({slowest['host']}) p50/p90/max {slowest['p50_s']:.3f}/{slowest['p90_s']:.3f}/"
                f"{slowest['max_s']:.3f} s")
        for r in flagged:
            row = ranks[r]
            line += (f"\nSTRAGGLER: rank {r} on host {row['host']} is {100 * (row['p50_s'] / median - 1):.0f}% slower "
                     f"than the median of ranks ({row['p50_s']:.3f} s vs {median:.3f} s) for {row['slow_windows']} "
                     f"consecutive windows of {self.cfg.every} steps")
        return line
