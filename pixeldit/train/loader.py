"""The training loader: a stage's dataset roots (local folders or S3) -> rank-aligned micro-batches of pixels.

Stages of the stream (what it holds at each point):
 1. ``open_sources`` (sources.py): per dataset root of the stage (each with a mixing weight), its
    samples.parquet (one row per sample: shard, byte range of its image inside the tar, caption, label) and
    manifest. Before the first step every shard is checked against manifest.parquet (present, same size): all
    damaged shards are named in one error, or, with ``data.skip_damaged_shards``, their samples left out;
 2. ``StagePlan`` (bucket_sampler.py): the global batches of every epoch, one bucket each, the same for any
    world size with the same global batch; ``TrainLoader`` walks it from its state (epoch, global batch,
    micro step) and gives rank r its slice of each global batch (``BatchSpec``);
 3. ``ShardPrefetcher`` (remote roots; ``pixeldit.node_cache``): a thread per rank that fetches the whole shards (and their caption-
    embedding files) of the next ``data.prefetch_batches`` global batches of this rank into the node cache
    (``pixeldit.node_cache``: one folder per node shared by its ranks and workers, size-bounded, LRU);
 4. torch DataLoader (``num_workers`` workers, each builds whole micro-batches, sample_reader.py;
    ``data.worker_timeout_s`` turns a stuck worker into an error): each image's bytes by offset from its shard (the cached copy; a
    local root's own file; with ``data.cache_max_gb=0`` one ranged GET per image), PIL decode to RGB, resize
    to cover the bucket, center crop. An undecodable sample is replaced by another sample of its micro-batch
    and counted; more than ``data.max_bad_samples`` per rank stop the run with the samples named;
 5. batch dict: ``x0`` (B, 3, H, W) float32 in [-1, 1], ``caption`` list[str] (the caption drawn for this use:
    ``SourceSet.draw_captions``), ``caption_index`` (B,) int64 (which of the sample's captions), ``label`` (B,)
    int64 (-1 when none), ``source`` list[int] (index of the root), ``shard`` list[str] + ``sample_index`` (B,)
    int64 (to look up cached text embeddings), ``key`` list[str], ``bucket`` str, ``bad`` list[str] (samples
    replaced).
S3 reads use the timeouts and retries of ``pixeldit.s3.S3Settings`` (``data.s3``). The loader draws
nothing from the global RNGs (the DataLoader gets its own generator), so saved RNG states survive a resume.
``PIXELDIT_RECORD_KEYS=DIR`` (a test hook) appends every micro-batch's keys to ``DIR/rank{r}.jsonl``.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from data_pipeline.buckets import bucket_table
from data_pipeline.captions import DEFAULT_CAPTION_TEMPERATURE
from data_pipeline.dataset_format import ShardProblem
from pixeldit.errors import DataError, StorageError
from pixeldit.node_cache import NodeCache, RemoteFile, ShardPrefetcher

from .bucket_sampler import FIXED_BUCKET, BatchSpec, StagePlan, stable_salt
from .config import RunConfig
from .sample_reader import BatchDataset, SampleReader, WorkerError, decode_to_bucket
from .sources import SourceSet, open_sources
from .spikes import skip_forward

RECORD_KEYS_ENV = "PIXELDIT_RECORD_KEYS"


# ---- 2. the stateful loader ------------------------------------------------------------------------------------


class TrainLoader:
    """Stateful loader of one stage: ``next()`` returns this rank's next micro-batch; epochs roll over.

    State: (epoch, global batch, micro step), identical on every rank; ``state_dict`` also saves the global
    batch size G, so a resume on another world size with the same G continues the same sequence exactly."""

    def __init__(self, dataset: BatchDataset, plan: StagePlan, *, rank: int, world_size: int, micro_batch: int,
                 grad_accum: int, seed: int, num_workers: int = 0, prefetch_factor: int = 2,
                 worker_timeout_s: float = 0.0, max_bad_samples: int = 0, prefetch_batches: int = 8,
                 fetch_threads: int = 4, extra_files: Callable[[int, str], list[RemoteFile]] | None = None,
                 stage_index: int = 0, caption_temperature: float = DEFAULT_CAPTION_TEMPERATURE):
        if plan.G != world_size * micro_batch * grad_accum:
            raise ValueError(f"plan global batch {plan.G} != {world_size} ranks x {micro_batch} x {grad_accum}")
        self.dataset, self.plan = dataset, plan
        self.rank, self.world_size, self.micro_batch, self.accum = rank, world_size, micro_batch, grad_accum
        self.seed, self.num_workers, self.prefetch_factor = seed, num_workers, prefetch_factor
        self.worker_timeout_s, self.max_bad_samples = worker_timeout_s, max_bad_samples
        self.prefetch_batches, self.fetch_threads, self.extra_files = prefetch_batches, fetch_threads, extra_files
        self.stage_index, self.caption_temperature = stage_index, caption_temperature
        self.notes: list[str] = []  # what the stage start prints about the data (damaged shards left out)
        self.epoch = self.batch = self.micro = 0
        self.skips: frozenset[tuple[int, int]] = frozenset()  # (epoch, global batch) never drawn (set_skips)
        self.bad_samples: list[str] = []
        self._lock = threading.Lock()  # the plan's epoch cache is shared with the prefetch thread
        self._iter = None
        self._prefetcher: ShardPrefetcher | None = None
        self._record = os.environ.get(RECORD_KEYS_ENV, "")

    # ---- the plan --------------------------------------------------------------------------------------------

    def epoch_plan(self, epoch: int):
        with self._lock:
            return self.plan.epoch(epoch)

    def __len__(self) -> int:
        """Micro-batches per epoch on every rank (epoch 0; mixing keeps it nearly constant)."""
        return len(self.epoch_plan(self.epoch)) * self.accum

    def spec(self, epoch: int, b: int, m: int) -> BatchSpec:
        ep = self.epoch_plan(epoch)
        rows = ep.rank_rows(b, self.rank, self.world_size)[m * self.micro_batch:(m + 1) * self.micro_batch]
        start = self.rank * (self.plan.G // self.world_size) + m * self.micro_batch
        captions = self.dataset.sources.draw_captions(rows, ep.positions(b, start, len(rows)),
                                                      seed=self.plan.draw_seed, epoch=epoch,
                                                      temperature=self.caption_temperature)
        bucket = ep.bucket(b)
        h, w = self.plan.sizes[bucket]
        return BatchSpec(tuple(int(r) for r in rows), bucket, h, w, epoch, b, m, tuple(int(c) for c in captions))

    def _positions(self, epoch: int, b: int) -> Iterator[tuple[int, int]]:
        """(epoch, global batch) from the given one on, forever."""
        while True:
            n = len(self.epoch_plan(epoch))
            if n == 0:
                raise DataError(f"stage {self.stage_index}: epoch {epoch} has no global batch of {self.plan.G}")
            for i in range(b, n):
                if (epoch, i) not in self.skips:
                    yield epoch, i
            epoch, b = epoch + 1, 0

    def _specs(self, epoch: int, batch: int, micro: int) -> Iterator[BatchSpec]:
        start_micro = micro
        for epoch, b in self._positions(epoch, batch):
            for m in range(start_micro, self.accum):
                yield self.spec(epoch, b, m)
            start_micro = 0

    def _upcoming_files(self, epoch: int, batch: int) -> Iterator[list[RemoteFile]]:
        src = self.dataset.sources
        for epoch, b in self._positions(epoch, batch):
            rows = self.epoch_plan(epoch).rank_rows(b, self.rank, self.world_size)
            files = []
            for g in np.unique(src.shard[rows]):
                if src.remote[int(src.shard_source[g])]:
                    files.append(src.shard_file(int(g)))
                if self.extra_files is not None:
                    files.extend(self.extra_files(int(src.shard_source[g]), src.shard_rel[g]))
            yield files

    # ---- iteration -------------------------------------------------------------------------------------------

    def _start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "timeout": self.worker_timeout_s}
        dl = torch.utils.data.DataLoader(
            self.dataset, sampler=self._specs(self.epoch, self.batch, self.micro), batch_size=None,
            collate_fn=_identity, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), **kwargs)  # own generator: global RNG untouched
        self._iter = iter(dl)  # forks the workers: start the prefetch thread only after
        cache = self.dataset.cache
        if cache is not None and any(self.dataset.sources.remote):
            upcoming = self._upcoming_files(self.epoch, self.batch)
            self._prefetcher = ShardPrefetcher(cache, upcoming, self.prefetch_batches, self.fetch_threads)

    def next(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        if self._prefetcher is not None and self._prefetcher.error is not None:
            raise self._prefetcher.error
        try:
            out = next(self._iter)
        except RuntimeError as err:
            if "timed out" not in str(err):
                raise
            raise StorageError(f"stage {self.stage_index}: no micro-batch from the DataLoader workers within "
                               f"data.worker_timeout_s={self.worker_timeout_s:g} s: a read is stuck (check the "
                               f"storage), or raise data.worker_timeout_s") from None
        if isinstance(out, WorkerError):
            raise out.kind(out.message)
        self._count_bad(out["bad"])
        if self._record:
            self._write_record(out)
        self.micro += 1
        if self.micro == self.accum:
            self.micro = 0
            if self._prefetcher is not None:
                self._prefetcher.consumed()
            self.epoch, self.batch = self._skip_forward(self.epoch, self.batch + 1)
        return out

    def _skip_forward(self, epoch: int, batch: int) -> tuple[int, int]:
        return skip_forward(epoch, batch, lambda e: len(self.epoch_plan(e)), self.skips)

    def set_skips(self, skips: frozenset[tuple[int, int]]) -> None:
        """Global batches (epoch, batch) this loader never draws (``pixeldit.train.spikes``: the data windows of
        rolled-back loss spikes); call before the first ``next()``. A position on one moves past it."""
        if self._iter is not None:
            raise RuntimeError("TrainLoader.set_skips after iteration started: call it right after load_state_dict")
        self.skips = frozenset(skips)
        if self.micro == 0:
            self.epoch, self.batch = self._skip_forward(self.epoch, self.batch)

    def _count_bad(self, bad: list[str]) -> None:
        if not bad:
            return
        self.bad_samples.extend(bad)
        for item in bad:
            print(f"[loader rank {self.rank}] skipped undecodable sample {item} "
                  f"({len(self.bad_samples)}/{self.max_bad_samples} allowed)", flush=True)
        if len(self.bad_samples) > self.max_bad_samples:
            raise DataError(f"stage {self.stage_index}: {len(self.bad_samples)} undecodable samples on rank "
                            f"{self.rank}, more than data.max_bad_samples={self.max_bad_samples} (last: "
                            f"{self.bad_samples[-1]}); check the dataset or raise data.max_bad_samples")

    def _write_record(self, out: dict[str, Any]) -> None:
        os.makedirs(self._record, exist_ok=True)
        line = {"stage": self.stage_index, "epoch": self.epoch, "batch": self.batch, "micro": self.micro,
                "rank": self.rank, "source": out["source"], "key": out["key"],
                "caption_index": out["caption_index"].tolist()}
        with open(os.path.join(self._record, f"rank{self.rank:05d}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")

    # ---- state -----------------------------------------------------------------------------------------------

    def segment(self, step: int) -> dict[str, Any]:
        """What the ledger needs to replay this loader from optimizer step ``step`` on (checkpoint metadata):
        stage, start state, global batch, the roots' fingerprints, shards left out as damaged, the caption
        temperature."""
        src = self.dataset.sources
        return {"stage": self.stage_index, "step": step, **self.state_dict(), "sources": src.fingerprints(),
                "left_out": src.left_out, "caption_temperature": self.caption_temperature}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "micro": self.micro, "global_batch": self.plan.G,
                "grad_accum": self.accum}

    def load_state_dict(self, state: dict[str, int]) -> str | None:
        """Continue from a saved state; returns a note when the continuation is not exact."""
        self.close()
        epoch = int(state["epoch"])
        saved_g = state.get("global_batch")
        if saved_g == self.plan.G:
            self.epoch, self.batch, self.micro = epoch, int(state["batch"]), int(state["micro"])
            return None
        if saved_g is None:  # a checkpoint of the loader before global batches (another plan altogether)
            self.epoch, self.batch, self.micro = epoch, 0, 0
            return (f"stage {self.stage_index}: the checkpoint's loader state predates the global-batch plan; "
                    f"continuing at the start of epoch {epoch}")
        per_micro = int(saved_g) // int(state.get("grad_accum", 1))
        consumed = int(state["batch"]) * int(saved_g) + int(state["micro"]) * per_micro
        n = len(self.epoch_plan(epoch))
        self.epoch, self.batch, self.micro = epoch, min(n, consumed // self.plan.G), 0
        if self.batch == n:
            self.epoch, self.batch = epoch + 1, 0
        return (f"stage {self.stage_index}: global batch changed from {saved_g} to {self.plan.G} samples: the "
                f"plan differs, continuing epoch {epoch} after about the same number of samples (not the same "
                f"sequence; keep world_size x micro_batch x grad_accum to continue exactly)")

    # ---- probe and cleanup -----------------------------------------------------------------------------------

    def probe(self, max_samples: int = 32) -> dict[str, float]:
        """Read and decode up to ``max_samples`` samples of this rank's next micro-batches in this process:
        {"images_per_s", "bytes_per_s", "samples", "seconds"} (first reads include fetching whole shards)."""
        reader = SampleReader(self.dataset.sources, self.dataset.cache)
        n, start = 0, time.perf_counter()
        try:
            for spec in self._specs(self.epoch, self.batch, self.micro):
                for row in spec.rows:
                    decode_to_bucket(reader.read(row), spec.height, spec.width)
                    n += 1
                    if n >= max_samples:
                        break
                if n >= max_samples:
                    break
        finally:
            reader.close()
        seconds = max(time.perf_counter() - start, 1e-9)
        return {"images_per_s": n / seconds, "bytes_per_s": reader.bytes_read / seconds, "samples": n,
                "seconds": seconds}

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
        self._iter = None  # lets the DataLoader shut its workers down


def _identity(batch):
    return batch


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"pixeldit-cache-{os.getuid()}")


def build_node_cache(cfg: RunConfig) -> NodeCache | None:
    """The node cache of the run (None with data.cache_max_gb=0)."""
    d = cfg.data
    if d.cache_max_gb <= 0:
        return None
    return NodeCache(d.cache_dir or default_cache_dir(), int(d.cache_max_gb * 2**30), d.storage_options,
                     lock_timeout_s=d.worker_timeout_s or 3600.0)


def build_plan(cfg: RunConfig, stage_index: int, sources: SourceSet, selection: np.ndarray,
               global_batch: int) -> StagePlan:
    """The stage's plan for a global batch (world size x micro_batch x grad_accum) of ``global_batch``."""
    stage = cfg.stages[stage_index]
    if stage.buckets == "fixed":
        sizes = {FIXED_BUCKET: (stage.resolution, stage.resolution)}
    else:
        table = bucket_table(stage.resolution, stage.bucket_align)
        unknown = [k for k in sources.ratio_keys if k not in table]
        if unknown:
            raise ValueError(f"{', '.join(sources.roots)}: ratio keys {unknown} are not in the bucket table "
                             f"(valid: {sorted(table)})")
        sizes = {k: table[k] for k in sources.ratio_keys}
    plan = StagePlan(sources.table(), sizes, global_batch=global_batch, seed=cfg.seed,
                     salt=stable_salt(f"{stage_index}:{stage.name}"), block_shards=cfg.data.shuffle_block_shards,
                     fixed=stage.buckets == "fixed", selection=selection)
    if len(plan.epoch(0)) == 0:
        counts = plan.bucket_counts()
        raise DataError(f"stage {stage_index} ({stage.name}): {int(selection.sum())} samples in all (per bucket: "
                        f"{counts}) do not fill one global batch of {global_batch} (world size x micro_batch "
                        f"{stage.micro_batch} x grad_accum {stage.grad_accum}); use a smaller batch or more data")
    return plan


