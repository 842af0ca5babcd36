"""Loss spikes: detect a step whose loss or gradient norm jumps, roll back to the last checkpoint, skip its data.

    guard = build_spike_guard(cfg, rank, world_size)       # once per run (trainer.py)
    guard.start_stage(loader, stage_index, client_state)   # after each checkpoint load / stage start
    source = guard.begin_step(step, stage_index, batches)   # before each step: its data position (and test hook)
    target = guard.judge(record, loader, ckpt.latest)       # when the step's record is written: None or a rollback

Detection (``SpikeDetector``): a robust z-score per (stage, bucket), z = (x - median) / (1.4826 MAD) over the last
``spike.window`` applied steps of that bucket (the spread is at least ``MIN_SPREAD`` x the median, so a flat
history does not make a small rise a spike), for the step loss and for the gradient norm; a bucket is judged
once it has ``spike.min_history`` steps. Only upward jumps count. A spiked step never enters the history.

When a step is judged: its loss is on the host right after the step (the step's one all-reduce), its gradient
norm one step later (the deferred record of trainer.py), so step s is judged when its record is written: during
step s+1, or, when step s has a checkpoint, validation or preview due, just before them (those synchronise
anyway; the record itself is still written after the save, with its checkpoint time). No checkpoint ever holds
an unjudged step, and no host synchronisation is added to other steps.

A spike: rank 0 writes ``{run_dir}/spikes/step_XXXXXXXX.json`` (the step's values, z-scores, its global batch
(stage, epoch, batch) and the (root, key) of every sample of that global batch, from the plan), the skip list
``{run_dir}/spikes/skips.json`` is extended (atomically, at decision time), and the trainer reloads the last
checkpoint through its resume path (exact: weights, optimizer, EMA, RNG, loader, detector history). The loader
then passes over the skipped global batches (``skip_forward``), so the run consumes the next global batch in
their place. Every later checkpoint carries the skip list in its client state and its meta.json (read by
``pixeldit-ledger``, which does not list skipped windows as trained on). A resume merges the checkpoint's list
with the run folder's, so a kill at any point after a decision makes the same decision again.
Without a checkpoint yet there is nothing to roll back to: the spike is recorded (action "none") and training
continues. Past ``spike.max_rollbacks`` the run stops with ``SpikeLimitError`` naming the spiked steps and the last
good checkpoint; a resume meets the same spike again and stops again until the config or the data changes.

Test hook: ``PIXELDIT_TEST_SPIKE="step=6,scale=50"`` multiplies every micro-batch's x0 (inputs and targets) of the
global batch that optimizer step 6 draws first by 50; the position is kept in ``spikes/test_injection_rank{r}.json``
so the same data is scaled again after a kill and resume, and the window that replaces it is not.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch.distributed as dist

from pixeldit import run_folder
from pixeldit.storage import write_json_atomic

from .config import RunConfig, SpikeSection

SPIKES_DIR = "spikes"  # {run_dir}/spikes/
SKIPS_FILE = "skips.json"  # the skip list: {"version": 1, "skips": [entry, ...]}
SKIPS_VERSION = 1
SPIKE_FILE = "step_{step:08d}.json"  # one per detected spike
INJECTION_FILE = "test_injection_rank{rank:05d}.json"
TEST_SPIKE_ENV = "PIXELDIT_TEST_SPIKE"
CLIENT_KEY = "spike"  # checkpoint client state and meta.json key
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x this = its standard deviation
MIN_SPREAD = 0.05  # the spread of a z-score is at least 5% of the median


class SpikeLimitError(RuntimeError):
    """More loss spikes than ``spike.max_rollbacks``; the run stops and keeps its last good checkpoint."""


def spikes_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / SPIKES_DIR


def robust_zscore(value: float, history: Iterable[float]) -> float:
    """(value - median) / max(1.4826 MAD, MIN_SPREAD |median|) of ``history`` (not empty)."""
    h = np.fromiter(history, dtype=np.float64)
    med = float(np.median(h))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(h - med))), MIN_SPREAD * abs(med), 1e-12)
    return (value - med) / spread


class SpikeDetector:
    """Per-key windows of the loss and of the gradient norm of recent applied steps (a step without a known norm
    adds a loss only); ``score`` then ``add`` for each step."""

    def __init__(self, window: int, min_history: int):
        self.window, self.min_history = window, min_history
        self.history: dict[str, dict[str, collections.deque]] = {}  # key -> {"loss": ..., "grad_norm": ...}

    def score(self, key: str, loss: float, grad_norm: float | None) -> tuple[float | None, float | None]:
        """(z of the loss, z of the gradient norm) against the key's history; None where it is too short."""
        hist = self.history.get(key, {"loss": (), "grad_norm": ()})
        losses, norms = hist["loss"], hist["grad_norm"]
        z_loss = robust_zscore(loss, losses) if len(losses) >= self.min_history else None
        z_grad = (robust_zscore(grad_norm, norms)
                  if grad_norm is not None and len(norms) >= self.min_history else None)
        return z_loss, z_grad

    def add(self, key: str, loss: float, grad_norm: float | None) -> None:
        hist = self.history.setdefault(key, {name: collections.deque(maxlen=self.window)
                                             for name in ("loss", "grad_norm")})
        hist["loss"].append(loss)
        if grad_norm is not None:
            hist["grad_norm"].append(grad_norm)

    def steps(self, key: str) -> int:
        return len(self.history[key]["loss"]) if key in self.history else 0

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        return {k: {name: list(d) for name, d in hist.items()} for k, hist in self.history.items()}

    def load_state_dict(self, state: dict[str, dict[str, list[float]]]) -> None:
        self.history = {k: {name: collections.deque(values, maxlen=self.window) for name, values in hist.items()}
                        for k, hist in state.items()}


