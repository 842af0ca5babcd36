"""Loader throughput: the trainer's bucketed loader vs raw webdataset decoding of the same shards.

    python -m tools.bench_loader                          # builds a synthetic set (ingest + shard) in a temp dir
    python -m tools.bench_loader --data /data/t2i --resolution 512 --workers 4

Both read every sample of the same bucketed shards once (one epoch), with the same number of DataLoader
workers, side by side in one run:
- bucketed: ``pixeldit.train.loader.build_loader`` (aspect buckets): plan from samples.parquet, ranged
  reads of the image members, PIL decode, resize + center crop to the bucket, float tensors in [-1, 1],
  micro-batches of one bucket;
- raw webdataset: ``webdataset.WebDataset(shards).decode("rgb8")``: sequential tar reading and decoding to
  uint8 arrays, nothing else (no resize, no batching) — the floor any loader of these shards pays.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def make_dataset(root: Path, images: int, size: int) -> str:
    from data_pipeline.ingest import IngestConfig, ingest
    from data_pipeline.serve import serve_folder
    from data_pipeline.shard import ShardConfig, build_shards
    from data_pipeline.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(str(root / "synth"), num_images=images, seed=0, base_size=size)
    with serve_folder(ds.images_dir) as url:
        ingest(ds.write_url_list(url, str(root / "urls.parquet")), str(root / "ingest"),
               IngestConfig(processes=1, threads=16))
    build_shards(str(root / "ingest"), str(root / "data"), ShardConfig(samples_per_shard=100, min_side=0, progress=False))
    return str(root / "data")


def bench_bucketed(data: str, resolution: int, micro_batch: int, workers: int) -> tuple[int, float]:
    from pixeldit.train.config import RunConfig, StageConfig
    from pixeldit.train.loader import build_loader

    cfg = RunConfig(stages=[StageConfig(data_path=data, resolution=resolution, buckets="aspect", micro_batch=micro_batch)])
    cfg.data.num_workers = workers
    loader = build_loader(cfg, 0, rank=0, world_size=1)
    n_batches = len(loader)
    t0 = time.perf_counter()
    n = sum(loader.next()["x0"].shape[0] for _ in range(n_batches))
    return n, time.perf_counter() - t0


def bench_webdataset(data: str, workers: int) -> tuple[int, float]:
    import webdataset as wds

    from data_pipeline.dataset_format import read_manifest

    shards = [f"{data}/{s}" for s in read_manifest(data).column("shard").to_pylist()]
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8").to_tuple("__key__", "jpg;png;webp")
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(1 for _ in loader)
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="a dataset root written by pixeldit-data (default: make one)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256, help="synthetic image size (area ~ size^2)")
    ap.add_argument("--resolution", type=int, default=256, help="bucket table of the bucketed loader")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        data = a.data or make_dataset(Path(tmp), a.images, a.image_size)
        wn, wt = bench_webdataset(data, a.workers)
        bn, bt = bench_bucketed(data, a.resolution, a.micro_batch, a.workers)
    print(f"| loader | samples | seconds | samples/s |\n|---|---|---|---|\n"
          f"| raw webdataset decode (rgb8) | {wn} | {wt:.2f} | {wn / wt:.0f} |\n"
          f"| bucketed loader (decode + resize + crop to {a.resolution}-table buckets, float batches of "
          f"{a.micro_batch}) | {bn} | {bt:.2f} | {bn / bt:.0f} |\n"
          f"\nbucketed / raw: {(bn / bt) / (wn / wt):.2f}x ({a.workers} workers each)")


if __name__ == "__main__":
    main()