def build_loader(cfg: RunConfig, stage_index: int, rank: int, world_size: int, num_classes: int | None = None, *,
                 problems: dict[str, list[ShardProblem]] | None = None, cache: NodeCache | None = None,
                 extra_files: Callable[[int, str], list[RemoteFile]] | None = None) -> TrainLoader:
    """Loader of ``cfg.stages[stage_index]``; ``num_classes`` set for class-conditional models (labels
    checked). ``problems``: ``check_stage_data`` already run by the caller; ``extra_files``: (source, shard) ->
    more files to prefetch with a shard (its caption embeddings)."""
    stage = cfg.stages[stage_index]
    sources, selection, notes = open_sources(cfg, stage_index, num_classes, problems)
    plan = build_plan(cfg, stage_index, sources, selection, world_size * stage.micro_batch * stage.grad_accum)
    if cache is None and any(sources.remote):
        cache = build_node_cache(cfg)
    loader = TrainLoader(BatchDataset(sources, cache), plan, rank=rank, world_size=world_size,
                         micro_batch=stage.micro_batch, grad_accum=stage.grad_accum, seed=cfg.seed,
                         num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                         worker_timeout_s=cfg.data.worker_timeout_s, max_bad_samples=cfg.data.max_bad_samples,
                         prefetch_batches=cfg.data.prefetch_batches, fetch_threads=cfg.data.fetch_threads,
                         extra_files=extra_files, stage_index=stage_index,
                         caption_temperature=cfg.data.caption_temperature)
    loader.notes = notes
    return loader


