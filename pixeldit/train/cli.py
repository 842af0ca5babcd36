"""``pixeldit-train``: run (or resume) a training run from a YAML config plus dotted overrides.

    torchrun --nproc_per_node 8 -m pixeldit.train.cli --config run.yaml stages.0.lr=1e-4 run_dir=runs/x
    pixeldit-train --config run.yaml --print-config          # show the merged, validated config

The whole run is checked before anything starts (``pixeldit.train.preflight``: config keys, datasets, model
folders, ZeRO JSON); a mistake is one line naming the key or file, exit code 2 (``--traceback`` or
PIXELDIT_TRACEBACK=1 shows the traceback). SIGUSR1 or SIGUSR2 (e.g. SLURM's warning signal before the time
limit) asks the run to stop: all ranks save a checkpoint together at the next step boundary and the command
returns; running it again resumes. SIGTERM (torchrun forwards it; SLURM's cancel) asks the same, and the
process is gone within ``distributed.sigterm_grace_s`` seconds even if the step or the save is not done
(``pixeldit.train.signals``: ``latest`` keeps naming the last complete checkpoint; exit code 143).
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from pixeldit.errors import CliParser, cli_main

from .config import load_config, to_saved_dict
from .preflight import preflight
from .signals import StopFlag

PROG = "pixeldit-train"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML (defaults are used for keys it leaves out)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key.path=value, e.g. stages.1.lr=5e-5")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    return p


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_saved_dict(cfg), sort_keys=False))
        return 0
    preflight(cfg)  # before deepspeed is even imported: a mistake costs no process group, run folder or wandb run
    from .collectives import log_dir
    from .trainer import run_training

    stop = StopFlag(grace_s=cfg.distributed.sigterm_grace_s, dump_dir=log_dir(cfg)).install()
    result = run_training(cfg, stop)
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: {result.status} at step {result.step} (stage {result.stage}); "
              f"checkpoint {result.checkpoint}", flush=True)
    stop.leave_if_terminated()  # SIGTERM: exit code 143 now, without the interpreter's slow teardown
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
