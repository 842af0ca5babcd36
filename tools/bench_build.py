"""Benchmark: a data build (ingest + shard) cut into K tasks against the same build in one process.

    python -m tools.bench_build --images 2000 --image-size 256 --tasks 1 2

Steps (everything on 127.0.0.1):
  1. write `--images` synthetic shape images and serve them; one URL list;
  2. for every K of `--tasks`: `ingest` then `build_shards` into fresh folders, K=1 in this process (the
     default command line), K>1 as a job array of K tasks on submitit's local executor (`--cluster local
     --tasks K`: the same plan, task slices, per-task records and final commit as `--cluster slurm`), each
     stage timed end to end (task start-up, imports, img2dataset's own processes and the commit included);
  3. check every build has the same samples (keys and image hashes) and print a markdown table: samples/s per
     stage and for the whole build, and the ratio to K=1.
On a SLURM cluster the tasks run on different machines; here they share this machine's cores, so the ratio
says what cutting the work costs or gains on one machine (start-up per task against parallel work).
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
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2], help="task counts to time (1: one process)")
    ap.add_argument("--threads", type=int, default=16, help="img2dataset download threads per task")
    ap.add_argument("--samples-per-ingest-shard", type=int, default=250)
    ap.add_argument("--output-dir", default="", help="keep the files here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from data_pipeline.build import BuildOptions
    from data_pipeline.dataset_format import read_samples
    from data_pipeline.ingest import IngestConfig, ingest
    from data_pipeline.serve import serve_folder
    from data_pipeline.shard import ShardConfig, build_shards
    from data_pipeline.synthetic import make_synthetic_dataset
    from pixeldit.cluster import LaunchConfig

    tmp = a.output_dir or tempfile.mkdtemp(prefix="bench_build_")
    ds = make_synthetic_dataset(os.path.join(tmp, "synth"), num_images=a.images, seed=0, base_size=a.image_size)
    icfg = IngestConfig(threads=a.threads, timeout=10, samples_per_shard=a.samples_per_ingest_shard)
    scfg = ShardConfig(min_side=0, samples_per_shard=1000, progress=False)
    rows, views = [], {}
    with serve_folder(ds.images_dir) as base:
        urls = ds.write_url_list(base, os.path.join(tmp, "urls.parquet"))
        for k in a.tasks:
            launch = None if k == 1 else LaunchConfig(cluster="local", env={"OMP_NUM_THREADS": "1"})
            options = BuildOptions(tasks=k, launch=launch, poll_s=0.2)
            work, out = os.path.join(tmp, f"ingest-{k}"), os.path.join(tmp, f"data-{k}")
            t0 = time.perf_counter()
            ingest(urls, work, icfg, options)
            t1 = time.perf_counter()
            summary = build_shards(work, out, scfg, options)
            t2 = time.perf_counter()
            samples = read_samples(out)
            views[k] = sorted(zip(samples.column("key").to_pylist(), samples.column("sha256").to_pylist()))
            rows.append((k, summary.samples_written, t1 - t0, t2 - t1))
    if len({tuple(v) for v in views.values()}) != 1:
        raise SystemExit("bench_build: the builds differ in their samples")
    base_total = rows[0][2] + rows[0][3]
    print(f"\n{a.images} synthetic images (~{a.image_size}^2), ingest shards of {a.samples_per_ingest_shard}, "
          f"img2dataset {a.threads} threads per task; every build has the same {rows[0][1]} samples\n")
    print("| tasks | how | ingest s | shard s | total s | samples/s | vs 1 task |")
    print("|---|---|---|---|---|---|---|")
    for k, n, ti, ts in rows:
        how = "this process" if k == 1 else "local executor array"
        print(f"| {k} | {how} | {ti:.1f} | {ts:.1f} | {ti + ts:.1f} | {n / (ti + ts):.0f} | "
              f"{base_total / (ti + ts):.2f}x |")
    if not a.output_dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
