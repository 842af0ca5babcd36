"""The runtime preflight of every start and restart: is each node fit to train? (``node_check.*`` of the run config)

Not the config preflight (``pixeldit.train.preflight``, before anything starts): this one runs once the process
group exists and before the engine is built, on every rank, so a bad node stops the run in seconds with its name
instead of hanging or producing garbage hours later.

    results = run_node_check(cfg, rank, world, device, step, write=metrics.write)   # collective

Checks of each rank (a ``Check``: ok / warn / fail, a value, a detail):
 - ``matmul``: an n x n float32 matmul of known inputs (seeded CPU generator) on the device, compared with the
   product computed in float64 on the CPU (relative Frobenius error; TF32 stays far below the limit);
 - ``allreduce``: a ``node_check.allreduce_mb`` MiB float32 all-reduce across all ranks, its result checked and
   its bus bandwidth measured (nccl-tests convention: bytes x 2 (n - 1) / n / seconds);
 - ``disk``: free space of the file system holding ``run_dir`` against an estimate of one checkpoint
   (``checkpoint_bytes``: parameter count x bytes per parameter of weights, fp32 master, optimizer state, EMA;
   the ZeRO partitions of all ranks add up to the same total); warn below ``disk_warn_checkpoints``, fail below
   ``disk_fail_checkpoints`` checkpoints;
 - ``read``: up to ``node_check.read_mb`` MiB of one shard of the first remaining stage's first data root
   (each rank its own shard, round robin), through ``pixeldit.storage`` (local or S3, with the run's timeouts),
   its rate measured; an unreadable root fails.
Results are gathered to rank 0 (one small ``all_gather_object``), printed as one line per check (worst rank
named), recorded in ``{run_dir}/metrics.jsonl`` (kind "preflight", also when a check fails), and every rank
raises the same ``NodeCheckError`` when any check failed: one line naming the host, the rank and what to do.
"""
from __future__ import annotations

import math
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist

from pixeldit import run_folder, storage
from pixeldit.errors import UserError

from .config import RunConfig

MATMUL_MAX_REL_ERR = 1e-2  # float32 with TF32 is ~1e-3 relative; a broken device is off by orders of magnitude
CHECKS = ("matmul", "allreduce", "disk", "read")
Level = Literal["ok", "warn", "fail"]
MIB = 1 << 20


class NodeCheckError(UserError):
    """A node failed the runtime preflight; the message names its host and rank and what to do."""


@dataclass
class Check:
    name: str  # one of CHECKS
    level: Level
    value: float | None  # rel. error / GB/s / free GB / MB/s (None when not measured)
    detail: str  # what was measured, or what is wrong and what to do


def checkpoint_bytes(cfg: RunConfig, params: int) -> int:
    """Estimated bytes of one checkpoint (all ranks together): weights in the training precision, the fp32
    master copy DeepSpeed keeps, the optimizer state (AdamW: two fp32 moments; CAME: one, its second moments are
    factored), the fp32 EMA."""
    weights = 2 if cfg.deepspeed.precision == "bf16" else 4
    optimizer = 8 if cfg.optim.name == "adamw" else 4
    return params * (weights + 4 + optimizer + 4)


def count_params(cfg: RunConfig) -> int:
    from pixeldit.models import build_model

    model = build_model(cfg.model.args(), device="meta")
    return sum(p.numel() for p in model.parameters())


def check_matmul(device: torch.device, n: int) -> Check:
    gen = torch.Generator().manual_seed(20240617)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    reference = a.double() @ b.double()
    t0 = time.perf_counter()
    out = a.to(device) @ b.to(device)
    out = out.double().cpu()  # waits for the device
    seconds = time.perf_counter() - t0
    err = float((out - reference).norm() / reference.norm())
    detail = f"{n}x{n} float32 on {device}: relative error {err:.1e} vs a float64 CPU reference, {seconds:.3f} s"
    if not math.isfinite(err) or err > MATMUL_MAX_REL_ERR:
        return Check("matmul", "fail", err, f"{detail} (limit {MATMUL_MAX_REL_ERR:g}): the device computes wrong "
                                           f"results; exclude this node and resume")
    return Check("matmul", "ok", err, detail)


