"""Jobs that survive and repair themselves (issue 17, the launcher half): supervisor, watchdog, failure budget.

Fast units (no job): the restart decision (budget, backoff, node exclusion), the heartbeat file, the watchdog's
limits and its reading of stack dumps, and the supervisor against a small child process (a kill, a SIGSTOP).
True two-node SLURM jobs (n1, n2; skipped with the reason when SLURM is not running), DeepSpeed ZeRO-2, the
debug model at 32 px, 4 + 4 steps, a checkpoint every 2 steps, each compared with the 2-task local-executor
run of ``tests/test_launchers.py`` (same config):

- one job shows a kill -9 of the trainer on n2, then a SIGSTOP of the trainer on n1 (two different nodes, so
  neither is excluded), each followed by a requeue and a resume from latest, and a finish with every step's
  loss equal to the uninterrupted run's (cases a, b, c);
- one job shows n2 excluded after failing twice (read back from ``scontrol show job``), and, once the test
  clears that, a third failure that spends the budget (max_failures=2): final state "failed", no requeue
  (cases d, e).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from launchers.attempts import (EXCLUDE_AFTER, TaskReport, attempt_lines, backoff_s, decide, empty_history,
                                read_history, record_decision, report_path)
from launchers.cli import main as submit_cli
from launchers.config import LaunchConfig
from launchers.manage import format_status, status, tail
from launchers.submit import submit
from launchers.supervisor import (STACK_DUMP_SIGNAL, ChildPaths, Supervisor, WatchdogLimits, child_paths,
                                  process_state, waiting_in_collective)
from pixeldit.train.heartbeat import Heartbeat, read_heartbeat
from launch_helpers import TASK_ENV, finished, logged_steps, needs_slurm, run_config, wait_for
from train_helpers import ROOT

# ---- the decision, without SLURM ---------------------------------------------------------------------------


def report(rank: int, host: str, outcome: str = "failed", primary: bool = False, code: int | None = 1,
           reason: str = "", certain: bool = False) -> TaskReport:
    return TaskReport("77", 0, rank, host, outcome, reason or f"{outcome} on {host}", code, None, primary, 3,
                      certain=certain)


def test_a_certain_cause_clears_the_peers_stall():
    """Seen in CI: n1's trainer stopped (SIGSTOP), n2's stuck in DeepSpeed's ZeRO reduction waiting for it, whose
    frames are not under torch.distributed: both watchdogs fired, both looked primary, and n2 (killed in the
    attempt before) was excluded from a job that needs both nodes. The stopped trainer is the cause."""
    launch = slurm_launch(max_failures=3)
    history = {**empty_history(), "failures": 1,
               "attempts": [{"attempt": 0, "primary_hosts": ["n2"], "action": "requeue"}]}
    stopped = report(0, "n1", primary=True, certain=True, code=None, reason="watchdog stall on n1; trainer stopped")
    peer = report(1, "n2", primary=True, code=None, reason="watchdog stall on n2; trainer state R, not in a collective")
    decision = decide(history, {0: stopped, 1: peer}, 2, launch)
    assert decision.primary_hosts == ["n1"] and decision.exclude == [] and "stall on n2" not in decision.reason
    # without a certain cause, both stalls count (and n2, primary twice, is excluded)
    unsure = report(0, "n1", primary=True, code=None, reason="watchdog stall on n1; not in a collective")
    assert decide(history, {0: unsure, 1: peer}, 2, launch).exclude == ["n2"]


def slurm_launch(**kw) -> LaunchConfig:
    return LaunchConfig(cluster="slurm", nodes=2, tasks_per_node=1, time_min=10, failure_backoff_s=30,
                        failure_backoff_max_s=100, **kw)


def test_failures_spend_their_own_budget_with_growing_backoff():
    launch = slurm_launch(max_failures=2, max_requeues=1)
    history = empty_history()
    killed = {0: report(0, "n1"), 1: report(1, "n2", primary=True, code=None, reason="killed by signal 9 on n2")}
    backoffs = []
    for attempt in range(2):
        decision = decide(history, killed, 2, launch)
        assert (decision.action, decision.failure) == ("requeue", True)
        assert decision.reason == "killed by signal 9 on n2"  # the primary failure, not the peer's error
        backoffs.append(decision.backoff_s)
        history = record_decision(history, attempt, killed, decision)
    assert backoffs == [30, 60] and backoff_s(3, launch) == 100  # doubling, capped at failure_backoff_max_s
    assert (history["failures"], history["requeues"]) == (2, 0)
    final = decide(history, killed, 2, launch)
    assert final.action == "fail" and "failure budget spent (3 failed attempts, max_failures=2)" in final.reason
    history = record_decision(history, 2, killed, final)
    assert history["final"]["state"] == "failed"
    assert attempt_lines(history)[-1].startswith("final: failed (killed by signal 9 on n2; failure budget spent")
    # preemption has its own budget, untouched by the failures
    stopped = {r: report(r, h, "stopped", code=0) for r, h in ((0, "n1"), (1, "n2"))}
    assert decide(history, stopped, 2, launch).action == "requeue"
    assert decide({**history, "requeues": 1}, stopped, 2, launch).action == "stop"


def test_a_node_with_primary_failures_in_two_attempts_is_excluded():
    launch = slurm_launch(max_failures=5)
    history = empty_history()
    stall_n2 = {0: report(0, "n1"), 1: report(1, "n2", primary=True, code=None)}
    first = decide(history, stall_n2, 2, launch)
    assert first.exclude == [] and first.primary_hosts == ["n2"]
    history = record_decision(history, 0, stall_n2, first)
    # a peer's collective error (exit 1, not primary) on n1 never counts against n1
    peer_only = {0: report(0, "n1"), 1: report(1, "n2")}
    history = record_decision(history, 1, peer_only, decide(history, peer_only, 2, launch))
    assert history["excluded"] == []
    second = decide(history, stall_n2, 2, launch)
    assert EXCLUDE_AFTER == 2 and second.exclude == ["n2"]
    history = record_decision(history, 2, stall_n2, second)
    assert history["excluded"] == ["n2"] and "excluding n2" in attempt_lines(history)[-1]


def test_missing_reports_user_errors_and_cancels():
    launch = slurm_launch(max_failures=5)
    lone = decide(empty_history(), {0: report(0, "n1", "finished", code=0)}, 2, launch, waited_s=90)
    assert lone.action == "requeue" and "no report from rank 1 within 90 s" in lone.reason
    user = decide(empty_history(), {0: report(0, "n1", code=2), 1: report(1, "n2", code=2)}, 2, launch)
    assert user.action == "fail" and "user error (exit code 2) is not retried" in user.reason
    cancel = decide(empty_history(), {0: report(0, "n1", "cancelled", code=None)}, 2, launch)
    assert cancel.action == "cancel"
    done = {r: report(r, h, "finished", code=0) for r, h in ((0, "n1"), (1, "n2"))}
    assert decide(empty_history(), done, 2, launch).action == "finish"


def test_launch_config_checks_the_new_knobs():
    with pytest.raises(ValueError, match="watchdog_floor_s must be > 0"):
        LaunchConfig(watchdog_floor_s=0)
    with pytest.raises(ValueError, match="max_failures must be >= 0"):
        LaunchConfig(max_failures=-1)
    with pytest.raises(ValueError, match="failure_backoff_max_s .* must be >= failure_backoff_s"):
        LaunchConfig(failure_backoff_s=60, failure_backoff_max_s=10)
    with pytest.raises(ValueError, match="at most 5 times in all, got max_requeues=3 \\+ max_failures=3"):
        LaunchConfig(cluster="local", max_failures=3)


def test_status_shows_each_attempt_under_its_job():
    rows = [{"job_id": "9", "cluster": "slurm", "state": "FAILED", "result": "error", "requeues": 0,
             "submitted": "2026-01-01T00:00:00", "folder": "/runs/x/slurm/a",
             "attempts": ["attempt 0: killed by signal 9 on n2 -> requeued after 1 s", "final: failed (budget)"]}]
    head, job, first, last = format_status(rows).splitlines()
    assert job.split()[:3] == ["9", "slurm", "FAILED"]
    assert first == "    attempt 0: killed by signal 9 on n2 -> requeued after 1 s"
    assert last == "    final: failed (budget)"


# ---- heartbeat, watchdog and supervisor, against a small child process --------------------------------------


def test_heartbeat_record_and_watchdog_limits(tmp_path):
    beat = Heartbeat(tmp_path / "hb.json", rank=3, min_interval_s=0)
    beat.beat("start", 0)
    limits = WatchdogLimits(floor_s=10, factor=5, startup_s=100)
    assert limits.limit(read_heartbeat(tmp_path / "hb.json")) == 100  # before the first step: start-up window
    for step, seconds in enumerate((1.0, 4.0, 3.0), start=1):
        beat.beat("step", step, seconds)
    record = read_heartbeat(tmp_path / "hb.json")
    assert (record["rank"], record["step"], record["phase"], record["median_step_s"], record["pid"]) == \
        (3, 3, "step", 3.0, os.getpid())
    assert limits.limit(record) == 15 and limits.limit({**record, "median_step_s": 1.0}) == 10
    with pytest.raises(ValueError, match="valid values: start, step, save, validation, done"):
        beat.beat("resting", 4)
    Heartbeat(None, 0).beat("step", 1, 1.0)  # PIXELDIT_HEARTBEAT unset: nothing written, no error
    throttled = Heartbeat(tmp_path / "fast.json", rank=0, min_interval_s=3600)
    for step in range(1, 5):
        throttled.beat("step", step, 0.5)  # fast steps: only the first is written, all enter the median
    assert read_heartbeat(tmp_path / "fast.json")["step"] == 1 and throttled.median_step_s() == 0.5
    throttled.beat("save", 4)  # any other phase is written at once
    assert read_heartbeat(tmp_path / "fast.json")["phase"] == "save"
    assert read_heartbeat(tmp_path / "none.json") is None


def test_stack_dump_tells_a_collective_wait_from_other_work():
    waiting = textwrap.dedent("""\
        Thread 0x00007f (most recent call first):
          File "/v/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2050 in all_reduce
          File "/w/pixeldit/train/step.py", line 80 in agree
        """)
    working = waiting.replace("/v/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py",
                              "/w/pixeldit/train/loader.py")
    assert waiting_in_collective(waiting) and not waiting_in_collective(working)


CHILD = """
import faulthandler, sys, time
from pixeldit.train.heartbeat import Heartbeat
faulthandler.register({sig}, file=open(sys.argv[1], "a"), all_threads=True)
beat = Heartbeat(sys.argv[2], 0, min_interval_s=0)
for step in range(1, 4):
    time.sleep(0.05)
    beat.beat("step", step, 0.05)
