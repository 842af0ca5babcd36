"""The one stop-signal mechanism: a signal only raises a flag; the trainer polls it at every step boundary.

    stop = StopFlag().install()              # pixeldit-train: SIGTERM, SIGUSR1, SIGUSR2
    run_training(cfg, stop_requested=stop)   # all ranks agree on the flag, save together, return "stopped"

The handler does nothing else (no checkpoint, no requeue, no exit from inside the handler, which could
interrupt a step or a collective). A submitit job (``launchers.job``) installs the same flag on its
preemption signal only (USR2 unless submitit is told otherwise), because there SIGTERM means "cancelled".
"""
from __future__ import annotations

import signal
import threading
from typing import Iterable

# SIGTERM: torchrun / a scheduler stopping the run; SIGUSR1 / SIGUSR2: SLURM's warning before the time limit
# (sbatch --signal=USR2@120, or scancel --signal=USR2 JOBID by hand)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """A flag set by a signal; calling the object says whether a stop was requested."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> "StopFlag":
        """Make each of ``signals`` set the flag (replacing their previous handlers); returns self."""
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()