def data_rate_line(cfg: RunConfig, stage_index: int, loader: TrainLoader, flops, world_size: int,
                   peak_tflops: float | None) -> str:
    """The stage-start line: the data rate the run needs (FLOP model, data.target_mfu, world size) against a
    short probe of this process's reading + decoding (``TrainLoader.probe``)."""
    stage, d = cfg.stages[stage_index], cfg.data
    src = loader.dataset.sources
    mean_bytes = float(np.mean(src.image_size[loader.plan.selected_rows]))
    per_image = flops.train_flops(stage.resolution, stage.resolution)
    probe = loader.probe(min(32, 2 * stage.micro_batch))
    workers = max(1, d.num_workers)
    estimate = probe["images_per_s"] * workers * world_size
    got = (f"probe: {probe['images_per_s']:.0f} img/s ({probe['bytes_per_s'] / 1e6:.1f} MB/s) read + decoded in one "
           f"process ({probe['samples']} images in {probe['seconds']:.2f} s, first shard fetches included) -> about "
           f"{estimate:.0f} img/s with {workers} workers x {world_size} ranks")
    if peak_tflops is None:
        return (f"data rate: the need is unknown (no peak FLOP/s known for this device; set logging.peak_tflops); "
                f"{got}")
    need = d.target_mfu * peak_tflops * 1e12 * world_size / per_image
    verdict = "enough" if estimate >= need else (f"SHORT by {need / max(estimate, 1e-9):.1f}x: more data.num_workers, "
                                                 f"CPU per rank, or a closer data copy")
    return (f"data rate: the run needs {need:.0f} img/s ({need * mean_bytes / 1e6:.1f} MB/s at "
            f"{mean_bytes / 1e3:.0f} kB per image) for {100 * d.target_mfu:.0f}% MFU on {world_size} ranks of "
            f"{peak_tflops:g} TFLOP/s ({per_image / 1e12:.3g} TFLOP per image per step at {stage.resolution}px); "
            f"{got}: {verdict}")
