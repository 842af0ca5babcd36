"""Micro-batches on the device ahead of use: pinned host memory, non-blocking copies, the next micro-batch
copied (and its condition built) while the current one computes.

``DevicePrefetcher`` wraps the stage's loader (anything with ``next()``, ``state_dict()``,
``load_state_dict()``, ``close()``) and the conditioner (``batch -> (cond, null_cond)``):
 - ``next()`` hands out the prepared micro-batch (``DeviceBatch``: ``x0`` and the conditions on the device);
   without one ready it prepares one now;
 - ``preload()`` fetches the next micro-batch from the loader, pins its tensors (a no-op when the DataLoader
   already pins them), starts their host-to-device copies and builds the condition, on CUDA all on a side
   stream (``next()`` makes the compute stream wait for it and records the tensors on it, so the caching
   allocator keeps them alive); the step calls it right after enqueuing a backward, so the copy overlaps
   the backward kernels;
 - it never fetches past ``remaining`` micro-batches (the end of the stage), and only when told to (the step
   does not preload across a step boundary when the run is stopping): no batch is drawn that is not trained;
 - ``state_dict()`` is the loader's state right after the last micro-batch HANDED OUT (snapshot taken when it
   was fetched), not after the one prefetched, so a checkpoint resumes the stream exactly.
On the CPU there is nothing to overlap: ``preload`` prepares synchronously (same code path, same order).
Seconds spent waiting for the loader accumulate in ``wait_s`` (the step-time breakdown's "data").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Cond = dict[str, torch.Tensor]


@dataclass
class DeviceBatch:
    x0: torch.Tensor  # (B, 3, H, W) on the device
    cond: Cond
    null_cond: Cond
    batch: dict[str, Any] = field(repr=False)  # the loader's batch (host tensors, captions, keys, bucket)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x0.shape[-2:])

    @property
    def bucket(self) -> str:
        return self.batch["bucket"]


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v for k, v in batch.items()}


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


class DevicePrefetcher:
    def __init__(self, loader, device: torch.device, prepare: Callable[[dict[str, Any]], tuple[Cond, Cond]],
                 remaining: int):
        self.loader, self.device, self.prepare = loader, device, prepare
        self.remaining = remaining  # micro-batches this stage still trains on (never fetch more)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._ready: tuple[DeviceBatch, Any, Any] | None = None  # (batch, loader state after it, copy event)
        self._state = None  # loader state after the last micro-batch handed out (None: none yet)
        self.wait_s = 0.0

    def _fetch(self) -> tuple[dict[str, Any], Any]:
        t0 = time.perf_counter()
        batch = self.loader.next()
        state = self.loader.state_dict()
        self.wait_s += time.perf_counter() - t0
        self.remaining -= 1
        return batch, state

    def _build(self, batch: dict[str, Any]) -> DeviceBatch:
        cond, null_cond = self.prepare(batch)
        return DeviceBatch(batch["x0"].to(self.device, non_blocking=True), cond, null_cond, batch)

    def preload(self) -> None:
        """Fetch and start preparing the next micro-batch (nothing when one is ready or the stage is done)."""
        if self._ready is not None or self.remaining <= 0:
            return
        batch, state = self._fetch()
        if not self.cuda:
            self._ready = (self._build(batch), state, None)
            return
        batch = _pinned(batch)
        with torch.cuda.stream(self.stream):
            item = self._build(batch)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._ready = (item, state, event)

    def next(self) -> DeviceBatch:
        if self._ready is None:
            if self.remaining <= 0:
                raise RuntimeError("the stage's micro-batches are all handed out (remaining=0)")
            self.preload()
        item, state, event = self._ready
        self._ready = None
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in _tensors(item.x0) + _tensors(item.cond) + _tensors(item.null_cond):
                if t.device.type == "cuda":
                    t.record_stream(current)
        self._state = state
        return item

    def state_dict(self):
        """The loader's state as of the last micro-batch handed out (what a checkpoint must record)."""
        return self._state if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state):
        self._ready, self._state = None, None
        return self.loader.load_state_dict(state)

    def close(self) -> None:
        self._ready = None
        self.loader.close()

    def __len__(self) -> int:
        return len(self.loader)
