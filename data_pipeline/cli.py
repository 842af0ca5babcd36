"""`pixeldit-data`: ingest URL lists, build bucketed shards, print stats, make a synthetic set.

    pixeldit-data ingest urls.parquet --out work/ingest --processes 8 --label-col label
    pixeldit-data shard work/ingest --out s3://bucket/data --min-side 256 --workers 8
    pixeldit-data run urls.parquet --out s3://bucket/data          # both; ingest goes to {out}/_ingest
    pixeldit-data stats s3://bucket/data --png buckets.png
    pixeldit-data synth synth/ --num-images 64 --out data/         # generate, serve on 127.0.0.1, run
    pixeldit-data serve synth/images                               # serve a folder until Ctrl-C

On a cluster: the same commands with --tasks N and --cluster slurm (or local) run N tasks as a job array,
with pixeldit-submit's launch flags (--partition --account --time-min --mem-gb --cpus-per-task ...); running
the same command again reruns only the tasks that did not finish; `pixeldit-data status ROOT` lists them:

    pixeldit-data ingest laion.parquet --out s3://b/ingest --meta-cols aesthetic,punsafe,pwatermark,similarity \
        --tasks 64 --cluster slurm --partition cpu --time-min 720 --cpus-per-task 16 --processes 16 --log-dir logs/
    pixeldit-data shard s3://b/ingest --out s3://b/data --filter "punsafe < 0.1" --tasks 64 --cluster slurm ...
    pixeldit-data status s3://b/data

    pixeldit-data score s3://bucket/data --clip weights/clip-vit-l14 --aesthetic weights/aesthetic.safetensors \
        --captions recaptions.jsonl --device cuda --part 0 --num-parts 8  # CLIP / aesthetic / pHash / captions
    pixeldit-data dedupe s3://bucket/data --phash-distance 4 --min-similarity 0.95 --device cuda

Flag defaults are those of ``IngestConfig``, ``ShardConfig``, ``ScoreConfig`` and ``DedupeConfig``. A bad flag,
path or setting is one line and exit code 2 (``--traceback`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Sequence

from pixeldit.cluster import RESOURCE_FLAGS, add_launch_flags, launch_config_from_args
from pixeldit.errors import CliParser, cli_main
from pixeldit.storage import exists, join, normalise_root

from .build import BuildFailed, BuildOptions, format_status, load_plan, task_states
from .dedupe import DedupeConfig, dedupe_dataset
from .ingest import DISTRIBUTORS, ENCODE_FORMATS, RESIZE_MODES, IngestConfig, IngestSummary, ingest
from .inputs import INPUT_FORMATS
from .normalize import VERIFY_LEVELS
from .score import ScoreConfig, score_dataset
from .shard import ShardConfig, ShardSummary, build_shards
from .stats import compute_stats, format_report


PROG = "pixeldit-data"


def _ingest_args(p: argparse.ArgumentParser) -> None:
    d = IngestConfig()
    g = p.add_argument_group("ingest (img2dataset)")
    g.add_argument("--url-col", default=d.url_col)
    g.add_argument("--caption-col", default=d.caption_col)
    g.add_argument("--label-col", default=d.label_col, help="integer class id column (class-conditional data)")
    g.add_argument("--meta-cols", default=",".join(d.meta_cols), metavar="COL[:NAME],...",
                   help="input columns carried into every sample's index row and json, e.g. "
                        "aesthetic,punsafe,pwatermark,similarity,WIDTH:input_width,LICENSE:license")
    g.add_argument("--input-format", default=d.input_format, choices=INPUT_FORMATS)
    g.add_argument("--resize", default=d.resize, choices=RESIZE_MODES,
                   help="off: keep downloaded bytes; max-side: shrink")
    g.add_argument("--max-side", type=int, default=d.max_side)
    g.add_argument("--encode-format", default=d.encode_format, choices=ENCODE_FORMATS, help="for --resize max-side")
    g.add_argument("--processes", type=int, default=d.processes)
    g.add_argument("--threads", type=int, default=d.threads)
    g.add_argument("--samples-per-ingest-shard", type=int, default=d.samples_per_shard)
    g.add_argument("--timeout", type=int, default=d.timeout)
    g.add_argument("--retries", type=int, default=d.retries)
    g.add_argument("--distributor", default=d.distributor, choices=DISTRIBUTORS,
                   help="img2dataset's: pyspark runs each download on the active Spark session's cluster")


def _shard_args(p: argparse.ArgumentParser) -> None:
    d = ShardConfig()
    g = p.add_argument_group("bucketing + sharding")
    g.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    g.add_argument("--max-shard-bytes", type=int, default=d.max_shard_bytes)
    g.add_argument("--min-side", type=int, default=d.min_side,
                   help="drop images whose shorter side is smaller (default: the shortest bucket side of the "
                        "--base-res table, 256 at 512; 0 keeps every size)")
    g.add_argument("--max-aspect-ratio", type=float, default=d.max_aspect_ratio, help="0 disables")
    g.add_argument("--min-caption-chars", type=int, default=d.min_caption_chars, help="0 keeps samples without caption")
    g.add_argument("--max-caption-chars", type=int, default=d.max_caption_chars, help="0 = no limit")
    g.add_argument("--no-dedupe-url", action="store_false", dest="dedupe_url", default=d.dedupe_url)
    g.add_argument("--no-dedupe-hash", action="store_false", dest="dedupe_hash", default=d.dedupe_hash)
    g.add_argument("--verify", default=d.verify, choices=VERIFY_LEVELS, help="decode: full pixel decode per image")
    g.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    g.add_argument("--workers", type=int, default=d.workers, help="processes for verify/normalise")
    g.add_argument("--base-res", type=int, default=d.base_res, help="bucket table for the manifest's bucket sizes")
    g.add_argument("--align", type=int, default=d.align)
    g.add_argument("--no-progress", action="store_false", dest="progress", default=d.progress)
    g.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction,
                   help="fraction of the keys held out of training (validation loss); 0: none")
    g.add_argument("--holdout-min-per-bucket", type=int, default=d.holdout_min_per_bucket,
                   help="top each bucket's held-out split up to this many samples (at most half of the bucket)")


def _filter_arg(p: argparse.ArgumentParser, when: str) -> None:
    p.add_argument("--filter", default="", metavar="EXPR",
                   help=f"keep only rows where EXPR holds over the metadata columns ({when}), e.g. "
                        f"\"aesthetic >= 6 and punsafe < 0.1\" (grammar: data_pipeline/filters.py)")


def _build_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several tasks, on a cluster (the launch flags are pixeldit-submit's)")
    g.add_argument("--tasks", type=int, default=1, help="cut the work into this many tasks (a job array)")
    add_launch_flags(g, RESOURCE_FLAGS, cluster_default=None)
    g.add_argument("--log-dir", default="", help="submitit's pickles and logs (default: logs/ in the root's build "
                                                 "folder; an S3 root needs a folder every node sees)")
    g.add_argument("--no-wait", action="store_true", help="submit the tasks and return (run again to commit)")
    g.add_argument("--restart-build", action="store_true",
                   help="discard an unfinished build of other inputs or settings at the root")


def build_options(a: argparse.Namespace) -> BuildOptions:
    launch = launch_config_from_args(a) if a.cluster else None
    return BuildOptions(tasks=a.tasks, launch=launch, wait=not a.no_wait, restart=a.restart_build,
                        log_dir=a.log_dir)


def ingest_config(a: argparse.Namespace, row_filter: str = "") -> IngestConfig:
    return IngestConfig(
        url_col=a.url_col, caption_col=a.caption_col, label_col=a.label_col,
        meta_cols=tuple(c for c in a.meta_cols.split(",") if c), filter=row_filter, input_format=a.input_format,
        resize=a.resize, max_side=a.max_side, encode_format=a.encode_format, processes=a.processes,
        threads=a.threads, samples_per_shard=a.samples_per_ingest_shard, timeout=a.timeout, retries=a.retries,
        distributor=a.distributor,
    )  # fmt: skip


def shard_config(a: argparse.Namespace, row_filter: str = "") -> ShardConfig:
    return ShardConfig(
        samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes, min_side=a.min_side,
        max_aspect_ratio=a.max_aspect_ratio, min_caption_chars=a.min_caption_chars,
        max_caption_chars=a.max_caption_chars, dedupe_url=a.dedupe_url, dedupe_hash=a.dedupe_hash,
        verify=a.verify, jpeg_quality=a.jpeg_quality, workers=a.workers, base_res=a.base_res, align=a.align,
        filter=row_filter, progress=a.progress, holdout_fraction=a.holdout_fraction,
        holdout_min_per_bucket=a.holdout_min_per_bucket,
    )  # fmt: skip


def print_ingest(s: IngestSummary) -> None:
    if not s.waited:
        print(f"[ingest] {s.out}: {s.tasks} tasks submitted; `pixeldit-data status {s.out}` follows them, the same "
              f"command again reruns the unfinished ones")
        return
    print(
        f"[ingest] {s.out}: {s.input_rows} rows read, {s.rows_to_download} to download "
        f"(dropped before download: {s.skipped_before_download or 'none'}); shards {s.shards_done} done now, "
        f"{s.shards_skipped} already done, {s.shards_total} total; success {s.success}, "
        f"failed to download {s.failed_to_download}, failed to decode {s.failed_to_resize}; {s.seconds:.1f}s"
    )


def print_shard(s: ShardSummary) -> None:
    if not s.waited:
        print(f"[shard] {s.root}: {s.tasks} tasks submitted; run the same command again once they are done to "
              f"commit (`pixeldit-data status {s.root}` follows them)")
        return
    if s.up_to_date:
        print(f"[shard] {s.root}: up to date (no new ingest shards; {s.ingest_shards_pending} still being ingested)")
    else:
        print(
            f"[shard] {s.root}: {s.ingest_shards_new} ingest shards -> {s.samples_written} samples in "
            f"{s.shards_written} shards ({s.tasks} task{'s' if s.tasks > 1 else ''}); {s.rows_per_second:.0f} "
            f"rows/s; {s.seconds:.1f}s"
        )
    print(format_report(s.stats))


def _synth(a: argparse.Namespace) -> int:
    from .serve import serve_folder
    from .synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(
        a.dir, num_images=a.num_images, seed=a.seed, base_size=a.base_size, bad_inputs=a.bad_inputs
    )
    print(f"[synth] {len(ds.items)} items under {ds.images_dir}")
    if a.base_url:
        print(f"[synth] URL list: {ds.write_url_list(a.base_url, join(a.dir, 'urls.parquet'))}")
    if a.out:
        with serve_folder(ds.images_dir) as base:
            url_list = ds.write_url_list(base, join(a.dir, "urls.parquet"))
            cfg = IngestConfig(label_col="label", threads=8, timeout=5, samples_per_shard=max(16, a.num_images))
            print_ingest(ingest(url_list, join(a.dir, "ingest"), cfg))
        shard_cfg = ShardConfig(samples_per_shard=a.samples_per_shard, min_side=8)
        print_shard(build_shards(join(a.dir, "ingest"), a.out, shard_cfg))
    return 0


def _score(a: argparse.Namespace) -> int:
    cfg = ScoreConfig(clip=a.clip, aesthetic=a.aesthetic, side_captions=tuple(a.captions), batch_size=a.batch_size,
                      device=a.device, decode_threads=a.decode_threads, part=a.part, num_parts=a.num_parts,
                      overwrite=a.overwrite, progress=a.progress)
    s = score_dataset(a.root, cfg)
    print(f"[score] {s.root} part {a.part}/{a.num_parts}: {s.shards_scored} shards scored, {s.shards_skipped} up to "
          f"date; {s.samples_scored} images, {s.captions_scored} captions, {s.images_per_second:.1f} images/s; "
          f"{len(s.undecodable)} undecodable{' (' + ', '.join(s.undecodable[:5]) + ')' if s.undecodable else ''}; "
          f"{s.side_unknown_keys} side captions of unknown keys; "
          f"{'committed' if s.committed else 'not committed (other parts still running)'}")
    return 0


def _dedupe(a: argparse.Namespace) -> int:
    cfg = DedupeConfig(phash_distance=None if a.phash_distance < 0 else a.phash_distance,
                       min_similarity=None if a.min_similarity > 1 else a.min_similarity, block=a.block,
                       device=a.device)
    s = dedupe_dataset(a.root, cfg)
    print(f"[dedupe] {s.root}: {s.dropped} of {s.samples} samples dropped ({s.by_reason}); "
          f"{s.candidate_pairs} pairs within the thresholds; {s.seconds:.1f}s")
    return 0


def _serve(a: argparse.Namespace) -> int:
    from .serve import serve_folder

    with serve_folder(a.dir, port=a.port) as base:
        print(f"serving {a.dir} at {base} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="URL list -> img2dataset shards (incremental)")
    p.add_argument("url_list", help="parquet/csv/jsonl file or folder, local or s3://")
    p.add_argument("--out", required=True, help="ingest folder, local or s3://")
    _ingest_args(p)
    _filter_arg(p, "--meta-cols names; applied before download")
    _build_args(p)
    p = sub.add_parser("shard", help="ingest folder(s) -> aspect-ratio-bucketed shards + manifest")
    p.add_argument("ingested", nargs="+", help="ingest folder(s)")
    p.add_argument("--out", required=True, help="output root, local or s3://")
    _shard_args(p)
    _filter_arg(p, "those the ingest folders carry")
    _build_args(p)
    p = sub.add_parser("run", help="ingest then shard")
    p.add_argument("url_list")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=None, help="ingest folder (default: {out}/_ingest)")
    _ingest_args(p)
    _shard_args(p)
    _filter_arg(p, "--meta-cols names; applied before download")
    _build_args(p)
    p = sub.add_parser("status", help="the build of an ingest folder or dataset root: each task's slice and state")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="one JSON object per task")
    p = sub.add_parser("stats", help="samples per bucket, skips by reason, histogram PNG")
    p.add_argument("root")
    p.add_argument("--png", default=None, help="write the bucket histogram here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("synth", help="write the synthetic shapes set (optionally serve + run it)")
    p.add_argument("dir")
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-size", type=int, default=64)
    p.add_argument("--bad-inputs", action="store_true", help="add the bad-input zoo")
    p.add_argument("--base-url", default=None, help="write {dir}/urls.parquet for images served at this URL")
    p.add_argument("--out", default=None, help="also serve on 127.0.0.1, ingest and shard into this root")
    p.add_argument("--samples-per-shard", type=int, default=64)
    sd = ScoreConfig(clip="")
    p = sub.add_parser("score", help="CLIP score, aesthetic score, pHash and caption scores of a committed root")
    p.add_argument("root")
    p.add_argument("--clip", required=True, help="local transformers CLIPModel folder (weights + tokenizer)")
    p.add_argument("--aesthetic", default=sd.aesthetic, help="aesthetic head: safetensors with layers.{i}.weight/bias")
    p.add_argument("--captions", nargs="*", default=list(sd.side_captions),
                   help="side caption files (JSONL/parquet: key, source, caption[, score])")
    p.add_argument("--batch-size", type=int, default=sd.batch_size)
    p.add_argument("--device", default=sd.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--decode-threads", type=int, default=sd.decode_threads)
    p.add_argument("--part", type=int, default=sd.part, help="this process's part of the shards (SLURM array id)")
    p.add_argument("--num-parts", type=int, default=sd.num_parts)
    p.add_argument("--overwrite", action="store_true", default=sd.overwrite, help="recompute up-to-date parts")
    p.add_argument("--no-progress", action="store_false", dest="progress", default=sd.progress)
    dd = DedupeConfig()
    p = sub.add_parser("dedupe", help="near-duplicates by pHash and CLIP image embeddings -> the dedupe table")
    p.add_argument("root")
    p.add_argument("--phash-distance", type=int, default=dd.phash_distance, help="max Hamming bits of 64; -1 disables")
    p.add_argument("--min-similarity", type=float, default=dd.min_similarity,
                   help="min cosine of image embeddings; > 1 disables")
    p.add_argument("--block", type=int, default=dd.block, help="rows per similarity block")
    p.add_argument("--device", default=dd.device)
    p = sub.add_parser("serve", help="serve a folder on 127.0.0.1")
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _dispatch(a)
    except BuildFailed as err:  # some tasks failed: they are listed; the same command reruns them
        print(f"{PROG} {a.command}: {err}", file=sys.stderr)
        return 1


def _dispatch(a: argparse.Namespace) -> int:
    if a.command == "ingest":
        print_ingest(ingest(a.url_list, a.out, ingest_config(a, a.filter), build_options(a)))
    elif a.command == "shard":
        print_shard(build_shards(a.ingested, a.out, shard_config(a, a.filter), build_options(a)))
    elif a.command == "run":
        work = a.work_dir or join(a.out, "_ingest")
        options = build_options(a)
        summary = ingest(a.url_list, work, ingest_config(a, a.filter), options)
        print_ingest(summary)
        if summary.waited:
            print_shard(build_shards(work, a.out, shard_config(a), options))
    elif a.command == "status":
        root = normalise_root(a.root)
        plan = load_plan(root)
        if plan is None and not exists(root):
            raise FileNotFoundError(f"{a.root}: no such ingest folder or dataset root")
        states = task_states(plan) if plan is not None else []
        if a.json:
            print("\n".join(json.dumps({"plan": plan.id, "kind": plan.kind, **dataclasses.asdict(s)}) for s in states)
                  if plan is not None else "")
        else:
            print(format_status(plan, states))
    elif a.command == "stats":
        report = compute_stats(a.root, png=a.png)
        print(json.dumps(report, indent=2) if a.json else format_report(report))
    elif a.command == "score":
        return _score(a)
    elif a.command == "dedupe":
        return _dedupe(a)
    elif a.command == "synth":
        return _synth(a)
    elif a.command == "serve":
        return _serve(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
