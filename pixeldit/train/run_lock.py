"""One trainer per run folder: an exclusive lock file ``{run_dir}/trainer.lock`` (``run_folder.LOCK``).

    lock = RunLock(run_dir)              # rank 0 only; the trainer tells the other ranks the outcome
    note = lock.acquire()                # RunFolderLocked naming the holder, or a note on a stale lock taken over
    ...                                  # lock.check() before publishing a checkpoint
    lock.release()

The run folder may live on a shared file system (NFS, Lustre, GPFS) seen by many hosts, so the lock is a
file, not a kernel lock (``flock``/``fcntl`` are per host or optional on such mounts):

- **taking it**: the holder record (JSON: host, pid, process start time, pid namespace, job id and attempt,
  a random token) is written to a private temp file, then hard-linked to ``trainer.lock``; ``link`` is atomic
  and fails when the name exists, on local disks and on NFSv3+/Lustre alike, and the lock appears with its
  whole content (a reader never sees a half-written record).
- **heartbeat**: a daemon thread of the holder touches the lock's mtime every ``heartbeat_s`` (30 s) after
  checking that it still holds its token. A lock whose token is no longer the holder's is "lost":
  ``check()`` raises, and the trainer calls it before it publishes each checkpoint, so a trainer whose lock
  was taken over never writes ``latest`` again.
- **stale** (the holder is gone and the lock may be taken over), in this order:
  1. the holder is an earlier attempt of this same scheduler job (same job id, lower attempt: a requeued
     SLURM job, ``SLURM_RESTART_COUNT``, or the launcher's requeue count); the scheduler ended it before
     starting this attempt, on whatever host;
  2. same host and same pid namespace: the pid is not running, or runs another process (its start time
     differs); a live pid there is a live holder, however old its heartbeat;
  3. another host (or pid namespace): the pid cannot be checked, so the heartbeat decides: the lock is stale
     when its mtime is ``stale_after_s`` (300 s) older than the mtime of the temp file the contender has just
     written on the same file system. Both times come from the same clock (the file server's on NFS), so
     clock skew between hosts does not matter; 300 s leaves room for NFS attribute caching (up to 60 s)
     and slow metadata servers. A holder frozen longer than that (a stopped process, a hung mount) can
     lose its lock; it finds out at its next ``check()``.
  Anything else (including a lock file that cannot be read) is a live holder: the contender fails at once
  with ONE line naming the holder and how to proceed.
- **taking over** a stale lock: rename it to a private name (one contender wins the rename), read the
  renamed file back and confirm it is the record judged stale (else it was a fresh lock taken in between:
  it is linked back and the contender fails), delete it, then take the lock as above.
- **releasing**: the holder deletes the lock only while it still holds its token (normal exit, errors, and
  a saved stop before a requeue). After ``kill -9`` the lock stays and is stale by rule 2 or 3.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pixeldit import run_folder
from pixeldit.errors import UserError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
JOB_ID_VAR, JOB_ATTEMPT_VAR = "PIXELDIT_JOB_ID", "PIXELDIT_JOB_ATTEMPT"  # set by launchers.job
JOB_ID_ENV = (JOB_ID_VAR, "SLURM_JOB_ID")  # the first one set names this process's scheduler job
JOB_ATTEMPT_ENV = (JOB_ATTEMPT_VAR, "SLURM_RESTART_COUNT")  # its attempt (0 = its first run)


class RunFolderLocked(UserError):
    """Another live trainer holds the run folder (the message names it)."""


class RunLockLost(UserError, RuntimeError):
    """This trainer's lock was taken over (it looked stale to another trainer); it must not write the run."""


def _process_start(pid: int) -> str | None:
    """Start time of a live process (clock ticks since boot, /proc/PID/stat field 22); None when unknown or a
    zombie (killed, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return None if fields[0] == "Z" else fields[19]


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _env_first(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def this_process(job_id: str | None = None, attempt: int | None = None) -> dict[str, Any]:
    """The holder record of this process (job id / attempt default to the scheduler's environment)."""
    if attempt is None:
        raw = _env_first(JOB_ATTEMPT_ENV)
        attempt = int(raw) if raw and raw.isdigit() else 0
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "pid_ns": _pid_namespace(), "job_id": job_id if job_id is not None else _env_first(JOB_ID_ENV),
            "attempt": attempt, "token": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict[str, Any]) -> str:
    job = ""
    if holder.get("job_id"):
        job = f", job {holder['job_id']}" + (f" attempt {holder['attempt']}" if holder.get("attempt") else "")
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


