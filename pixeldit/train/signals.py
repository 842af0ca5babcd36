"""The one stop-signal mechanism: a signal raises a flag the trainer polls at every step boundary; SIGTERM also
arms a deadline after which the process leaves whatever its main thread is doing.

    stop = StopFlag(grace_s=3.0, dump_dir=log_dir(cfg)).install()   # pixeldit-train: SIGTERM, SIGUSR1, SIGUSR2
    run_training(cfg, stop_requested=stop)   # all ranks agree on the flag, save together, return "stopped"

SIGUSR1 / SIGUSR2 (SLURM's warning before the time limit) mean "save and stop at the next step boundary":
the handler only raises the flag (no checkpoint, no requeue, no exit from inside the handler, which could
interrupt a step or a collective).

SIGTERM (torchrun forwards it to its workers; SLURM sends it at scancel and at the end of the grace period)
must end the process within 5 s. It raises the same flag, so a step boundary reached in time stops and saves
as usual, and starts a watcher thread: if the process is still there ``grace_s`` seconds later (a step or a
save still running, a main thread stuck in a long C++ op or a blocked collective, which no Python handler can
interrupt), the watcher appends every thread's stack to ``{dump_dir}/stacks_{host}_rank{r}.txt``, flushes
stdout/stderr and leaves with ``os._exit(128 + SIGTERM)`` (143). The watcher learns of SIGTERM through
``signal.set_wakeup_fd`` (written by the C-level handler at once; the Python handler only runs when the main
thread is back in Python code), and arms ``faulthandler.dump_traceback_later`` (a C thread: it needs no GIL) one
second after the grace, for a main thread that holds the GIL in C code (stacks dumped, exit code 1). A save it
cuts short never touches ``latest``: checkpoint folders are built under a staging name and ``latest`` is replaced last (``pixeldit.train.checkpoint``),
so ``latest`` keeps naming the previous complete checkpoint. A second SIGTERM changes nothing.

A submitit job (``launchers.job``) installs the flag on its preemption signal only (USR2 unless submitit is
told otherwise), without the watcher, because there SIGTERM belongs to submitit ("cancelled").

``dump_stacks`` (also used by ``pixeldit.train.collectives`` on a failed collective) imports nothing heavy, so
the watcher never waits for an import.
"""
from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Iterable

LOG_DIR_VAR = "PIXELDIT_LOG_DIR"  # where stack dumps go: the job's log folder (set by a launcher); else {run_dir}/logs

# SIGTERM: torchrun / a scheduler stopping the run; SIGUSR1 / SIGUSR2: SLURM's warning before the time limit
# (sbatch --signal=USR2@120, or scancel --signal=USR2 JOBID by hand)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
TERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class StopFlag:
    """A flag set by a signal; calling the object says whether a stop was requested.

    ``grace_s``: after SIGTERM, seconds before the watcher ends the process (None: no watcher, SIGTERM only
    raises the flag); ``dump_dir``: where the watcher writes the stacks (None: no dump)."""

    def __init__(self, grace_s: float | None = None, dump_dir: str | os.PathLike | None = None) -> None:
        self._event = threading.Event()
        self.grace_s = grace_s
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self._watcher: threading.Thread | None = None
        self.terminated = False  # SIGTERM was received

    def install(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> "StopFlag":
        """Make each of ``signals`` set the flag (replacing their previous handlers); returns self. With a
        ``grace_s`` and SIGTERM among ``signals``, also start the watcher (call from the main thread)."""
        signals = list(signals)
        for sig in signals:
            signal.signal(sig, self._handle)
        if self.grace_s is not None and signal.SIGTERM in signals and self._watcher is None:
            # the C-level handler writes each signal's number into this pipe at once, whatever the main thread
            # is doing; the Python handler would only run once the main thread is back in Python code
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._watcher = threading.Thread(target=self._watch, args=(read_fd,), name="sigterm-watcher", daemon=True)
            self._watcher.start()
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self._event.set()
        if signum == signal.SIGTERM:
            self.terminated = True

    def leave_if_terminated(self) -> None:
        """After a run that SIGTERM stopped in time: flush and leave at once with exit code 143, skipping the
        interpreter's teardown (a full garbage collection of the trainer's heap holds the GIL for seconds on a
        loaded machine, past the grace)."""
        if self.terminated:
            _kill_children()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(TERM_EXIT_CODE)

    def _watch(self, read_fd: int) -> None:
        """The watcher: wait for SIGTERM, then ``grace_s``; then dump the stacks, flush and leave."""
        while signal.SIGTERM not in os.read(read_fd, 64):
            pass
        gc.disable()  # a collection of the trainer's heap, run by this thread, takes seconds on a loaded machine
        self.terminated = True
        self._event.set()  # also when the main thread cannot run its handler (stuck in C++ code)
        rank = int(os.environ.get("RANK", "0"))
        reason = (f"SIGTERM: still running {self.grace_s:g} s later (distributed.sigterm_grace_s); leaving with "
                  f"exit code {TERM_EXIT_CODE}, a save in progress is abandoned (latest unchanged)")
        backstop = self._arm_backstop(rank)
        time.sleep(self.grace_s)
        try:
            faulthandler.cancel_dump_traceback_later()
            if self.dump_dir is not None:
                dump_stacks(self.dump_dir, rank, reason)
            print(f"pixeldit-train: {reason}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 (leaving matters more than the dump: a full disk must not keep us here)
            pass
        finally:
            _kill_children()
            for stream in (sys.stdout, sys.stderr, backstop):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 (a closed stream)
                    pass
            os._exit(TERM_EXIT_CODE)

    def _arm_backstop(self, rank: int):
        """faulthandler's C watchdog (it needs no GIL): should this thread not get to run (a main thread holding
        the GIL in C code), it dumps every stack and exits (code 1) one second after the grace."""
        out = sys.stderr
        try:
            if self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                out = open(stack_file(self.dump_dir, rank), "a")
                out.write(f"=== pid {os.getpid()} rank {rank}: SIGTERM; armed: if the process is still there "
                          f"{self.grace_s + 1:g} s later, faulthandler dumps the stacks below and exits\n")
                out.flush()
        except OSError:
            out = sys.stderr
        faulthandler.dump_traceback_later(self.grace_s + 1.0, exit=True, file=out)
        return out

    def __call__(self) -> bool:
        return self._event.is_set()


def stack_file(folder: Path, rank: int) -> Path:
    """Where rank ``rank`` of this host writes its stacks."""
    return folder / f"stacks_{socket.gethostname()}_rank{rank}.txt"


def dump_stacks(folder: Path, rank: int, reason: str, err: BaseException | None = None) -> Path:
    """Append every thread's Python stack (and ``err``'s traceback) to this rank's stack file; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = stack_file(folder, rank)
    with open(path, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} rank {rank} host "
                f"{socket.gethostname()}: {reason}\n")
        if err is not None:
            f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        f.write("--- Python stacks of every thread:\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.write("\n")
    return path


def _kill_children() -> None:
    """SIGKILL this process's multiprocessing children (DataLoader workers): ``os._exit`` skips the exit handler
    that would end them, and they only notice a dead parent every few seconds."""
    try:
        for child in multiprocessing.active_children():
            child.kill()
    except Exception:  # noqa: BLE001 (best effort on the way out)
        pass
