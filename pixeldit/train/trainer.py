"""``run_training``: the distributed training loop, read top to bottom.

    cfg = load_config("run.yaml", ["stages.0.steps=100"])
    result = run_training(cfg)          # under torchrun / SLURM (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)

Outline:
 0. ``preflight``: the config and every file it names are checked before anything starts;
 1. (startup.py) join the process group (env vars set by the caller; a lone process becomes rank 0 of 1) with the start-up
    collective timeout, tightened after the first completed step; a failed collective dumps every rank's stacks
    into the log folder and raises ``CollectiveError`` (collectives.py); rank 0 takes the
    run-folder lock (``run_lock``: one trainer per run folder) and every rank learns the outcome, so all
    ranks stop together when another trainer holds it;
 2. apply the S3 timeouts and retries of ``data.s3``; rank 0 saves the config into the run folder (credentials
    redacted); find the resume point (``checkpoints/latest``, checked; a damaged one falls back to the newest
    intact step folder, said in one line); a run with no checkpoint yet and ``checkpoint.init_from`` starts from
    that release's weights (warm_start.py; checked in preflight); rank 0 checks every shard of every remaining
    stage against its manifest and all ranks stop with one error naming the damaged ones (before any engine is
    built); the runtime preflight checks every node (node_check.py: matmul, all-reduce bandwidth, free disk,
    data read rate; into metrics.jsonl; a failure names host and rank);
 3. for each curriculum stage from the one the checkpoint is in: build the engine (engine.py; compiled per
    block on CUDA), the EMA, the loader; load the checkpoint (the same path serves a resume and a stage
    boundary, so both are exact; the loader's state is world-size independent); print the stage's buckets and
    the data-rate line; wrap the loader in the device prefetcher (prefetch.py); agree on the stop flag;
 4. every step (step.py, no host synchronisation of its own): set the LR; for each micro-batch take the
    prepared batch (on the device, its condition built), compute the loss with a generator seeded by
    (seed, rank, step, micro), backward; one all-reduce of the step's loss terms, non-finite count and stop
    flag; optimizer step; EMA update if the step was applied; log (the record of a step is written one step
    later, when its device timings and gradient norm are ready without waiting); the validation loss on the
    held-out split every ``validation.every`` steps (validation.py: into metrics.jsonl and wandb); checkpoint
    every N steps and at the end of the stage (then ``on_checkpoint`` on rank 0: the launcher's eval jobs);
    stop after the step if any rank asked to; every ``straggler.every`` steps the per-rank step-time windows
    (stragglers.py: one all_gather, slow ranks flagged with their host);
 5. skipped steps (the contract, ``skip_reason``): a step counts as applied only when the optimizer applied
    it. A non-finite loss (its NaN-gated last backward makes DeepSpeed drop the step's gradients), a
    non-finite gradient norm, or an update DeepSpeed did not apply (its overflow check) is a skipped step:
    counted in ``nonfinite_total``, logged with ``skipped: true`` and its ``skip_reason``, no EMA update, no
    periodic checkpoint while the streak lasts; ``max_consecutive_nonfinite`` skipped steps in a row log the
    last one and raise ``NonFiniteLossError`` naming that logged step, leaving the last good checkpoint as
    ``latest``;
 6. loss spikes (spikes.py, ``spike.enabled``): a step is judged when its record is written (or, when it has
    a checkpoint, validation or preview due, just before them); a spike records its samples and the skip,
    leaves the stage loop and re-enters step 3 from the last checkpoint (the resume path), the spiked global
    batch skipped.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist

from pixeldit.errors import CheckpointError
from pixeldit.models import ModelArgs
from pixeldit.run_folder import RUN_CONFIG, read_meta
from pixeldit.s3 import configure_s3
from pixeldit.storage import is_local

from .checkpoint import CheckpointManager, untie_optimizer_steps
from .collectives import CollectiveGuard, is_collective_error
from .conditioning import TextConditioner, build_conditioner, build_teacher, load_text_encoder
from .config import RunConfig, save_config
from .curriculum import Curriculum
from .ema import EMA
from .engine import EngineBundle, build_engine
from .fault_hooks import inject_step_faults
from .heartbeat import build_heartbeat
from .loader import build_loader, build_node_cache, data_rate_line
from .metrics import FlopCounter, MetricsLogger, StepPhases, device_peak_tflops
from .node_check import run_node_check
from .preflight import preflight
from .prefetch import DevicePrefetcher
from .preview import write_preview
from .run_lock import RunLock
from .validation import build_validator, validation_record, wandb_values
from .spikes import CLIENT_KEY as SPIKE_KEY, SpikeLimitError, build_spike_guard
from .startup import DistInfo, check_data, checkpoint_meta, init_distributed, take_run_lock
from .step import NonFiniteLossError, StepOutcome, agree, skip_reason, train_step
from .stragglers import StragglerMonitor
from .warm_start import read_init_weights


@dataclass
class TrainResult:
    status: Literal["finished", "stopped"]
    step: int  # optimizer steps completed
    stage: int  # index of the stage of the last step
    checkpoint: str | None  # path of the last checkpoint
    losses: list[float] = field(default_factory=list)  # mean loss of every step run by this call


def run_training(cfg: RunConfig, stop_requested: Callable[[], bool] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None) -> TrainResult:
    """Train ``cfg`` (module docstring). ``stop_requested``: polled every step (all ranks agree), a true value
    saves and stops; ``on_checkpoint(step, step_folder)``: called on rank 0 after every saved checkpoint (the
    launcher submits eval jobs from it)."""
    # 0. nothing started yet: a bad config or a missing file leaves no process group, run folder or wandb run
    preflight(cfg)
    # 1. process group (collective timeouts: pixeldit.train.collectives), run-folder lock
    guard = CollectiveGuard(cfg, int(os.environ.get("RANK", "0")))
    info = init_distributed(guard.startup_timeout)
    lock = None
    try:
        lock, lock_note = take_run_lock(Path(cfg.run_dir), info.rank)
        return _run(cfg, info, lock, lock_note, stop_requested, on_checkpoint, guard)
    except Exception as err:
        if is_collective_error(err):  # every rank dumps its stacks; the error names the timeout and the folder
            raise guard.failure(err) from err
        raise
    finally:
        if lock is not None:
            lock.release()
        if info.owns_group:  # also on errors, so the process exits cleanly
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


def _run(cfg: RunConfig, info: DistInfo, lock: RunLock | None, lock_note: str | None,
         stop_requested: Callable[[], bool] | None,
         on_checkpoint: Callable[[int, Path], None] | None = None, guard: CollectiveGuard | None = None) -> TrainResult:
    # 2. run folder, resume point
    rank, world = info.rank, info.world_size
    configure_s3(cfg.data.s3)
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RUN_CONFIG)
    dist.barrier()
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep, rank, world, cfg.checkpoint.verify,
                             cfg.checkpoint.fallback, lock)
    curriculum = Curriculum(cfg.stages)
    latest, resume_note = ckpt.resume_point()
    universal = False
    if latest is None and cfg.checkpoint.resume_from:  # e.g. a universal checkpoint for a new world size
        latest, universal = Path(cfg.checkpoint.resume_from), cfg.checkpoint.load_universal
    init_state = read_init_weights(cfg) if latest is None and cfg.checkpoint.init_from else None
    meta = read_meta(latest) if latest is not None else {}
    step = meta["step"] if latest is not None else 0
    # where each stage's loader started (the ledger replays the plan from these; pixeldit.train.ledger)
    segments = list(meta.get("data_segments", []))
    problems = check_data(cfg, curriculum.stage_of(min(step, curriculum.total_steps - 1)), rank)
    remote = any(not is_local(src.path) for s in cfg.stages for src in s.data_sources())
    node_cache = build_node_cache(cfg) if remote else None
    args = cfg.model.args()
    if "model_args" in meta:  # e.g. a run from before rope_positions existed keeps its integer positions
        saved, wanted = ModelArgs.from_dict(meta["model_args"]).to_dict(), args.to_dict()
        changed = {k: (v, wanted[k]) for k, v in saved.items() if wanted[k] != v}
        if changed:
            raise ValueError(f"{latest}: the checkpoint's model differs from the run config (key: (checkpoint, "
                             f"config)) {changed}; set model.overrides to the checkpoint's values")
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    teacher = build_teacher(cfg, device)
    encoder = load_text_encoder(cfg, args, device)
    metrics = MetricsLogger(cfg, rank, world, step)
    for note in (lock_note, resume_note):
        if note:
            metrics.write(f"note: {note}")
    if cfg.node_check.enabled:  # is every node fit? (pixeldit.train.node_check; every start and restart)
        run_node_check(cfg, rank, world, device, step, curriculum.stage_of(min(step, curriculum.total_steps - 1)),
                       metrics.write)
    stragglers = StragglerMonitor(cfg.straggler, rank, world, device)
    flops = FlopCounter(args)
    heartbeat = build_heartbeat(rank)  # PIXELDIT_HEARTBEAT: the launcher's supervisor watches it
    losses: list[float] = []
    nonfinite = {"consecutive": 0, "total": 0}
    spike_guard = build_spike_guard(cfg, rank, world)  # loss spikes: detection, skip list, rollback (spikes.py)
    status: Literal["finished", "stopped"] = "finished"
    try:
        # 3. stages
        while step < curriculum.total_steps and status == "finished":
            stage_index = curriculum.stage_of(step)
            span, stage = curriculum.span(stage_index), cfg.stages[stage_index]
            objective = cfg.stage_objective(stage)
            conditioner = build_conditioner(cfg, args, device, stage_index, encoder, node_cache)
            bundle = build_engine(cfg, stage_index, world, teacher.dim if teacher is not None else None, universal,
                                  init_state)
            ema = EMA(bundle.model, cfg.ema_decay, bundle.zero3, world, rank)
            if init_state is not None:  # weights only: the EMA starts there too; later stages load checkpoints
                ema.load_full(init_state)
                metrics.write(f"model and EMA initialised from {cfg.checkpoint.init_from} (fresh optimizer)")
                init_state = None
            loader = build_loader(cfg, stage_index, rank, world,
                                  args.num_classes if args.conditioning == "class" else None,
                                  problems=problems[stage_index], cache=node_cache,
                                  extra_files=getattr(conditioner, "prefetch_files", None))
            if isinstance(conditioner, TextConditioner):  # a cache must hold every caption the plan draws
                conditioner.check_captions(loader.dataset.sources)
            notes, continued, client = list(loader.notes), False, None
            if latest is not None:
                client = ckpt.load(bundle.engine, latest, ema=ema)
                if universal and bundle.zero3:  # DeepSpeed's ZeRO-3 universal load ties the groups' step counters
                    untie_optimizer_steps(bundle.engine.optimizer.optimizer)
                if client.get("stage_index") == stage_index:  # mid-stage: continue the stream
                    note = loader.load_state_dict(client["loader"])
                    notes.append(note)
                    continued = note is None
                nonfinite = dict(client.get("nonfinite", nonfinite))
            spike_guard.start_stage(loader, stage_index, client)  # the skip list, applied to the loader
            if not continued:  # a stage start, or a resume the plan does not continue exactly
                segments.append(loader.segment(step))
            metrics.write(f"stage {stage_index} ({stage.name}): steps {span.start}..{span.end - 1}, "
                          f"{len(loader)} micro-batches per epoch per rank, start at step {step}"
                          + (f"; compiled ({'dynamic' if bundle.compile.dynamic else 'static'} shapes), the first "
                             f"step includes compilation" if bundle.compile.enabled else ""))
            validator, val_note = build_validator(cfg, stage_index, rank, world, device)
            if val_note:
                metrics.write(f"note: {val_note}")
            for line in [n for n in notes if n] + loader.plan.describe():
                metrics.write(f"  {line}")
            if rank == 0:
                metrics.write("  " + data_rate_line(cfg, stage_index, loader, flops, world,
                                                    device_peak_tflops(cfg.logging.peak_tflops)))
            saved_at = step if latest is not None and latest.parent == ckpt.root else -1
            universal = False  # later loads (stage boundaries) read this run's own checkpoints
            batches = DevicePrefetcher(loader, bundle.device, conditioner, remaining=(span.end - step) * stage.grad_accum)
            pending: tuple[dict, StepOutcome] | None = None  # the last step's record, written one step later
            rollback: Path | None = None  # a loss spike was judged: the checkpoint to go back to
            judged = -1  # the last step judged for spikes

            def judge(record: dict, done: StepOutcome) -> None:
                """Judge a step once for loss spikes (spikes.py): sets ``rollback``; past the cap its record is
                written and ``SpikeLimitError`` raised."""
                nonlocal rollback, judged
                if record["step"] != judged:
                    judged = record["step"]
                    try:
                        rollback = spike_guard.judge({**record, "grad_norm": done.grad_norm()}, loader, ckpt.latest)
                    except SpikeLimitError:
                        flush()
                        raise

            def flush() -> None:
                nonlocal pending
                if pending is not None:
                    record, done = pending
                    pending = None
                    norm = done.grad_norm()
                    stragglers.add(done.phases.until_sync_s())
                    if done.applied:
                        skip_reason(True, True, norm)  # an update applied with a non-finite norm: raises
                    metrics.log_step({**record, "grad_norm": norm, **done.phases.seconds()})
                    judge(record, done)

            def save() -> Path:
                client_state = {"stage_index": stage_index, "step": step, "loader": batches.state_dict(),
                                "lr_schedule": bundle.schedule.state_dict(), "nonfinite": dict(nonfinite),
                                SPIKE_KEY: spike_guard.state_dict()}
                meta = {**checkpoint_meta(cfg, stage_index, world), "data_segments": segments, **spike_guard.meta()}
                path = ckpt.save(bundle.engine, step, client_state, meta, ema)
                if on_checkpoint is not None and rank == 0:
                    on_checkpoint(step, path)
                return path

            # 4. steps of this stage (the stop flag of later steps travels in each step's all-reduce)
            stop, first = agree(stop_requested is not None and stop_requested(), device), True
            heartbeat.beat("start", step)
            while step < span.end and not stop:
                lr = bundle.schedule.apply(bundle.engine.optimizer, step - span.start)
                phases = StepPhases(bundle.device)
                waited, t0 = batches.wait_s, time.perf_counter()
                inject_step_faults(rank, step)  # test hooks only (pixeldit.train.fault_hooks)
                source = spike_guard.begin_step(step + 1, stage_index, batches)  # where its data is (+ the test hook)
                out = train_step(bundle.engine, source, objective, teacher, device=bundle.device, seed=cfg.seed,
                                 rank=rank, step=step, stop=stop_requested is not None and stop_requested(),
                                 phases=phases)
                # 5. skipped steps: counted, no EMA update (skip_reason; an applied step's gradient norm is
                # checked when its record is written, one step later, see flush)
                reason = skip_reason(not out.nonfinite, out.applied, out.skipped_grad_norm)
                if reason is not None:
                    nonfinite["consecutive"] += 1
                    nonfinite["total"] += 1
                else:
                    nonfinite["consecutive"] = 0
                    with phases.phase("optimizer"):
                        ema.update()
                seconds = time.perf_counter() - t0
                phases.add("data", batches.wait_s - waited)
                if bundle.monitor is not None and first:  # what compiled so far is the stage's warm-up
                    bundle.monitor.first_step_done()
                if first and guard is not None:  # tight collective timeouts from now on
                    guard.first_step_done()
                first = False
                step += 1
                stop = out.stop
                heartbeat.beat("step", step, seconds)
                flush()  # the previous step's record: its device work is complete by now
                if rollback is not None:  # the previous step spiked: this one is undone too
                    break
                if stragglers.due(step):  # per-rank step-time windows (one all_gather per window)
                    metrics.log_metrics(*stragglers.report(step))
                losses.append(out.loss)
                images = stage.micro_batch * stage.grad_accum * world
                model_flops = sum(flops.train_flops(h, w) for h, w in out.sizes) * stage.micro_batch * world
                pending = ({
                    "step": step, "stage": stage_index, "loss": out.loss, "flow": out.flow, "repa": out.repa,
                    "lr": lr, "skipped": reason is not None, "skip_reason": reason,
                    "nonfinite_total": nonfinite["total"], "bucket": out.buckets[0],
                    "bad_samples": len(loader.bad_samples),
                    "samples_per_s": images / seconds, "samples_per_s_per_rank": images / seconds / world,
                    "mfu": metrics.mfu(model_flops, seconds), "step_time_s": seconds,
                    **(_compile_fields(bundle) if bundle.monitor is not None else {}),
                }, out)
                if bundle.monitor is not None:
                    warning = bundle.monitor.over_budget(stage.name)
                    if warning:
                        metrics.write(warning)
                if nonfinite["consecutive"] >= cfg.max_consecutive_nonfinite:
                    flush()
                    raise NonFiniteLossError(
                        f"{nonfinite['consecutive']} skipped steps in a row (non-finite loss or gradient; the last "
                        f"is step {step}, {reason}, stage {stage.name}); stopping. The last good "
                        f"checkpoint is {_latest_or_none(ckpt)}; lower stages[{stage_index}].lr or check the "
                        f"data, then resume")
                if spike_guard.enabled and (stop or step == span.end or step % cfg.checkpoint.every == 0
                                      or (validator is not None and validator.due(step))
                                      or (cfg.logging.image_every and step % cfg.logging.image_every == 0)):
                    judge(*pending)  # before a checkpoint, validation or preview is made from this step
                    if rollback is not None:
                        break
                if validator is not None and validator.due(step):  # the held-out loss (validation.py)
                    val = validator.run(bundle.model, conditioner, bundle.module.autocast_dtype)
                    metrics.log_metrics(validation_record(step, stage_index, val), wandb_values(val),
                                        f"step {step}: validation loss {val['val_loss']:.5f} "
                                        f"({val['val_samples']} held-out samples x 8 timesteps)")
                    heartbeat.beat("validation", step)
                if cfg.logging.image_every and step % cfg.logging.image_every == 0:
                    write_preview(cfg, bundle, ema, conditioner, stage, step, metrics, device)
                periodic = step % cfg.checkpoint.every == 0 and nonfinite["consecutive"] == 0  # none mid-streak
                if periodic or step == span.end or (stop and saved_at != step):
                    t_save = time.perf_counter()
                    latest = save()
                    saved_at = step
                    phases.add("checkpoint", time.perf_counter() - t_save)
                    heartbeat.beat("save", step)
                    flush()  # the save synchronised: write the record now
            flush()
            if rollback is not None:  # back to the last checkpoint through the resume path (exact), data skipped
                metrics.write(spike_guard.describe(rollback))
                latest = rollback
                meta = read_meta(latest)
                step, segments = meta["step"], list(meta.get("data_segments", []))
            elif stop and step < curriculum.total_steps:  # a stop asked during the run's last step changes nothing
                if saved_at != step:
                    latest = save()
                status = "stopped"
            batches.close()
            bundle.engine.destroy()
            del bundle, ema, loader, validator, batches
            if status == "finished":  # the next stage's engine needs the memory (a stop skips it: seconds under load)
                gc.collect()
        dist.barrier()
        heartbeat.beat("done", step)
    finally:
        metrics.close()
    final = ckpt.latest()
    return TrainResult(status, step, curriculum.stage_of(max(step - 1, 0)), str(final) if final else None, losses)


def _latest_or_none(ckpt: CheckpointManager) -> str:
    try:
        return str(ckpt.latest() or "none (no checkpoint yet)")
    except CheckpointError as err:
        return f"unreadable ({err})"


def _compile_fields(bundle: EngineBundle) -> dict[str, int]:
    """Graph compilations of the stage so far and those after its first step (recompiles)."""
    return {"compiled_graphs": bundle.monitor.stage_graphs, "recompiles": bundle.monitor.recompiles}
