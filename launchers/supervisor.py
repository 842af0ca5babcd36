"""The supervisor of one task: the trainer runs as its child process; this watches it and says how it ended.

    sup = Supervisor(cmd, env, paths, WatchdogLimits.from_launch(launch), rank=1, host="n2")
    outcome = sup.run()    # ChildOutcome: finished / stopped / failed / cancelled, reason, primary, ...

- the child is ``python -m launchers.train_child`` (same Python, same environment plus the distributed
  variables and ``PIXELDIT_HEARTBEAT``); it dies with its supervisor (``PR_SET_PDEATHSIG``), so a lost supervisor
  never leaves a trainer running;
- the preemption signal (USR2) reaching the supervisor is forwarded to the child, whose ``StopFlag`` saves at the
  next step boundary; SIGTERM (scancel, or SLURM's own requeue) is forwarded too and makes the outcome "cancelled";
- the watchdog reads the child's heartbeat (``pixeldit.train.heartbeat``). No new beat for
  ``WatchdogLimits.limit`` seconds is a stall: the supervisor notes the child's process state (T: stopped), sends
  ``STACK_DUMP_SIGNAL`` (the child registered ``faulthandler`` on it, writing every thread's Python stack into
  ``paths.stacks``), then SIGCONT so a stopped child runs the dump, waits ``DUMP_WAIT_S``, and SIGKILLs it;
- how the child ended: exit 0 with its result file -> "finished" or "stopped" (a saved stop); anything else is
  "failed": a non-zero exit, a death by a signal (kill -9, the kernel's OOM killer: SIGKILL), a watchdog kill.
  ``primary`` marks a failure of this task's own trainer: killed by a signal, or hung while NOT waiting in a
  collective (a stopped process, or a stack whose innermost frames are not in torch.distributed / deepspeed.comm).
  A trainer that exits with an error after its peer died, or hangs in a collective waiting for it, is not primary.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit import JobEnvironment

from pixeldit.train.heartbeat import read_heartbeat

# what SLURM sends --signal-delay-s before the limit (sbatch --signal=USR2@delay; submitit's choice, USR2
# unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
PREEMPT_SIGNAL = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
STACK_DUMP_SIGNAL = signal.SIGUSR1 if PREEMPT_SIGNAL != signal.SIGUSR1 else signal.SIGUSR2
DUMP_WAIT_S = 5.0  # for the dump after SIGCONT, before SIGKILL
POLL_S = 0.5
COLLECTIVE_FRAMES = ("torch/distributed/", "deepspeed/comm/")  # a stack waiting in a collective ends here
PR_SET_PDEATHSIG = 1


@dataclass
class WatchdogLimits:
    floor_s: float
    factor: float
    startup_s: float

    @classmethod
    def from_launch(cls, launch: Any) -> "WatchdogLimits":
        return cls(launch.watchdog_floor_s, launch.watchdog_factor, launch.watchdog_startup_s)

    def limit(self, heartbeat: dict[str, Any] | None) -> float:
        """Seconds without a new beat that make a stall: the start-up window before a stage's first step."""
        if heartbeat is None or heartbeat["phase"] == "start" or heartbeat["median_step_s"] is None:
            return self.startup_s
        return max(self.floor_s, self.factor * heartbeat["median_step_s"])


@dataclass
class ChildPaths:
    heartbeat: Path
    result: Path  # the child's run summary (JSON), written when run_training returns
    stacks: Path  # faulthandler's stack dumps


def child_paths(folder: str | Path, job_id: str, rank: int, attempt: int) -> ChildPaths:
    """The child's files of one task in the submission folder (next to submitit's ``{job_id}_{rank}_log.*``)."""
    base = Path(folder) / f"{job_id}_{rank}"
    return ChildPaths(Path(f"{base}_heartbeat.json"), Path(f"{base}_child_result.json"),
                      Path(f"{base}_stacks_attempt{attempt}.txt"))


@dataclass
class ChildOutcome:
    outcome: str  # launchers.attempts.Outcome
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    primary: bool = False
    certain: bool = False  # primary beyond doubt: killed by a signal not its watchdog's, or found stopped
    step: int | None = None
    stack_dump: str | None = None
    result: dict[str, Any] | None = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (R, S, D, T: stopped, Z, ...), "?" if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def waiting_in_collective(dump: str) -> bool:
    """Whether a faulthandler dump shows a thread whose innermost Python frame is a collective (or its wait)."""
    innermost, expect = [], False
    for line in dump.splitlines():
        if "most recent call first" in line:
            expect = True
        elif expect and line.strip().startswith("File "):
            innermost.append(line)
            expect = False
    return any(mark in line for line in innermost for mark in COLLECTIVE_FRAMES)


