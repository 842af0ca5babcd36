"""Building on many machines: a plan cut into task slices; tasks run in this process, as local processes or as
a SLURM job array (submitit); per-task records; status.

    plan = open_plan(root, "shard", fingerprint, slices, data, options)    # new, or the unfinished one resumed
    states = execute(plan, options)          # run / submit every task without a done record, wait, states
    print(format_status(task_states(plan)))

Layout under the build's root (the ingest folder for ``ingest``, the dataset root for ``shard``)::

    _build/plan.json              kind, id, fingerprint of the inputs and settings, the task slices, state
    _build/tasks/{t:05d}.json     task t's record: running (host, pid), done (result) or failed (the error)
    _build/jobs.jsonl             one line per submission: cluster, log folder, job id of each task
    _build/logs/{submission}/     submitit's pickles and logs (a local root; else BuildOptions.log_dir)
    _build/parts/{t:05d}/         (shard) task t's part: its shards and samples.parquet

Slices are contiguous, disjoint and cover the work in order (``task_slices``): task t of T gets items
[n*t//T, n*(t+1)//T). A task writes only under its own slice (ingest: its ingest shards; shard: its part), so a
task that failed or was killed reruns alone: running the same command again resumes the unfinished plan (same
fingerprint), skips tasks with a done record and reruns the others; tasks still pending or running are waited
for, not submitted twice. A different command on a root with an unfinished build is refused unless
``restart`` discards that build (refused too while one of its jobs is still active).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import secrets
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from pixeldit.cluster import SLURM_ACTIVE, LaunchConfig, local_job_alive, make_executor, slurm_states
from pixeldit.errors import UserError
from pixeldit.storage import exists, fs_and_path, is_local, join, list_files, read_bytes, write_json_atomic, \
    write_text_atomic

from .dataset_format import BUILD_DIR

PLAN_FILE = "plan.json"
TASKS_DIR = "tasks"
JOBS_FILE = "jobs.jsonl"
LOGS_DIR = "logs"
PARTS_DIR = "parts"
# what runs task t of a plan of each kind: "module:function(plan, task) -> result dict", imported in the task
TASK_FUNCTIONS = {"ingest": "data_pipeline.ingest_task:run_ingest_task", "shard": "data_pipeline.shard:run_shard_task"}


@dataclass(frozen=True)
class BuildOptions:
    """How the tasks of a build run. ``launch=None``: one after the other in this process."""

    tasks: int = 1
    launch: LaunchConfig | None = None  # pixeldit.cluster: the same flags as pixeldit-submit
    wait: bool = True  # wait for every task (then commit); False: submit and return
    restart: bool = False  # discard an unfinished build with other inputs or settings
    log_dir: str = ""  # submitit's folder; default {root}/_build/logs (a remote root needs a shared local one)
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"BuildOptions.tasks (--tasks) must be >= 1, got {self.tasks}")


class BuildBusyError(UserError, RuntimeError):
    """The root holds an unfinished build of other inputs or settings, or its jobs are still active."""


class BuildFailed(RuntimeError):
    """Some tasks of a build did not finish; the message lists them and why (rerun to rerun only those)."""


def task_slices(n: int, tasks: int) -> list[tuple[int, int]]:
    """Contiguous, disjoint [start, stop) slices of ``range(n)`` covering it in order, sizes within one of
    each other; at most ``n`` slices (at least one)."""
    tasks = max(1, min(tasks, n))
    return [(n * t // tasks, n * (t + 1) // tasks) for t in range(tasks)]


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_dir(root: str) -> str:
    return join(root, BUILD_DIR)


def part_dir(root: str, task: int) -> str:
    return join(root, BUILD_DIR, PARTS_DIR, f"{task:05d}")


@dataclass
class Plan:
    """What a build does, fixed when it starts; ``data`` is what the tasks of its kind read."""

    kind: str  # ingest | shard
    root: str
    id: str
    fingerprint: str
    slices: list[dict[str, Any]]  # {"task", "start", "stop", "what"}
    data: dict[str, Any] = field(default_factory=dict)
    state: str = "running"  # running | committed
    created: str = ""

    @property
    def tasks(self) -> int:
        return len(self.slices)

    def save(self) -> None:
        write_json_atomic(join(build_dir(self.root), PLAN_FILE), dataclasses.asdict(self))


def load_plan(root: str) -> Plan | None:
    url = join(build_dir(root), PLAN_FILE)
    if not exists(url):
        return None
    return Plan(**json.loads(read_bytes(url)))


def remove_tree(url: str) -> None:
    """Delete a file or folder tree if it is there (on S3 a prefix whose objects all moved away is gone)."""
    fs, path = fs_and_path(url)
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def remove_build(root: str) -> None:
    """Delete the build folder of ``root`` (plan, records, parts, logs)."""
    remove_tree(build_dir(root))


def open_plan(root: str, kind: str, fp: str, make: Callable[[], tuple[list[tuple[int, int, str]], dict[str, Any]]],
              options: BuildOptions) -> tuple[Plan, bool]:
    """(the plan, resumed?): the unfinished plan of ``root`` when it has fingerprint ``fp``, else a new one from
    ``make()`` -> (slices as (start, stop, what in words), data the tasks read); ``make`` may write the inputs the
    tasks read. Raises BuildBusyError for an unfinished build of other settings (unless ``options.restart`` and
    none of its jobs is active)."""
    old = load_plan(root)
    if old is not None and old.state != "committed":
        if old.kind == kind and old.fingerprint == fp:
            return old, True
        active = [s for s in task_states(old) if s.state in ("running", "pending")]
        if not options.restart or active:
            what = (f"its tasks {', '.join(str(s.task) for s in active)} are still active (cancel them first)"
                    if active else "pass --restart-build to discard it")
            raise BuildBusyError(
                f"{build_dir(root)}: an unfinished {old.kind} build (plan {old.id}, {old.tasks} tasks) of other "
                f"inputs or settings is in the way; run its command again to finish it, or {what}")
    remove_build(root)
    slices, data = make()
    plan = Plan(kind=kind, root=root, id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
                fingerprint=fp, slices=[{"task": t, "start": a, "stop": b, "what": w}
                                        for t, (a, b, w) in enumerate(slices)],
                data=data, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    plan.save()
    return plan, False


# ---- task records -------------------------------------------------------------------------------------------


def _record_url(root: str, task: int) -> str:
    return join(build_dir(root), TASKS_DIR, f"{task:05d}.json")


def _host() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def write_record(plan: Plan, task: int, status: str, **fields: Any) -> None:
    rec = {"plan": plan.id, "task": task, "status": status, "host": _host(), "pid": os.getpid(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    write_json_atomic(_record_url(plan.root, task), rec)


def read_records(plan: Plan) -> dict[int, dict[str, Any]]:
    """Task records of this plan (records of an earlier plan, written late by a zombie task, are ignored)."""
    out = {}
    for path in list_files(join(build_dir(plan.root), TASKS_DIR), "*.json"):
        name = os.path.basename(path).removesuffix(".json")
        if not name.isdigit():
            continue
        rec = json.loads(read_bytes(join(build_dir(plan.root), TASKS_DIR, os.path.basename(path))))
        if rec.get("plan") == plan.id:
            out[int(name)] = rec
    return out


@dataclass(frozen=True)
class TaskCall:
    """One task of a plan, as submitted (picklable): runs TASK_FUNCTIONS[kind] under a record."""

    kind: str
    root: str
    plan_id: str
    task: int
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> dict[str, Any]:
        os.environ.update(self.env)
        plan = load_plan(self.root)
        if plan is None or plan.id != self.plan_id:
            raise RuntimeError(f"{build_dir(self.root)}: the build plan is no longer {self.plan_id} (it was "
                               f"restarted or committed); this task has nothing to do")
        return run_recorded(plan, self.task)


def run_recorded(plan: Plan, task: int) -> dict[str, Any]:
    """Run task ``task`` of ``plan`` here, writing its record: running, then done (its result) or failed."""
    module, _, name = TASK_FUNCTIONS[plan.kind].partition(":")
    fn = getattr(importlib.import_module(module), name)
    start = time.time()
    write_record(plan, task, "running")
    try:
        result = fn(plan, task)
    except BaseException as err:
        message = " ".join(str(err).split()) or type(err).__name__
        write_record(plan, task, "failed", error=f"{type(err).__name__}: {message}",
                     traceback=traceback.format_exc()[-4000:], seconds=round(time.time() - start, 3))
        raise
    write_record(plan, task, "done", result=result, seconds=round(time.time() - start, 3))
    return result


# ---- submissions and states ---------------------------------------------------------------------------------


def read_submissions(plan: Plan) -> list[dict[str, Any]]:
    url = join(build_dir(plan.root), JOBS_FILE)
    if not exists(url):
        return []
    lines = [json.loads(line) for line in read_bytes(url).decode().splitlines() if line.strip()]
    return [s for s in lines if s.get("plan") == plan.id]


def _record_submission(plan: Plan, cluster: str, folder: str, jobs: dict[int, str]) -> None:
    url = join(build_dir(plan.root), JOBS_FILE)
    old = read_bytes(url).decode() if exists(url) else ""
    line = {"plan": plan.id, "cluster": cluster, "folder": folder, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "jobs": {str(t): j for t, j in jobs.items()}}
    write_text_atomic(url, old + json.dumps(line) + "\n")


@dataclass(frozen=True)
class TaskState:
    task: int
    what: str  # the slice, in words
    state: str  # done | failed | running | pending | not started
    host: str = ""
    why: str = ""  # for failed: the task's own error, or the scheduler's state and the last log line
    job_id: str = ""
    seconds: float | None = None


def _last_log_line(folder: str, job_id: str) -> str:
    for ext in ("err", "out"):
        path = os.path.join(folder, f"{job_id}_0_log.{ext}")
        with contextlib.suppress(OSError):
            with open(path, errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines()[-50:] if ln.strip()]
            interesting = [ln for ln in lines if "CANCELLED" in ln or "Error" in ln or "error" in ln or "Killed" in ln]
            if interesting or lines:
                return (interesting or lines)[-1][:300]
    return ""


def task_states(plan: Plan) -> list[TaskState]:
    """Every task of the plan: done / failed (and why) / running / pending / not started."""
    records = read_records(plan)
    latest: dict[int, tuple[str, str, str]] = {}  # task -> (cluster, folder, job id) of its newest submission
    for sub in read_submissions(plan):
        for t, j in sub["jobs"].items():
            latest[int(t)] = (sub["cluster"], sub["folder"], j)
    slurm = slurm_states([j for c, _, j in latest.values() if c == "slurm"])
    out = []
    for s in plan.slices:
        t, what = s["task"], s["what"]
        rec = records.get(t, {})
        cluster, folder, job = latest.get(t, ("", "", ""))
        if rec.get("status") == "done":
            out.append(TaskState(t, what, "done", rec.get("host", ""), job_id=job, seconds=rec.get("seconds")))
            continue
        if cluster == "slurm":
            sched = slurm[job]
            active = sched in SLURM_ACTIVE
        elif cluster == "local":
            sched = "RUNNING" if local_job_alive(job, folder) else "ENDED"
            active = sched == "RUNNING"
        else:  # run in a process of its own command: alive if that process is (same host only)
            sched, active = "", rec.get("status") == "running" and rec.get("host") == _host() and \
                _pid_alive(int(rec.get("pid", 0)))
        if active:
            state = "pending" if sched == "PENDING" else "running"
            out.append(TaskState(t, what, state, rec.get("host", "") if rec.get("status") == "running" else "",
                                 job_id=job))
        elif rec.get("status") == "failed":
            why = rec.get("error", "") + (f" ({cluster} job {job}: {sched})" if job else "")
            out.append(TaskState(t, what, "failed", rec.get("host", ""), why, job))
        elif job or rec:
            log = _last_log_line(folder, job) if folder else ""
            why = (f"{cluster} job {job} ended with state {sched} without finishing the task (killed?)"
                   if job else f"the process {rec.get('pid')} on {rec.get('host')} stopped without finishing")
            out.append(TaskState(t, what, "failed", rec.get("host", ""), why + (f"; log: {log}" if log else ""), job))
        else:
            out.append(TaskState(t, what, "not started"))
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_status(plan: Plan | None, states: list[TaskState]) -> str:
    if plan is None:
        return "no build has run here"
    counts = {k: sum(s.state == k for s in states) for k in ("done", "failed", "running", "pending", "not started")}
    head = (f"{plan.kind} build {plan.id} ({plan.state}, created {plan.created}): "
            + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    lines = [head]
    for s in states:
        where = f" on {s.host}" if s.host else ""
        took = f" in {s.seconds:.1f}s" if s.seconds is not None else ""
        job = f" [job {s.job_id}]" if s.job_id else ""
        lines.append(f"  task {s.task}: {s.what}: {s.state}{where}{took}{job}" + (f": {s.why}" if s.why else ""))
    return "\n".join(lines)


# ---- running --------------------------------------------------------------------------------------------------


def _log_folder(plan: Plan, options: BuildOptions) -> str:
    if options.log_dir:
        base = options.log_dir
    elif is_local(plan.root):
        base = join(build_dir(plan.root), LOGS_DIR)
    else:
        raise ValueError(f"{plan.root} is not a local folder: pass --log-dir (a folder every node of the cluster "
                         f"sees) for submitit's pickles and logs")
    folder = os.path.join(base, f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}")
    os.makedirs(folder, exist_ok=False)
    return folder


def execute(plan: Plan, options: BuildOptions) -> list[TaskState]:
    """Run every task of the plan that has no done record and no active job; wait (``options.wait``) for all
    of them; return the task states."""
    states = task_states(plan)
    todo = [s.task for s in states if s.state in ("failed", "not started")]
    if todo:
        if options.launch is None:
            for t in todo:
                with contextlib.suppress(Exception):  # recorded as failed; the others still run
                    run_recorded(plan, t)
        else:
            launch = options.launch
            folder = _log_folder(plan, options)
            executor = make_executor(launch, folder)
            calls = [TaskCall(plan.kind, plan.root, plan.id, t, dict(launch.env)) for t in todo]
            jobs = executor.map_array(_run_call, calls)
            _record_submission(plan, launch.cluster, folder, {t: str(j.job_id) for t, j in zip(todo, jobs)})
    if options.launch is not None and options.wait:
        while True:
            states = task_states(plan)
            if not any(s.state in ("running", "pending") for s in states):
                break
            time.sleep(options.poll_s)
    return task_states(plan)


def _run_call(call: TaskCall) -> dict[str, Any]:
    """Array task entry point (a picklable module-level function)."""
    return call()


def failed_message(plan: Plan, states: list[TaskState]) -> str:
    bad = [s for s in states if s.state != "done"]
    listed = "; ".join(f"task {s.task} ({s.what}): {s.state}" + (f": {s.why}" if s.why else "") for s in bad)
    return (f"{plan.kind} build {plan.id} at {plan.root}: {len(bad)} of {plan.tasks} tasks not done: {listed}. "
            f"Run the same command again to rerun only them; `pixeldit-data status {plan.root}` shows the build")