class RunLock:
    """The exclusive lock of one run folder (module docstring); not re-entrant."""

    def __init__(self, run_dir: str | os.PathLike, job_id: str | None = None, attempt: int | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = run_folder.lock_path(run_dir)
        self.me = this_process(job_id, attempt)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back -------------------------------------------------------------------------

    def acquire(self) -> str | None:
        """Take the lock; returns a one-line note when a stale lock was taken over, else None.
        Raises ``RunFolderLocked`` (one line naming the holder) when a live trainer holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f".{self.path.name}.{self.me['token']}")
        mine.write_text(json.dumps(self.me))
        note = None
        try:
            for _ in range(3):  # a takeover can race with another contender: look again
                if self._link(mine):
                    self._start_heartbeat()
                    return note
                holder, raw = self._read()
                if raw is None:  # released between our link and our read
                    continue
                stale = self._stale_reason(holder, mine)
                if stale is None:
                    raise RunFolderLocked(self._held_message(holder))
                if not self._break(raw):
                    continue
                note = f"{self.path}: took over the lock of {describe(holder)} ({stale})"
            holder, _ = self._read()
            raise RunFolderLocked(self._held_message(holder or {}))
        finally:
            mine.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise ``RunLockLost`` when the lock is no longer this trainer's."""
        holder, _ = self._read()
        if self.lost is None and (holder is None or holder.get("token") != self.me["token"]):
            self.lost = describe(holder) if holder else "nobody (the lock file is gone)"
        if self.lost is not None:
            raise RunLockLost(f"{self.path}: this trainer ({describe(self.me)}) lost the run-folder lock, now held "
                              f"by {self.lost}; it stops without saving (another trainer writes this run folder)")

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- internals --------------------------------------------------------------------------------------

    def _link(self, mine: Path) -> bool:
        """Atomically create the lock as a hard link to our record; False when it exists."""
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # NFS: the reply of a successful link can be lost; the link count tells
            if mine.stat().st_nlink == 2:
                return True
            raise

    def _read(self) -> tuple[dict[str, Any] | None, bytes | None]:
        """(holder record or None if unreadable, raw bytes or None if there is no lock)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
            return (holder if isinstance(holder, dict) else None), raw
        except ValueError:
            return None, raw

    def _stale_reason(self, holder: dict[str, Any] | None, mine: Path) -> str | None:
        """Why the holder is gone (the lock may be taken over), or None for a live holder."""
        if holder is None:
            return None  # unreadable: never guess
        me = self.me
        if me["job_id"] and holder.get("job_id") == me["job_id"] and int(holder.get("attempt") or 0) < me["attempt"]:
            return f"an earlier attempt of job {me['job_id']}"
        if holder.get("host") == me["host"] and holder.get("pid_ns") == me["pid_ns"]:
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _pid_alive(pid):
                return f"pid {pid} is not running"
            if holder.get("pid_start") and _process_start(pid) != holder["pid_start"]:
                return f"pid {pid} is gone (not running, or another process now)"
            return None
        try:
            age = mine.stat().st_mtime - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released meanwhile"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _break(self, raw: bytes) -> bool:
        """Remove the stale lock whose content is ``raw``; False when someone else changed it first."""
        aside = self.path.with_name(f".{self.path.name}.stale-{self.me['token']}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False  # another contender moved it first
        if aside.read_bytes() == raw:
            aside.unlink()
            return True
        try:  # we moved a fresh lock taken in between: put it back
            os.link(aside, self.path)
        except FileExistsError:
            pass  # a third trainer took the name meanwhile; the moved holder finds out at its next check()
        aside.unlink()
        return False

    def _held_message(self, holder: dict[str, Any]) -> str:
        who = describe(holder) if holder else "an unreadable lock file"
        return (f"run folder {self.path.parent} is in use by another trainer ({who}); stop that trainer or use "
                f"another run_dir. If it is gone, its lock ({self.path}) is taken over automatically: at once on "
                f"the same host, after {self.stale_after_s:.0f} s without heartbeat from another host")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = self._read()
            if holder is None or holder.get("token") != self.me["token"]:
                self.lost = describe(holder) if holder else "nobody (the lock file is gone)"
                return
            try:
                os.utime(self.path)  # mtime = now on the file system's clock (NFS: the server's)
            except FileNotFoundError:
                continue  # removed between the read and the touch: the next beat records the loss


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
