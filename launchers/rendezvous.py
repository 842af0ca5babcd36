"""MASTER_PORT of a job: derived from its id, checked on rank 0's host, and told to every task through the
submission folder.

The port is derived from the raw job id (``port_from_job_id``: array tasks and jobs sharing a node get different
ports) in 20000-31999, below Linux's ephemeral range (32768-60999, where any outgoing connection may hold a
port). A derived port can still be taken on the master host (another program, a leftover process): the
TCPStore of rank 0 would then fail to bind, and every other rank would retry connecting to it for the whole
start-up timeout (half an hour by default) before anyone could decide. So rank 0 tries the port first and, when
it is taken, takes a free one, and writes the port it will use to ``{folder}/{job_id}_master_port_attempt{N}``;
the other tasks wait for that file (the submission folder is shared by every node). ``launch.master_port``
fixes the port and skips all of this.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

from pixeldit.cluster import free_port, port_is_free
from pixeldit.storage import write_text_atomic

PORT_BASE, PORT_SPAN = 20000, 12000  # 20000-31999
PORT_FILE = "{job_id}_master_port_attempt{attempt}"
POLL_S = 0.2


def port_from_job_id(job_id: str | int) -> int:
    """A port every task of one job derives alike; jobs (array tasks too) have distinct numeric SLURM ids."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def port_file(folder: str | Path, job_id: str, attempt: int) -> Path:
    return Path(folder) / PORT_FILE.format(job_id=job_id, attempt=attempt)


def agree_master_port(folder: str | Path, job_id: str, raw_job_id: str, attempt: int, rank: int,
                      wait_s: float) -> tuple[int, str | None]:
    """(the job's MASTER_PORT for this attempt, a note when rank 0 had to move off the derived port).

    Rank 0 decides and publishes; the other ranks wait up to ``wait_s`` for it (``TimeoutError`` naming the
    file and what to do)."""
    path = port_file(folder, job_id, attempt)
    if rank == 0:
        port, note = port_from_job_id(raw_job_id), None
        if not port_is_free(port):
            taken, port = port, free_port()
            note = (f"MASTER_PORT {taken} (derived from job id {raw_job_id}) is in use on {socket.gethostname()}; "
                    f"this attempt uses {port} (set launch.master_port to fix one)")
        write_text_atomic(path, str(port))
        return port, note
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return int(path.read_text().strip()), None
        except (FileNotFoundError, ValueError):  # not there yet (or, on a network file system, not complete)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 did not write the master port into {path} within "
                                   f"{wait_s:.0f} s (is the submission folder shared by every node? did rank 0 "
                                   f"start?); set launch.master_port to skip this") from None
            time.sleep(POLL_S)
