"""pixeldit-submit: submit training runs to SLURM or the local executor; status, tail, cancel.

    pixeldit-submit submit --config run.yaml --cluster slurm --nodes 4 --gpus-per-node 8 --partition gpu \\
        --time-min 2880 --max-requeues 10 run_dir=/shared/runs/t2i stages.0.lr=2e-4
    pixeldit-submit submit --config run.yaml --array seed=1,2,3      # job array: {run_dir}/seed-1, seed-2, ...
    pixeldit-submit submit --config a.yaml --config b.yaml           # job array: one task per config
    pixeldit-submit status runs/t2i                                  # + eval jobs: step, state, metrics
    pixeldit-submit tail runs/t2i -n 50
    pixeldit-submit cancel runs/t2i

The whole curriculum of a run config (all its stages) runs in one job; on preemption or time limit (USR2)
the job saves at the next step boundary, requeues itself and resumes from the latest checkpoint.
The default cluster is the local executor (this machine, no SLURM). The run config and the files it names
are checked before anything is submitted; a mistake is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from pixeldit.cluster import LaunchConfig, add_launch_flags, launch_config_from_args, parse_key_value
from pixeldit.errors import CliParser, UserError, cli_main

from .manage import cancel, eval_status, format_eval_status, format_status, status, tail
from .submit import job_result, prepare_run, submit, submit_array, sweep_overrides

PROG = "pixeldit-submit"


def _axis(text: str) -> tuple[str, list[str]]:
    k, v = parse_key_value(text)
    return k, [x for x in v.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a run (or a job array of runs)")
    s.add_argument("--config", action="append", default=None, help="run config YAML (repeat: a job array)")
    s.add_argument("--array", type=_axis, action="append", default=[], metavar="KEY=V1,V2",
                   help="job array over values of a run-config key, each in {run_dir}/KEY-V (repeat: product)")
    add_launch_flags(s)  # pixeldit.cluster: the one definition of the launch flags (pixeldit-data has them too)
    s.add_argument("--eval", default=None, metavar="EVAL.yaml",
                   help="eval jobs every K checkpoints: every, launch (the eval job's resources), protocol, "
                        "resources (launchers.eval_jobs); one run only")
    s.add_argument("--force", action="store_true", help="submit even if a job of the run is still active")
    s.add_argument("--wait", action="store_true", help="block until the job(s) end and print rank 0's result")
    s.add_argument("overrides", nargs="*", help="run config overrides a.b=c (CLI > file > defaults)")
    p = sub.add_parser("status", help="the run's jobs (state, result, requeues), then its eval jobs (the "
                                      "checkpoint step, state, metrics or error)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="one JSON object per job (eval jobs: kind \"eval\")")
    p = sub.add_parser("tail", help="last log lines of every task of the newest job")
    p.add_argument("run_dir")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("--job", default=None, help="an older job of the run (default: the newest)")
    p = sub.add_parser("cancel", help="cancel the run's unfinished jobs (no save; resubmit to resume)")
    p.add_argument("run_dir")
    return ap


def launch_config(a: argparse.Namespace) -> LaunchConfig:
    return launch_config_from_args(a)


def _submit(a: argparse.Namespace) -> int:
    launch = launch_config(a)
    configs = a.config or [None]
    evals = None
    if a.eval is not None:
        from .eval_jobs import EvalJobConfig

        if a.array or len(configs) > 1:
            raise UserError("--eval works with one run (not --array or several --config)")
        evals = EvalJobConfig.load(a.eval)
    if a.array:
        base_run_dir, _ = prepare_run(configs[0], list(a.overrides), launch)
        per_task = [list(a.overrides) + o for o in sweep_overrides(base_run_dir, a.array)]
        subs = submit_array([configs[0]] * len(per_task), launch, per_task, force=a.force)
    elif len(configs) > 1:
        subs = submit_array(configs, launch, [list(a.overrides) for _ in configs], force=a.force)
    else:
        subs = [submit(configs[0], launch, a.overrides, force=a.force, evals=evals)]
    for s in subs:
        print(f"submitted job {s.jobs[0].job_id} ({launch.cluster}) for run {s.run_dir}; logs in {s.folder}")
    if not a.wait:
        return 0
    ok = True
    for s in subs:
        result = job_result(s.jobs[0])
        print(json.dumps(result))
        ok = ok and result["status"] == "finished"
    return 0 if ok else 1


def _run(a: argparse.Namespace) -> int:
    if a.command == "submit":
        return _submit(a)
    if a.command == "status":
        rows, evals = status(a.run_dir), eval_status(a.run_dir)
        print("\n".join(json.dumps(r) for r in rows + evals) if a.json else format_status(rows))
        if evals and not a.json:  # eval jobs (launchers.eval_jobs), below the training jobs
            print(f"\neval jobs:\n{format_eval_status(evals)}")
    elif a.command == "tail":
        print(tail(a.run_dir, a.lines, a.job))
    else:  # cancel (argparse enforces the choices)
        ids = cancel(a.run_dir)
        print("cancelled: " + (", ".join(ids) if ids else "nothing (no unfinished job)"))
    return 0


def _main(argv: list[str]) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "submit" and a.array and a.config and len(a.config) > 1:
        parser.error("use either several --config or --array, not both")
    return _run(a)


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