def check_allreduce(device: torch.device, mb: float, world: int, rank: int, min_gb_s: float, iters: int = 3) -> Check:
    if world == 1:
        return Check("allreduce", "ok", None, "one rank: nothing to reduce")
    numel = max(1, int(mb * MIB) // 4)
    buf = torch.empty(numel, dtype=torch.float32, device=device)
    expected = world * (world + 1) / 2
    seconds, wrong = 0.0, False
    for i in range(iters + 1):  # the first is a warm-up (connections, buffers)
        buf.fill_(rank + 1)
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        _sync(device)
        if i:
            seconds += time.perf_counter() - t0
        wrong |= bool(buf[0].item() != expected or buf[-1].item() != expected)
    gb_s = numel * 4 * 2 * (world - 1) / world / (seconds / iters) / 1e9
    detail = f"{numel * 4 / MIB:g} MiB over {world} ranks: {gb_s:.3f} GB/s bus bandwidth"
    if wrong:
        return Check("allreduce", "fail", gb_s, f"{detail}, but the sum is wrong: the interconnect or device corrupts "
                                                f"data; exclude this node and resume")
    if gb_s < min_gb_s:
        return Check("allreduce", "fail", gb_s, f"{detail} < node_check.min_allreduce_gb_s={min_gb_s:g}: check this "
                                                f"node's network (or lower the threshold)")
    return Check("allreduce", "ok", gb_s, detail)


def check_disk(run_dir: Path, estimate: int, warn: float, fail: float) -> Check:
    probe = run_dir if run_dir.exists() else run_dir.parent
    free = shutil.disk_usage(probe).free
    ratio = free / estimate if estimate else math.inf
    detail = f"{free / 1e9:.1f} GB free for {run_dir}, one checkpoint ~{estimate / 1e9:.3f} GB ({ratio:.1f} x)"
    if ratio < fail:
        return Check("disk", "fail", free / 1e9, f"{detail} < node_check.disk_fail_checkpoints={fail:g}: free "
                                                 f"space there (lower checkpoint.keep, delete old runs) or lower the "
                                                 f"threshold")
    if ratio < warn:
        return Check("disk", "warn", free / 1e9, f"{detail} < node_check.disk_warn_checkpoints={warn:g}")
    return Check("disk", "ok", free / 1e9, detail)


def check_read(root: str, storage_options: dict[str, Any], mb: float, rank: int, min_mb_s: float,
               where: str) -> Check:
    """Read up to ``mb`` MiB of one shard of ``root`` (``where``: the config key naming the root)."""
    from data_pipeline.dataset_format import MANIFEST, read_manifest

    try:
        manifest = read_manifest(root, storage_options)
        if manifest is None or manifest.num_rows == 0:
            raise FileNotFoundError(f"no shards listed in {storage.join(root, MANIFEST)}")
        shards, sizes = manifest.column("shard").to_pylist(), manifest.column("bytes").to_pylist()
        i = rank % len(shards)
        url, n = storage.join(root, shards[i]), min(int(sizes[i]), int(mb * MIB))
        t0 = time.perf_counter()
        got = len(storage.read_range(url, 0, n, storage_options))
        seconds = max(time.perf_counter() - t0, 1e-9)
    except Exception as err:  # noqa: BLE001 (any failure to read is this check's verdict, reported with the node)
        return Check("read", "fail", None, f"cannot read the data root {root} ({where}): {type(err).__name__}: "
                                           f"{' '.join(str(err).split())[:200]}; check its mount or bucket and "
                                           f"credentials on this node")
    rate = got / MIB / seconds
    detail = f"{got / MIB:.2f} MiB of {url} at {rate:.1f} MiB/s"
    if got < n:
        return Check("read", "fail", rate, f"{detail}: {n - got} bytes short of the manifest's size; the shard is "
                                           f"truncated on this node's view of the data")
    if rate < min_mb_s:
        return Check("read", "fail", rate, f"{detail} < node_check.min_read_mb_s={min_mb_s:g}: check this node's "
                                           f"storage path (or lower the threshold)")
    return Check("read", "ok", rate, detail)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_root(cfg: RunConfig, stage_index: int) -> tuple[str, str]:
    """(root, config key) of the first data root of stage ``stage_index``."""
    stage = cfg.stages[stage_index]
    key = f"stages.{stage_index}.sources.0.path" if stage.sources else f"stages.{stage_index}.data_path"
    return stage.data_sources()[0].path, key


def local_checks(cfg: RunConfig, rank: int, world: int, device: torch.device, stage_index: int) -> list[Check]:
    """This rank's checks (the all-reduce is collective: every rank runs this together)."""
    nc = cfg.node_check
    root, key = first_root(cfg, stage_index)
    return [_guarded("matmul", lambda: check_matmul(device, nc.matmul_size)),
            check_allreduce(device, nc.allreduce_mb, world, rank, nc.min_allreduce_gb_s),  # a failure is collective
            _guarded("disk", lambda: check_disk(Path(cfg.run_dir), checkpoint_bytes(cfg, count_params(cfg)),
                                                nc.disk_warn_checkpoints, nc.disk_fail_checkpoints)),
            check_read(root, cfg.data.storage_options, nc.read_mb, rank, nc.min_read_mb_s, key)]


def _guarded(name: str, fn: Callable[[], Check]) -> Check:
    """``fn()``, or a failed check saying what it raised (one rank raising alone would leave the others waiting
    in the gather)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 (reported with the node's name instead)
        return Check(name, "fail", None, f"the check raised {type(err).__name__}: {' '.join(str(err).split())[:200]}")


def summary_lines(gathered: list[dict[str, Any]]) -> list[str]:
    """One line per check over all ranks: the worst rank (host) named."""
    lines = []
    for name in CHECKS:
        rows = [(g["rank"], g["host"], c) for g in gathered for c in g["checks"] if c["name"] == name]
        bad = [r for r in rows if r[2]["level"] != "ok"]
        values = [r for r in rows if r[2]["value"] is not None]
        # the worst rank: a failure first, else the largest error (matmul) / the lowest rate or free space
        pick = bad[0] if bad else (max(values, key=lambda r: r[2]["value"]) if name == "matmul" and values else
                                   min(values, key=lambda r: r[2]["value"]) if values else rows[0])
        verdict = "FAIL" if any(r[2]["level"] == "fail" for r in rows) else "warn" if bad else "ok"
        lines.append(f"node check {name:9s} {verdict:4s} {len(rows)} ranks; "
                     f"{'worst rank' if len(rows) > 1 else 'rank'} {pick[0]} ({pick[1]}): {pick[2]['detail']}")
    return lines


def run_node_check(cfg: RunConfig, rank: int, world: int, device: torch.device, step: int, stage_index: int,
                   write: Callable[[str], None]) -> list[dict[str, Any]]:
    """Collective: run the checks on every rank, print and record them on rank 0; returns every rank's results.
    Raises ``NodeCheckError`` on every rank when a check failed somewhere."""
    mine = {"rank": rank, "host": socket.gethostname(),
            "checks": [asdict(c) for c in local_checks(cfg, rank, world, device, stage_index)]}
    gathered: list[Any] = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    failures = [(g["rank"], g["host"], c) for g in gathered for c in g["checks"] if c["level"] == "fail"]
    if rank == 0:
        for line in summary_lines(gathered):
            write(line)
        record = {"step": step, "kind": "preflight", "stage": stage_index, "ok": not failures, "world_size": world,
                  "ranks": [{"rank": g["rank"], "host": g["host"],
                             **{f"{c['name']}_{k}": c[k] for c in g["checks"] for k in ("level", "value")}}
                            for g in gathered]}
        run_folder.append_metrics(cfg.run_dir, record)
    if failures:
        r, host, check = failures[0]
        more = f" (and {len(failures) - 1} more failed checks, see {run_folder.METRICS})" if len(failures) > 1 else ""
        raise NodeCheckError(f"node check {check['name']} failed on host {host} rank {r}: {check['detail']}{more}; "
                             f"node_check.enabled=false skips these checks")
    return gathered
