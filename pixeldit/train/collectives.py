"""Collective timeouts from the run config, and what every rank leaves behind when a collective fails.

    guard = CollectiveGuard(cfg, rank=0)          # before the process group: sets the NCCL flight-recorder env
    init_distributed(guard.startup_timeout)       # generous: rendezvous, engine build, first compile
    guard.first_step_done()                       # tight from now on: every group's timeout -> step_timeout_s
    except Exception as err: raise guard.failure(err) from err   # a collective error: stacks dumped, one message

Timeouts: ``distributed.startup_timeout_s`` is the process group's timeout from ``init_process_group`` until
the first optimizer step completed; then ``first_step_done`` sets ``distributed.step_timeout_s`` on every
group of this process (torch 2.13: ``torch.distributed.distributed_c10d._set_pg_timeout``, which sets the
gloo backend's and the NCCL backend's default timeout; checked with gloo on the CPU in the tests: a rank
that stays away longer than it fails the collective of the others within that time).

On a collective error (a timeout, a peer that vanished: ``is_collective_error``) every rank writes its Python
stacks (``faulthandler``, all threads) and the exception's traceback to ``{log folder}/stacks_{host}_rank{r}.txt``
(the log folder: ``$PIXELDIT_LOG_DIR`` if set, else ``{run_dir}/logs``) and raises ``CollectiveError``, which
names the timeout key in force and that folder. A rank stuck elsewhere while its peers failed is ended by its
launcher (torchrun / srun send SIGTERM): ``pixeldit.train.signals`` dumps its stacks to the same folder. On
CUDA, the NCCL flight recorder is switched on before the process group starts (``nccl_trace_env``): NCCL dumps
its trace of the last collectives into the same folder on a timeout.
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from .config import RunConfig
from .signals import LOG_DIR_VAR, dump_stacks

NCCL_TRACE_ENTRIES = 2000  # collectives the NCCL flight recorder keeps per rank
# words of the RuntimeErrors gloo and NCCL raise for a failed collective (torch 2.13 raises some as plain
# RuntimeError, not DistBackendError): a timeout, a peer that closed its connection or crashed
_COLLECTIVE_WORDS = ("timed out", "timeout", "connection closed by peer", "connection reset", "gloo", "nccl",
                     "processgroup", "watchdog", "broken pipe")


class CollectiveError(RuntimeError):
    """A collective timed out or failed; the message names the timeout key and the folder of the stack dumps."""


def log_dir(cfg: RunConfig) -> Path:
    """The job's log folder: ``$PIXELDIT_LOG_DIR`` if set, else ``{run_dir}/logs``."""
    return Path(os.environ.get(LOG_DIR_VAR) or Path(cfg.run_dir) / "logs")


def nccl_trace_env(folder: Path) -> dict[str, str]:
    """The NCCL flight-recorder settings: keep a trace of the last collectives, dump it into ``folder`` on a
    timeout (file ``nccl_trace_rank_{r}``)."""
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": str(NCCL_TRACE_ENTRIES), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(folder / "nccl_trace_rank_")}


def is_collective_error(err: BaseException) -> bool:
    """True for the errors of a failed collective (torch's ``DistError`` family, or gloo/NCCL RuntimeErrors)."""
    if isinstance(err, CollectiveError) or isinstance(err, getattr(dist, "DistError", ())):
        return True
    if type(err) is not RuntimeError:
        return False
    text = str(err).lower()
    return any(word in text for word in _COLLECTIVE_WORDS)


def set_group_timeouts(timeout: datetime.timedelta) -> int:
    """Set ``timeout`` on every process group this process belongs to; returns how many."""
    from torch.distributed import distributed_c10d as c10d

    groups = [g for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


class CollectiveGuard:
    """The timeouts of one trainer process and its reaction to a collective error (module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.folder = log_dir(cfg)
        self.startup_timeout = datetime.timedelta(seconds=cfg.distributed.startup_timeout_s)
        self.step_timeout = datetime.timedelta(seconds=cfg.distributed.step_timeout_s)
        self.tight = False
        if torch.cuda.is_available():  # read by ProcessGroupNCCL when it is created: set before init_process_group
            self.folder.mkdir(parents=True, exist_ok=True)
            for key, value in nccl_trace_env(self.folder).items():
                os.environ.setdefault(key, value)

    def first_step_done(self) -> None:
        """Switch every group to ``distributed.step_timeout_s`` (once; later calls do nothing)."""
        if self.tight or not dist.is_initialized():
            return
        set_group_timeouts(self.step_timeout)
        self.tight = True

    @property
    def timeout_key(self) -> str:
        if self.tight:
            return f"distributed.step_timeout_s={self.cfg.distributed.step_timeout_s:g}"
        return f"distributed.startup_timeout_s={self.cfg.distributed.startup_timeout_s:g}"

    def failure(self, err: BaseException) -> CollectiveError:
        """Dump this rank's stacks and return the error to raise (call only for ``is_collective_error(err)``)."""
        host = socket.gethostname()
        when = "after the first step" if self.tight else "during start-up or the first step"
        try:
            path = dump_stacks(self.folder, self.rank, f"collective error {when} ({self.timeout_key})", err)
            where = f"Python stacks of every rank are in {self.folder} (this rank: {path.name})"
        except OSError as write_err:
            where = f"the stack dump into {self.folder} failed too ({write_err})"
        nccl = "; NCCL flight-recorder traces: nccl_trace_rank_* there" if torch.cuda.is_available() else ""
        first = " ".join(str(err).split())[:300]
        return CollectiveError(
            f"rank {self.rank} on {host}: a collective failed {when} (timeout {self.timeout_key}): {first}. "
            f"{where}{nccl}. A rank that stalled or died is named in its stacks and log; raise "
            f"{self.timeout_key.split('=')[0]} if its steps are legitimately slower, else exclude that node and resume")
