"""Benchmark: bucketing + sharding throughput against img2dataset alone, on the same input, in one run.

    python -m tools.bench_data --images 2000 --image-size 256 --workers 1 2

Steps (everything on 127.0.0.1):
  1. write `--images` synthetic shape images (3/4 JPEG, 1/4 PNG, 11 aspect ratios) and serve them;
  2. img2dataset alone: ingest() (img2dataset with the pipeline's own settings: resize off, bytes kept)
     into a fresh folder, timed end to end (its process start-up and imports included), and also
     img2dataset's own per-shard work time (download + write, from its *_stats.json);
  3. bucketing + sharding: build_shards() on that ingest folder, once per `--workers` value (and once
     with --verify decode), each into a fresh output root, timed end to end (commit included);
  4. print a markdown table of samples/s; ratios are relative to img2dataset end to end, same run.
Options: --output-dir keeps the files; --resize max-side makes img2dataset decode/resize too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=256, help="synthetic image area ~ size^2")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="build_shards worker counts to time")
    ap.add_argument("--processes", type=int, default=1, help="img2dataset processes")
    ap.add_argument("--threads", type=int, default=16, help="img2dataset download threads")
    ap.add_argument("--resize", default="off", choices=["off", "max-side"])
    ap.add_argument("--decode", action="store_true", help="also time build_shards with --verify decode")
    ap.add_argument("--output-dir", default="", help="keep the files here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from data_pipeline.ingest import IngestConfig, finished_shards, ingest, read_shard_stats
    from data_pipeline.serve import serve_folder
    from data_pipeline.shard import ShardConfig, build_shards
    from data_pipeline.synthetic import make_synthetic_dataset

    work = a.output_dir or tempfile.mkdtemp(prefix="bench-data-")
    try:
        t = time.perf_counter()
        ds = make_synthetic_dataset(os.path.join(work, "synth"), num_images=a.images, seed=0, base_size=a.image_size)
        mb = sum(os.path.getsize(os.path.join(ds.images_dir, it.name)) for it in ds.items) / 2**20
        print(f"synthetic set: {a.images} images, {mb:.1f} MiB, made in {time.perf_counter() - t:.1f}s", flush=True)
        rows = []
        with serve_folder(ds.images_dir) as base_url:
            url_list = ds.write_url_list(base_url, os.path.join(work, "urls.parquet"))
            ing_dir = os.path.join(work, "ingest")
            shutil.rmtree(ing_dir, ignore_errors=True)
            cfg = IngestConfig(processes=a.processes, threads=a.threads, resize=a.resize, max_side=a.image_size)
            t = time.perf_counter()
            summary = ingest(url_list, ing_dir, cfg)
            dt = time.perf_counter() - t
        base = summary.success / dt
        name = f"img2dataset alone, end to end (ingest(), resize {a.resize}, {a.processes} proc x {a.threads} threads)"
        rows.append((name, summary.success, dt, base))
        shard_time = sum(read_shard_stats(ing_dir, n)["duration"] for n in finished_shards(ing_dir).values())
        name = "img2dataset alone, shard work only (sum of its *_stats.json durations)"
        rows.append((name, summary.success, shard_time, summary.success / shard_time))
        variants = [(w, "structure") for w in a.workers] + ([(max(a.workers), "decode")] if a.decode else [])
        for workers, verify in variants:
            out = os.path.join(work, f"out-{workers}-{verify}")
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            res = build_shards(ing_dir, out, ShardConfig(workers=workers, verify=verify, progress=False))
            dt = time.perf_counter() - t
            name = f"bucketing + sharding (build_shards, {workers} worker(s), verify {verify})"
            rows.append((name, res.samples_written, dt, res.samples_written / dt))
        print()
        print("| stage | samples | seconds | samples/s | vs img2dataset |")
        print("|---|---|---|---|---|")
        for name, n, dt, rate in rows:
            print(f"| {name} | {n} | {dt:.2f} | {rate:.0f} | {rate / base:.2f}x |")
    finally:
        if not a.output_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
