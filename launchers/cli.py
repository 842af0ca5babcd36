"""pixeldit-submit: submit training runs to SLURM or the local executor; status, tail, cancel.

    pixeldit-submit submit --config run.yaml --cluster slurm --nodes 4 --gpus-per-node 8 --partition gpu \\
        --time-min 4320 --max-requeues 10 stages.0.lr=2e-4
    pixeldit-submit submit --config a.yaml --config b.yaml --cluster slurm     # a job array, one task per config
    pixeldit-submit status runs/t2i
    pixeldit-submit tail runs/t2i -n 50
    pixeldit-submit cancel runs/t2i

The whole curriculum of a run config (all its stages) runs in one job; on preemption or time limit the
job saves at the next step boundary, requeues itself and resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import CLUSTERS, LaunchConfig
from .manage import cancel, status, tail
from .submit import job_result, submit, submit_array


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    return k, v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pixeldit-submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a run (or an array of runs)")
    s.add_argument("--config", action="append", default=None, help="run config YAML (repeat for a job array)")
    s.add_argument("--cluster", choices=CLUSTERS, default="local")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--tasks-per-node", type=int, default=0, help="default: gpus per node, or 1")
    s.add_argument("--cpus-per-task", type=int, default=1)
    s.add_argument("--mem-gb", type=float, default=0.0)
    s.add_argument("--partition", default="")
    s.add_argument("--account", default="")
    s.add_argument("--qos", default="")
    s.add_argument("--constraint", default="")
    s.add_argument("--time-min", type=int, default=60)
    s.add_argument("--job-name", default="pixeldit")
    s.add_argument("--max-requeues", type=int, default=3)
    s.add_argument("--signal-delay-s", type=int, default=120)
    s.add_argument("--sbatch", type=_kv, action="append", default=[], help="extra sbatch option KEY=VALUE")
    s.add_argument("--env", type=_kv, action="append", default=[], help="environment KEY=VALUE for every task")
    s.add_argument("--wait", action="store_true", help="block until the job(s) finish and print the result")
    s.add_argument("overrides", nargs="*", help="run config overrides a.b=c")
    for name, helptext in (("status", "jobs of a run and their state"), ("tail", "last log lines of the newest job"),
                           ("cancel", "cancel the run's unfinished jobs")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir")
        if name == "tail":
            p.add_argument("-n", "--lines", type=int, default=20)
    return ap


def launch_config(a: argparse.Namespace) -> LaunchConfig:
    return LaunchConfig(
        cluster=a.cluster, nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks_per_node=a.tasks_per_node,
        cpus_per_task=a.cpus_per_task, mem_gb=a.mem_gb, partition=a.partition, account=a.account, qos=a.qos,
        constraint=a.constraint, time_min=a.time_min, job_name=a.job_name, max_requeues=a.max_requeues,
        signal_delay_s=a.signal_delay_s, extra_sbatch=dict(a.sbatch), env=dict(a.env),
    )


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.command == "submit":
        launch = launch_config(a)
        configs = a.config or [None]
        if len(configs) == 1:
            subs = [submit(configs[0], launch, a.overrides)]
        else:
            subs = submit_array(configs, launch, [list(a.overrides) for _ in configs])
        for s in subs:
            print(f"submitted job {s.jobs[0].job_id} ({launch.cluster}) for run {s.run_dir}; logs in {s.folder}")
        if a.wait:
            for s in subs:
                print(json.dumps(job_result(s.jobs[0])))
    elif a.command == "status":
        for row in status(a.run_dir):
            print(f"{row['job_id']:>12}  {row['state']:<12}  {row['cluster']:<6}  {row['submitted']}  {row['folder']}")
    elif a.command == "tail":
        print(tail(a.run_dir, a.lines))
    elif a.command == "cancel":
        ids = cancel(a.run_dir)
        print("cancelled: " + (", ".join(ids) if ids else "nothing (no unfinished job)"))
    else:  # argparse enforces the choices
        sys.exit(f"unknown command {a.command}")


if __name__ == "__main__":
    main()
