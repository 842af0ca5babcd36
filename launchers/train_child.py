"""The trainer process of one task, started by its supervisor (``launchers.supervisor``), not by hand.

    python -m launchers.train_child RUN_CONFIG --result R.json --stack-dump S.txt [--evals JSON]

Distributed variables, ``PIXELDIT_HEARTBEAT`` and the job id/attempt come from the environment the supervisor
set. At start it registers ``faulthandler`` on ``STACK_DUMP_SIGNAL`` (every thread's Python stack appended to
``--stack-dump``) and the ``StopFlag`` on the preemption signal; then ``run_training`` (on global rank 0 with
the eval-job hook when ``--evals`` is given), and the run's summary into ``--result`` (atomically). Exit codes:
0 with a result; 2 for a user error (``pixeldit.errors.USER_ERRORS``: a restart would repeat it); 1 otherwise.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import traceback

from pixeldit.errors import EXIT_USER_ERROR, USER_ERRORS
from pixeldit.storage import write_json_atomic
from pixeldit.train.signals import StopFlag

from .supervisor import PREEMPT_SIGNAL, STACK_DUMP_SIGNAL


def command(config_path: str, result: str, stack_dump: str, evals: dict | None) -> list[str]:
    """The child's command line (this Python, this module)."""
    cmd = [sys.executable, "-u", "-m", "launchers.train_child", config_path, "--result", result,
           "--stack-dump", stack_dump]
    return cmd + (["--evals", json.dumps(evals)] if evals is not None else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launchers.train_child", description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--result", required=True)
    ap.add_argument("--stack-dump", required=True)
    ap.add_argument("--evals", default=None, help="launchers.eval_jobs.EvalJobConfig.to_dict() as JSON")
    a = ap.parse_args(argv)
    dump = open(a.stack_dump, "a")  # kept open for the life of the process: faulthandler writes to its fd
    faulthandler.register(STACK_DUMP_SIGNAL, file=dump, all_threads=True)
    stop = StopFlag().install([PREEMPT_SIGNAL])
    from pixeldit.train.config import load_config
    from pixeldit.train.trainer import run_training

    try:
        cfg = load_config(a.config, [])
        hook = None
        if a.evals is not None and int(os.environ.get("RANK", "0")) == 0:
            from .eval_jobs import EvalJobConfig, EvalScheduler

            hook = EvalScheduler(cfg.run_dir, EvalJobConfig(**json.loads(a.evals)), cfg.checkpoint.every,
                                 cfg.total_steps)
        result = run_training(cfg, stop_requested=stop, on_checkpoint=hook)
    except USER_ERRORS:
        traceback.print_exc()
        return EXIT_USER_ERROR
    write_json_atomic(a.result, {"status": result.status, "step": result.step, "stage": result.stage,
                                 "checkpoint": result.checkpoint})
    return 0


if __name__ == "__main__":
    sys.exit(main())