def train_forever():
    while True:
        time.sleep(0.1)
train_forever()
"""


def child_supervisor(tmp_path: Path, floor_s: float) -> Supervisor:
    paths = ChildPaths(tmp_path / "hb.json", tmp_path / "result.json", tmp_path / "stacks.txt")
    cmd = [sys.executable, "-c", CHILD.format(sig=int(STACK_DUMP_SIGNAL)), str(paths.stacks), str(paths.heartbeat)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return Supervisor(cmd, env, paths, WatchdogLimits(floor_s, 1.0, startup_s=60), rank=1, host="n2")


def stop_child_after_step_3(sup: Supervisor, sig: int) -> None:
    def act():
        beat = read_heartbeat(sup.paths.heartbeat)
        if beat is None or beat["step"] < 3:
            return False
        os.kill(beat["pid"], sig)
        return True

    wait_for(act, "the child's third heartbeat", timeout=60)


def test_supervisor_dumps_and_kills_a_stopped_trainer(tmp_path):
    sup = child_supervisor(tmp_path, floor_s=2.0)
    threading.Thread(target=stop_child_after_step_3, args=(sup, signal.SIGSTOP), daemon=True).start()
    out = sup.run()
    assert (out.outcome, out.primary, out.step, out.signal) == ("failed", True, 3, signal.SIGKILL)
    assert re.search(r"watchdog stall on n2 \(rank 1\) after \d+ s without a heartbeat \(limit 2 s, last: step at "
                     r"step 3\); trainer stopped \(SIGSTOP\)", out.reason), out.reason
    dump = (tmp_path / "stacks.txt").read_text()
    assert "most recent call first" in dump and "in train_forever" in dump  # the stopped child's Python frames
    assert process_state(sup.child.pid) == "?"  # killed and reaped


def test_supervisor_reports_a_kill_9(tmp_path):
    sup = child_supervisor(tmp_path, floor_s=60.0)
    threading.Thread(target=stop_child_after_step_3, args=(sup, signal.SIGKILL), daemon=True).start()
    out = sup.run()
    assert (out.outcome, out.primary, out.signal) == ("failed", True, 9)
    assert out.reason == "trainer killed by signal 9 (SIGKILL) on n2 (rank 1) at step 3"


# ---- true two-node SLURM jobs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(launch_dataset) -> Path:
    return launch_dataset


def two_node_launch(**kw) -> LaunchConfig:
    kw = {"max_failures": 2, "watchdog_floor_s": 60.0, "watchdog_startup_s": 300.0, **kw}
    return LaunchConfig(cluster="slurm", nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=10, env=TASK_ENV,
                        max_requeues=2, failure_backoff_s=1, failure_backoff_max_s=2, watchdog_factor=10, **kw)


def trainer_on(folder: Path, job_id: str, host: str, not_pids: set[int], min_step: int = 0) -> dict | None:
    """The heartbeat of the live trainer on ``host`` (a new one: not in ``not_pids``) once it passed min_step."""
    for rank in range(2):
        beat = read_heartbeat(child_paths(folder, job_id, rank, attempt=0).heartbeat)  # the same file every attempt
        if (beat and beat["host"] == host and beat["pid"] not in not_pids and beat["step"] >= min_step
                and process_state(beat["pid"]) not in ("?", "Z")):
            return beat
    return None


def signal_trainer(sub, host: str, sig: int, done: set[int], min_step: int = 0, timeout: float = 240,
                   phases: tuple[str, ...] = ("start", "step", "save")) -> dict:
    found: list[dict] = []

    def ready() -> bool:
        beat = trainer_on(sub.folder, sub.jobs[0].job_id, host, done, min_step)
        if beat is not None and beat["phase"] in phases:
            found.append(beat)
        return bool(found)

    wait_for(ready, f"a trainer on {host} past step {min_step}", timeout)
    os.kill(found[0]["pid"], sig)
    done.add(found[0]["pid"])
    return found[0]


def assert_same_losses(run: Path, reference: Path) -> None:
    """Every step of the reference once or more (steps re-run after a kill), each time with the same loss."""
    seen: dict[int, set[float]] = defaultdict(set)
    for step, loss in logged_steps(run):
        seen[step].add(loss)
    ref = dict(logged_steps(reference))
    assert sorted(seen) == sorted(ref) and all(seen[s] == {ref[s]} for s in ref), (dict(seen), ref)


def sacct_runs(job_id: str) -> list[str]:
    return subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"], capture_output=True,
                          text=True).stdout.split()


@needs_slurm
def test_two_node_job_survives_a_kill_and_a_hang(local_reference, dataset, tmp_path):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), two_node_launch(watchdog_floor_s=20.0),
                 ["checkpoint.every=2"])
    job_id, done = sub.jobs[0].job_id, set()
    signal_trainer(sub, "n2", signal.SIGKILL, done, min_step=3)  # b: kill -9 of the trainer on n2
    # c: a hung trainer after the resume (past its start-up: "step" beats come at most once a second, so a
    # "save" beat counts too)
    stopped = signal_trainer(sub, "n1", signal.SIGSTOP, done, min_step=5, phases=("step", "save"))
    t_stop = time.time()
    result = finished(sub.jobs[0])
    assert (result["status"], result["failures"], result["step"]) == ("finished", 2, 8), tail(run, 200)
    assert_same_losses(run, local_reference)  # a: the 2-node job's numbers = the 2-rank run on one node
    history = read_history(sub.folder, job_id)
    first, second, last = history["attempts"]
    assert first["primary_hosts"] == ["n2"] and "trainer killed by signal 9 (SIGKILL) on n2 (rank 1)" in first["reason"]
    # the stopped trainer's node is to blame, not n2's trainer that waited for it in a collective
    assert second["primary_hosts"] == ["n1"] and "on n1 (rank 0)" in second["reason"], second
    assert "trainer stopped (SIGSTOP)" in second["reason"] and history["excluded"] == []
    assert last["action"] == "finish" and history["final"]["state"] == "finished"
    limit = re.search(r"limit (\d+) s", second["reason"]).group(1)
    assert limit == "20"  # floor 20 s > 10 x the median step
    stall = json.loads(report_path(sub.folder, job_id, attempt=1, rank=0).read_text())
    assert stall["time"] - t_stop < 20 + 60, "the watchdog noticed the stall within its limit (plus load slack)"
    dump = Path(stall["stack_dump"]).read_text()
    assert "most recent call first" in dump and "pixeldit/train/" in dump  # the trainer's own Python frames
    assert stopped["host"] == "n1" and sacct_runs(job_id).count("REQUEUED") == 2  # requeued twice, then done
    lines = "\n".join(status(run)[-1]["attempts"])
    assert "attempt 0: trainer killed by signal 9 (SIGKILL) on n2 (rank 1)" in lines and "final: finished" in lines


@needs_slurm
def test_a_node_failing_twice_is_excluded_and_a_spent_budget_fails_the_job(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    sub = submit(str(run_config(tmp_path / "run.yaml", run, dataset)), two_node_launch(max_failures=2),
                 ["checkpoint.every=2"])
    job_id, done = sub.jobs[0].job_id, set()
    for _ in range(2):  # d: n2's trainer killed in two attempts
        signal_trainer(sub, "n2", signal.SIGKILL, done)
    wait_for(lambda: len(read_history(sub.folder, job_id)["attempts"]) == 2, "the second decision", timeout=240)
    wait_for(lambda: "ExcNodeList=n2" in scontrol_job(job_id) and "JobState=PENDING" in scontrol_job(job_id),
             "the requeued job pending without n2", timeout=60)
    assert read_history(sub.folder, job_id)["excluded"] == ["n2"]
    # the two-node job cannot run without n2: the test clears the list (as an operator would after a repair)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "ExcNodeList="], check=True)
    signal_trainer(sub, "n2", signal.SIGKILL, done)  # e: a third failure, max_failures=2
    wait_for(lambda: status(run)[-1]["state"] == "FAILED", "the job to fail", timeout=240)
    history = read_history(sub.folder, job_id)
    assert history["final"]["state"] == "failed" and history["failures"] == 3
    capsys.readouterr()
    assert submit_cli(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"{job_id}\s+slurm\s+FAILED\s+error", out), out
    assert "attempt 1: trainer killed by signal 9 (SIGKILL) on n2 (rank 1)" in out and "excluding n2" in out
    assert re.search(r"final: failed \(trainer killed by signal 9 \(SIGKILL\) on n2 \(rank 1\) at step \d+; "
                     r"failure budget spent \(3 failed attempts, max_failures=2\)\)", out), out
    time.sleep(8)  # longer than SLURM's requeue delay: no further attempt starts
    assert sacct_runs(job_id) == ["REQUEUED", "REQUEUED", "FAILED"] and job_id not in squeue_ids()


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def squeue_ids() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