class Supervisor:
    """Runs one child trainer and watches it (module docstring)."""

    def __init__(self, cmd: list[str], env: dict[str, str], paths: ChildPaths, limits: WatchdogLimits, rank: int,
                 host: str):
        self.cmd, self.env, self.paths, self.limits = cmd, env, paths, limits
        self.rank, self.host = rank, host
        self.child: subprocess.Popen | None = None
        self.terminated = False  # SIGTERM reached the supervisor: the job is cancelled or requeued by SLURM

    def where(self) -> str:
        return f"on {self.host} (rank {self.rank})"

    def _forward(self, signum: int, frame: object) -> None:
        if signum == signal.SIGTERM:
            self.terminated = True
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signum)
            except ProcessLookupError:
                pass

    def run(self) -> ChildOutcome:
        for path in (self.paths.heartbeat, self.paths.result):
            path.unlink(missing_ok=True)  # an earlier attempt's files say nothing about this one
        previous = {s: signal.signal(s, self._forward) for s in (PREEMPT_SIGNAL, signal.SIGTERM)}
        try:
            self.child = subprocess.Popen(self.cmd, env=self.env, preexec_fn=_die_with_parent)
            return self._watch(self.child)
        finally:
            if self.child is not None and self.child.poll() is None:  # the supervisor itself was interrupted
                self.child.kill()
                self.child.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self, child: subprocess.Popen) -> ChildOutcome:
        last_change, seen = time.monotonic(), None
        while True:
            code = child.poll()
            if code is not None:
                return self._ended(code, read_heartbeat(self.paths.heartbeat))
            beat = read_heartbeat(self.paths.heartbeat)
            key = None if beat is None else (beat["step"], beat["phase"], beat["time"])
            if key != seen:
                seen, last_change = key, time.monotonic()
            silent, limit = time.monotonic() - last_change, self.limits.limit(beat)
            if silent > limit and not self.terminated:
                return self._stalled(child, beat, silent, limit)
            time.sleep(POLL_S)

    def _ended(self, code: int, beat: dict[str, Any] | None) -> ChildOutcome:
        step = beat["step"] if beat else None
        if self.terminated:
            return ChildOutcome("cancelled", f"cancelled (SIGTERM) {self.where()}", code if code >= 0 else None,
                                -code if code < 0 else None, step=step)
        if code < 0:
            name = signal_name(-code)
            return ChildOutcome("failed", f"trainer killed by signal {-code} ({name}) {self.where()} at step {step}",
                                signal=-code, primary=True, certain=True, step=step)
        if code != 0:
            return ChildOutcome("failed", f"trainer exited with code {code} {self.where()} at step {step}", code,
                                step=step)
        if not self.paths.result.exists():
            return ChildOutcome("failed", f"trainer exited 0 without a result {self.where()}", 0, step=step)
        result = json.loads(self.paths.result.read_text())
        outcome = "finished" if result["status"] == "finished" else "stopped"
        return ChildOutcome(outcome, f"{outcome} at step {result['step']}", 0, step=result["step"], result=result)

    def _stalled(self, child: subprocess.Popen, beat: dict[str, Any] | None, silent: float,
                 limit: float) -> ChildOutcome:
        state = process_state(child.pid)
        size_before = self.paths.stacks.stat().st_size if self.paths.stacks.exists() else 0
        for sig in (STACK_DUMP_SIGNAL, signal.SIGCONT):
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                break
        deadline = time.monotonic() + DUMP_WAIT_S
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)  # the dump is written from a C signal handler: at once once the child runs
        if child.poll() is None:
            child.kill()
        child.wait()
        dump = ""
        if self.paths.stacks.exists():
            with open(self.paths.stacks, errors="replace") as f:
                f.seek(size_before)
                dump = f.read()
        in_collective = waiting_in_collective(dump)
        primary = state == "T" or not in_collective
        last = "before its first heartbeat" if beat is None else f"last: {beat['phase']} at step {beat['step']}"
        how = ("stopped (SIGSTOP)" if state == "T" else
               "waiting in a collective" if in_collective else f"state {state}, not in a collective")
        reason = (f"watchdog stall {self.where()} after {silent:.0f} s without a heartbeat (limit {limit:.0f} s, "
                  f"{last}); trainer {how}; stacks in {self.paths.stacks.name}")
        print(f"[supervisor] {reason}", file=sys.stderr, flush=True)
        return ChildOutcome("failed", reason, signal=signal.SIGKILL, primary=primary, certain=state == "T",
                            step=beat["step"] if beat else None,
                            stack_dump=str(self.paths.stacks) if dump else None)
