"""Loader throughput: local disk against raw webdataset decoding, and S3 behind a slow endpoint.

    python -m tools.bench_loader                               # both parts on a synthetic set (ingest + shard)
    python -m tools.bench_loader --data /data/t2i --resolution 512 --workers 4 --part local

Every part reads every sample of the same bucketed shards once (one epoch), with the same DataLoader workers.
Besides wall time, the CPU time of the loader's processes (this one and its joined workers) is reported:
samples per CPU-second is the throughput a machine with a core per worker reaches, whatever else runs on it.
- local (``--part local``): the trainer's bucketed loader (``pixeldit.train.loader.build_loader``, aspect
  buckets: plan, image bytes by offset from the shard, PIL decode, resize + center crop to the bucket, float
  batches of one bucket) against raw webdataset decoding (``webdataset.WebDataset(shards).decode("rgb8")``:
  sequential tar reading and decoding to uint8 arrays, nothing else -- the floor any loader of these shards pays);
- S3 (``--part s3``): the shards uploaded to a moto S3 server behind ``tests/s3_faults.FaultProxy``, which
  adds ``--latency-ms`` to every request (S3's first-byte latency). The same loader twice: with
  ``data.cache_max_gb=0`` (one ranged GET per image, one after the other inside a micro-batch: the I/O of
  the per-image loader before the node cache), and with the node cache (whole shards fetched ahead of the
  plan by the prefetcher, then read locally). GETs are counted at the proxy during the epoch (the index reads
  before it are left out).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_dataset(root: Path, images: int, size: int, per_shard: int) -> str:
    from data_pipeline.ingest import IngestConfig, ingest
    from data_pipeline.serve import serve_folder
    from data_pipeline.shard import ShardConfig, build_shards
    from data_pipeline.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(str(root / "synth"), num_images=images, seed=0, base_size=size)
    with serve_folder(ds.images_dir) as url:
        ingest(ds.write_url_list(url, str(root / "urls.parquet")), str(root / "ingest"),
               IngestConfig(processes=1, threads=16))
    build_shards(str(root / "ingest"), str(root / "data"),
                 ShardConfig(samples_per_shard=per_shard, min_side=0, progress=False))
    return str(root / "data")


def cpu_seconds() -> float:
    """User + system time of this process and its waited-for children (DataLoader workers once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_bucketed(data: str, resolution: int, micro_batch: int, workers: int,
                   **data_options) -> tuple[int, float, float]:
    """(samples, seconds, CPU seconds) of one epoch of the trainer's loader on one rank (construction not timed)."""
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.loader import build_loader

    stage = StageConfig(data_path=data, resolution=resolution, buckets="aspect", micro_batch=micro_batch)
    cfg = RunConfig(stages=[stage])
    cfg.data.num_workers = workers
    for k, v in data_options.items():
        setattr(cfg.data, k, v)
    loader = build_loader(cfg, 0, rank=0, world_size=1)
    n_batches = len(loader)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = sum(loader.next()["x0"].shape[0] for _ in range(n_batches))
    seconds = time.perf_counter() - t0
    loader.close()  # joins the workers: their CPU time is counted
    return n, seconds, cpu_seconds() - c0


def bench_webdataset(data: str, workers: int) -> tuple[int, float, float]:
    import webdataset as wds

    from data_pipeline.dataset_format import read_manifest

    shards = [f"{data}/{s}" for s in read_manifest(data).column("shard").to_pylist()]
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8").to_tuple("__key__", "jpg;png;webp")
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = sum(1 for _ in loader)  # the workers exit and are joined at the end of the epoch
    seconds = time.perf_counter() - t0
    del loader
    return n, seconds, cpu_seconds() - c0


def part_local(data: str, a: argparse.Namespace) -> str:
    """``--repeats`` alternating epochs of each loader; the medians."""
    runs = {"raw": [], "bucketed": []}
    for _ in range(a.repeats):
        runs["raw"].append(bench_webdataset(data, a.workers))
        runs["bucketed"].append(bench_bucketed(data, a.resolution, a.micro_batch, a.workers))
    rate = {k: statistics.median(n / t for n, t, _ in v) for k, v in runs.items()}
    cpu_rate = {k: statistics.median(n / c for n, _, c in v) for k, v in runs.items()}
    names = {"raw": "raw webdataset decode (rgb8)",
             "bucketed": f"bucketed loader (decode + resize + crop to {a.resolution}-table buckets, float batches "
                         f"of {a.micro_batch})"}
    table = "| loader | samples | samples/s (wall) | samples per CPU-second |\n|---|---|---|---|\n"
    table += "".join(f"| {names[k]} | {v[0][0]} | {rate[k]:.0f} | {cpu_rate[k]:.0f} |\n" for k, v in runs.items())
    return (table + f"\nbucketed / raw: {rate['bucketed'] / rate['raw']:.2f}x wall, "
            f"{cpu_rate['bucketed'] / cpu_rate['raw']:.2f}x per CPU-second ({a.workers} workers each, medians of "
            f"{a.repeats} alternating epochs)\n")


def part_s3(data: str, a: argparse.Namespace, scratch: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's moto + proxy helpers
    from data_fixtures import moto_s3
    from s3_faults import FaultProxy

    from pixeldit.storage import fs_and_path
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.loader import build_loader

    rows = []
    with moto_s3("bench") as base:
        fs, _ = fs_and_path(base)
        fs.put(data.rstrip("/") + "/", "bench/data/", recursive=True)
        for name, options in (("per-image ranged GETs (no node cache)", {"cache_max_gb": 0.0}),
                              ("node cache: whole shards prefetched", {"cache_dir": str(scratch / "node_cache")})):
            shutil.rmtree(scratch / "node_cache", ignore_errors=True)
            with FaultProxy(os.environ["AWS_ENDPOINT_URL"], latency_s=a.latency_ms / 1000) as proxy:
                cfg = RunConfig(stages=[StageConfig(data_path=f"{base}/data", resolution=a.resolution,
                                                    buckets="aspect", micro_batch=a.micro_batch)])
                cfg.data.num_workers = a.workers
                cfg.data.storage_options = {"endpoint_url": proxy.url}
                for k, v in options.items():
                    setattr(cfg.data, k, v)
                loader = build_loader(cfg, 0, rank=0, world_size=1)
                n_batches = len(loader)
                gets, heads = proxy.requests("GET"), proxy.requests("HEAD")  # the epoch's requests only
                t0 = time.perf_counter()
                n = sum(loader.next()["x0"].shape[0] for _ in range(n_batches))
                seconds = time.perf_counter() - t0
                loader.close()
                rows.append((name, n, seconds, proxy.requests("GET") - gets, proxy.requests("HEAD") - heads))
    (_, n0, t0_, g0, _), (_, n1, t1_, g1, _) = rows
    table = ("| loader | samples | seconds | samples/s | GET requests | GET per 1000 images |\n"
             "|---|---|---|---|---|---|\n")
    table += "".join(f"| {name} | {n} | {t:.2f} | {n / t:.0f} | {g} (+{h} HEAD) | {1000 * g / n:.0f} |\n"
                     for name, n, t, g, h in rows)
    return (table + f"\nnode cache / per-image: {(n1 / t1_) / (n0 / t0_):.1f}x images/s, "
            f"{(g0 / n0) / max(g1 / n1, 1e-9):.0f}x fewer GETs per image ({a.latency_ms:g} ms per request, "
            f"{a.workers} workers each)\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="a dataset root written by pixeldit-data (default: make one)")
    ap.add_argument("--part", choices=("local", "s3", "both"), default="both")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256, help="synthetic image size (area ~ size^2)")
    ap.add_argument("--samples-per-shard", type=int, default=100)
    ap.add_argument("--resolution", type=int, default=256, help="bucket table of the bucketed loader")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to every S3 request by the proxy")
    ap.add_argument("--repeats", type=int, default=3, help="local part: alternating epochs per loader (medians)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        data = a.data or make_dataset(Path(tmp), a.images, a.image_size, a.samples_per_shard)
        if a.part in ("local", "both"):
            print(part_local(data, a))
        if a.part in ("s3", "both"):
            print(part_s3(data, a, Path(tmp)))


if __name__ == "__main__":
    main()