def skip_forward(epoch: int, batch: int, batches_in: Callable[[int], int],
                 skipped: set[tuple[int, int]] | frozenset) -> tuple[int, int]:
    """(epoch, global batch) moved past epoch ends and skipped global batches (the loader and the ledger walk
    the plan with it); ``batches_in(epoch)``: global batches of that epoch (0: returned as is, the caller raises)."""
    while True:
        n = batches_in(epoch)
        if n and batch >= n:
            epoch, batch = epoch + 1, 0
        elif n and (epoch, batch) in skipped:
            batch += 1
        else:
            return epoch, batch


def positions(skips: Iterable[dict[str, Any]], stage_index: int) -> frozenset[tuple[int, int]]:
    """The (epoch, global batch) of the skip entries of one stage."""
    return frozenset((int(s["epoch"]), int(s["batch"])) for s in skips if int(s["stage"]) == stage_index)


def read_skips(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run folder's skip list ([] without one)."""
    path = spikes_dir(run_dir) / SKIPS_FILE
    if not path.exists():
        return []
    try:
        tree = json.loads(path.read_text())
        if tree.get("version") != SKIPS_VERSION:
            raise ValueError(f"version {tree.get('version')!r}, expected {SKIPS_VERSION}")
        return list(tree["skips"])
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: not a skip list ({err}); restore it from the newest checkpoint's meta.json "
                         f"('{CLIENT_KEY}' -> 'skips') or delete it to keep only the checkpoint's list") from None


