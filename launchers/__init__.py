"""Run the trainer on a cluster: submitit jobs on SLURM or the local executor (``pixeldit-submit``).

    from launchers import LaunchConfig, submit, job_result, status, tail, cancel
    sub = submit("run.yaml", LaunchConfig(cluster="slurm", nodes=2, gpus_per_node=8, time_min=2880))
    print(job_result(sub.jobs[0]))     # rank 0's summary: status, step, stage, checkpoint, requeues

Modules: config (LaunchConfig), job (what runs in every task), submit (one job / job arrays),
registry (the run's jobs and their state), manage (status / tail / cancel), eval_jobs (an eval job of its own
every K checkpoints, ``--eval``), cli (``pixeldit-submit``),
quickstart (``pixeldit-quickstart``: the whole pipeline end to end).
"""
from .config import LaunchConfig
from .manage import cancel, status, tail
from .submit import RunBusyError, Submission, job_result, submit, submit_array, sweep_overrides

__all__ = ["LaunchConfig", "RunBusyError", "Submission", "cancel", "job_result", "status", "submit",
           "submit_array", "sweep_overrides", "tail"]
