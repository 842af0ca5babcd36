"""Test hooks that inject the faults the node-health tests need (environment variables; nothing happens without them).

    PIXELDIT_TEST_SLOW_RANK=R:S     rank R sleeps S seconds at the start of every step (a straggler;
                                    pixeldit.train.stragglers)
    PIXELDIT_TEST_HANG=R:N:S        rank R sleeps S seconds once, before step N (1-based): a stalled rank, whose
                                    peers' collective times out (pixeldit.train.collectives)
    PIXELDIT_TEST_SAVE_DELAY=N:S    rank 0 sleeps S seconds in the checkpoint save of step N, after the staging
                                    folder is complete and before it is published (SIGTERM during a save;
                                    pixeldit.train.checkpoint)
"""
from __future__ import annotations

import os
import time

SLOW_RANK_VAR = "PIXELDIT_TEST_SLOW_RANK"  # "R:S": rank R sleeps S seconds per step
HANG_VAR = "PIXELDIT_TEST_HANG"  # "R:N:S": rank R sleeps S seconds before step N (1-based)
SAVE_DELAY_VAR = "PIXELDIT_TEST_SAVE_DELAY"  # "N:S": rank 0 sleeps S seconds inside the save of step N


def _hook(var: str, parts: int) -> list[float] | None:
    raw = os.environ.get(var, "")
    if not raw:
        return None
    try:
        values = [float(v) for v in raw.split(":")]
    except ValueError:
        values = []
    if len(values) != parts:
        raise ValueError(f"{var}={raw!r}: expected {parts} numbers separated by ':' (see pixeldit.train.fault_hooks)")
    return values


def inject_step_faults(rank: int, step: int) -> None:
    """The test hooks (module docstring) before step ``step + 1`` runs; nothing without the variables."""
    slow = _hook(SLOW_RANK_VAR, 2)
    if slow is not None and int(slow[0]) == rank:
        time.sleep(slow[1])
    hang = _hook(HANG_VAR, 3)
    if hang is not None and int(hang[0]) == rank and int(hang[1]) == step + 1:
        time.sleep(hang[2])


def save_delay(step: int) -> None:
    """The ``PIXELDIT_TEST_SAVE_DELAY`` hook (called by rank 0 inside the save of ``step``, before it is
    published)."""
    delay = _hook(SAVE_DELAY_VAR, 2)
    if delay is not None and int(delay[0]) == step:
        time.sleep(delay[1])
