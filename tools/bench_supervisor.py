"""What a job's per-task supervisor costs to start: peak memory (RSS) and CPU seconds of a fresh process that
imports what it runs (``launchers.job``, ``launchers.supervisor``, ``launchers.train_child``), side by side with
the same process also importing torch (what the supervisor loaded before it stopped importing the trainer's
modules), alternating, ``--repeats`` times each, in one run.

    python -m tools.bench_supervisor --repeats 5

One supervisor runs per task, i.e. per GPU, for the whole job: 8 per node. Results: tools/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPERVISOR = "import launchers.job, launchers.supervisor, launchers.train_child"
CASES = {"supervisor (now)": SUPERVISOR, "supervisor + torch (before)": SUPERVISOR + "; import torch"}


def measure(code: str) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of ``python -c code`` in a fresh process (its own rusage, from wait4)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{code!r} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    rss: dict[str, float] = {}
    cpu: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(a.repeats):
        for name, code in CASES.items():
            peak, seconds = measure(code)
            rss[name] = max(rss.get(name, 0.0), peak)
            cpu[name].append(seconds)
    print(f"load average {os.getloadavg()[0]:.2f}, {a.repeats} runs each, alternating")
    for name in CASES:
        print(f"{name:30s} peak RSS {rss[name]:7.1f} MB   CPU {statistics.median(cpu[name]):5.2f} s (median)")
    now, before = CASES
    print(f"ratio: memory {rss[before] / rss[now]:.1f}x, CPU {statistics.median(cpu[before]) / statistics.median(cpu[now]):.1f}x")


if __name__ == "__main__":
    main()