def merge_skips(*lists: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The union of skip lists (one entry per (stage, epoch, batch), the first seen), in decision order."""
    out: dict[tuple[int, int, int], dict[str, Any]] = {}
    for entries in lists:
        for s in entries:
            out.setdefault((int(s["stage"]), int(s["epoch"]), int(s["batch"])), dict(s))
    return sorted(out.values(), key=lambda s: int(s["decided"]))


def ledger_skips(run_dir: str | os.PathLike, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The skip list the ledger applies: a checkpoint's meta.json and the run folder's file merged."""
    return merge_skips(meta.get(CLIENT_KEY, {}).get("skips", []), read_skips(run_dir))


class _ScaledBatches:
    """The step's batch source with every micro-batch's x0 multiplied by ``scale`` (the test hook)."""

    def __init__(self, batches, scale: float):
        self.batches, self.scale = batches, scale

    def next(self):
        item = self.batches.next()
        return dataclasses.replace(item, x0=item.x0 * self.scale)

    def preload(self) -> None:
        self.batches.preload()


def parse_injection(text: str) -> tuple[int, float]:
    """``"step=6,scale=50"`` -> (6, 50.0)."""
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        return int(fields["step"]), float(fields["scale"])
    except (ValueError, KeyError):
        raise ValueError(f"{TEST_SPIKE_ENV}={text!r}: expected 'step=N,scale=X' (N: an optimizer step, 1-based)") \
            from None


class SpikeGuard:
    """The run's spike detection and skip list (module docstring)."""

    def __init__(self, section: SpikeSection, run_dir: Path, rank: int, world_size: int,
                 injection: tuple[int, float] | None = None):
        self.section, self.run_dir, self.rank, self.world_size = section, run_dir, rank, world_size
        self.enabled = section.enabled
        self.detector = SpikeDetector(section.window, section.min_history)
        self.skips: list[dict[str, Any]] = []
        self.injection = injection
        self._positions: dict[int, tuple[int, int, int]] = {}  # step -> (stage, epoch, global batch) of its data

    # ---- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint's client state (history and skip list) and meta.json."""
        return {"history": self.detector.state_dict(), "skips": [dict(s) for s in self.skips]}

    def meta(self) -> dict[str, Any]:
        return {CLIENT_KEY: {"skips": [dict(s) for s in self.skips]}}

    def start_stage(self, loader, stage_index: int, client_state: dict[str, Any] | None) -> None:
        """After a checkpoint load (``client_state``, None for a fresh start): the detector history of that
        checkpoint, the skip list of the checkpoint merged with the run folder's (read on rank 0, sent to all),
        applied to ``loader`` (which then stands past skipped global batches)."""
        saved = (client_state or {}).get(CLIENT_KEY, {})
        self.detector.load_state_dict(saved.get("history", {}))
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box = [("ok", read_skips(self.run_dir))]
            except ValueError as err:
                box = [("error", str(err))]
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise ValueError(box[0][1])
        self.skips = merge_skips(saved.get("skips", []), box[0][1])
        loader.set_skips(positions(self.skips, stage_index))
        self._positions.clear()

    # ---- per step ----------------------------------------------------------------------------------------------

    def begin_step(self, step: int, stage_index: int, batches):
        """Before optimizer step ``step`` (1-based): note where its data is; returns the batch source for it."""
        state = batches.state_dict()
        where = (stage_index, int(state["epoch"]), int(state["batch"]))
        self._positions = {step: where, **{s: p for s, p in self._positions.items() if s >= step - 2}}
        if self.injection is None or not self._injected_here(step, where):
            return batches
        return _ScaledBatches(batches, self.injection[1])

    def _injected_here(self, step: int, where: tuple[int, int, int]) -> bool:
        path = spikes_dir(self.run_dir) / INJECTION_FILE.format(rank=self.rank)
        if path.exists():
            return tuple(json.loads(path.read_text())["position"]) == where
        if step != self.injection[0]:
            return False
        write_json_atomic(path, {"step": step, "position": list(where)})
        return True

    def judge(self, record: dict[str, Any], loader, latest: Callable[[], Path | None]) -> Path | None:
        """Judge the step of ``record`` (its logged values, grad_norm included): None, or the checkpoint to roll
        back to (after writing the spike file and the skip list). ``latest``: the run's last checkpoint (read on a
        spike only). Raises ``SpikeLimitError`` past the cap."""
        if not self.enabled or record["skipped"] or record["loss"] is None or not np.isfinite(record["loss"]):
            return None
        step, loss, norm = int(record["step"]), float(record["loss"]), record.get("grad_norm")
        key = f"{record['stage']}/{record['bucket']}"
        z_loss, z_grad = self.detector.score(key, loss, norm)
        s = self.section
        over = [name for name, z, limit in (("loss", z_loss, s.zscore_loss), ("grad_norm", z_grad, s.zscore_grad))
                if limit > 0 and z is not None and z > limit]
        if not over:
            self.detector.add(key, loss, norm)
            return None
        stage_index, epoch, batch = self._positions[step]
        last_checkpoint = latest()
        if last_checkpoint is not None and run_folder.step_of(last_checkpoint) >= step:
            raise RuntimeError(f"step {step} was judged after checkpoint {last_checkpoint} was saved; the trainer must "
                               f"judge a step before its checkpoint (pixeldit.train.spikes)")
        report = {"step": step, "stage": stage_index, "bucket": record["bucket"], "epoch": epoch, "batch": batch,
                  "loss": loss, "grad_norm": norm, "z_loss": z_loss, "z_grad": z_grad, "over": over,
                  "thresholds": {"zscore_loss": s.zscore_loss, "zscore_grad": s.zscore_grad},
                  "history": self.detector.steps(key),
                  "rolled_back_to": last_checkpoint.name if last_checkpoint is not None else None,
                  "samples": self._samples(loader, epoch, batch) if self.rank == 0 else []}
        done = [int(e["step"]) for e in self.skips]
        if last_checkpoint is not None and len(done) >= s.max_rollbacks:
            self._write(SPIKE_FILE.format(step=step), {**report, "action": "stopped", "rolled_back_to": None})
            raise SpikeLimitError(
                f"loss spike at step {step} (z-score of the loss {_fmt(z_loss)}, limit {s.zscore_loss:g}; of the "
                f"gradient norm {_fmt(z_grad)}, limit {s.zscore_grad:g}) after {len(done)} rollbacks"
                f"{' (spikes at steps ' + ', '.join(map(str, done)) + ')' if done else ''}, "
                f"spike.max_rollbacks={s.max_rollbacks}; stopping. The last good checkpoint is {last_checkpoint}; "
                f"its samples are in {spikes_dir(self.run_dir) / SPIKE_FILE.format(step=step)}. Remove them from "
                f"the data, or raise spike.max_rollbacks or the z-score thresholds, then resume")
        if last_checkpoint is None:  # nothing to roll back to: recorded, trained on
            self._write(SPIKE_FILE.format(step=step), {**report, "action": "none"})
            return None
        self.skips.append({"stage": stage_index, "epoch": epoch, "batch": batch, "step": step,
                           "decided": len(self.skips), "rolled_back_to": last_checkpoint.name})
        self._write(SPIKE_FILE.format(step=step), {**report, "action": "rolled_back"})
        self._write(SKIPS_FILE, {"version": SKIPS_VERSION, "skips": self.skips})
        return last_checkpoint

    def describe(self, target: Path) -> str:
        e = self.skips[-1]
        return (f"loss spike at step {e['step']} (stage {e['stage']}, epoch {e['epoch']}, global batch "
                f"{e['batch']}; samples in {spikes_dir(self.run_dir) / SPIKE_FILE.format(step=e['step'])}): "
                f"rollback {len(self.skips)}/{self.section.max_rollbacks} to {target.name}, that global batch "
                f"skipped")

    def _samples(self, loader, epoch: int, batch: int) -> list[dict[str, str]]:
        src = loader.dataset.sources
        rows = loader.epoch_plan(epoch).rows[batch]
        return [{"root": src.roots[src.locate(int(r))[0]], "key": src.key(int(r))} for r in rows]

    def _write(self, name: str, obj: dict[str, Any]) -> None:
        if self.rank == 0:
            write_json_atomic(spikes_dir(self.run_dir) / name, obj)


def _fmt(z: float | None) -> str:
    return "-" if z is None else f"{z:.1f}"


def build_spike_guard(cfg: RunConfig, rank: int, world_size: int) -> SpikeGuard:
    """The run's guard; the test hook's injection from ``PIXELDIT_TEST_SPIKE`` when set."""
    text = os.environ.get(TEST_SPIKE_ENV, "")
    return SpikeGuard(cfg.spike, Path(cfg.run_dir), rank, world_size, parse_injection(text) if text else None)
