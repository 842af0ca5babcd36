"""`pixeldit-data`: ingest URL lists, build bucketed shards, print stats, make a synthetic set.

    pixeldit-data ingest urls.parquet --out work/ingest --processes 8 --label-col label
    pixeldit-data shard work/ingest --out s3://bucket/data --min-side 256 --workers 8
    pixeldit-data run urls.parquet --out s3://bucket/data          # both; ingest goes to {out}/_ingest
    pixeldit-data stats s3://bucket/data --png buckets.png
    pixeldit-data synth synth/ --num-images 64 --out data/         # generate, serve on 127.0.0.1, run
    pixeldit-data serve synth/images                               # serve a folder until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from pixeldit.errors import CliParser, cli_main
from pixeldit.storage import join

from .ingest import ENCODE_FORMATS, RESIZE_MODES, IngestConfig, IngestSummary, ingest
from .inputs import INPUT_FORMATS
from .normalize import VERIFY_LEVELS
from .shard import ShardConfig, ShardSummary, build_shards
from .stats import compute_stats, format_report


def _ingest_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ingest (img2dataset)")
    g.add_argument("--url-col", default="url")
    g.add_argument("--caption-col", default="caption")
    g.add_argument("--label-col", default=None, help="integer class id column (class-conditional data)")
    g.add_argument("--extra-cols", default="", help="comma-separated columns kept in each sample's json")
    g.add_argument("--input-format", default="auto", choices=INPUT_FORMATS)
    g.add_argument("--resize", default="off", choices=RESIZE_MODES, help="off: keep downloaded bytes; max-side: shrink")
    g.add_argument("--max-side", type=int, default=1024)
    g.add_argument("--encode-format", default="jpg", choices=ENCODE_FORMATS, help="for --resize max-side")
    g.add_argument("--processes", type=int, default=1)
    g.add_argument("--threads", type=int, default=32)
    g.add_argument("--samples-per-ingest-shard", type=int, default=10_000)
    g.add_argument("--timeout", type=int, default=10)
    g.add_argument("--retries", type=int, default=0)


def _shard_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bucketing + sharding")
    g.add_argument("--samples-per-shard", type=int, default=1000)
    g.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    g.add_argument("--min-side", type=int, default=0)
    g.add_argument("--max-aspect-ratio", type=float, default=4.0, help="0 disables")
    g.add_argument("--min-caption-chars", type=int, default=1, help="0 keeps samples without caption")
    g.add_argument("--max-caption-chars", type=int, default=0, help="0 = no limit")
    g.add_argument("--no-dedupe-url", action="store_true")
    g.add_argument("--no-dedupe-hash", action="store_true")
    g.add_argument("--verify", default="structure", choices=VERIFY_LEVELS, help="decode: full pixel decode per image")
    g.add_argument("--jpeg-quality", type=int, default=95)
    g.add_argument("--workers", type=int, default=1, help="processes for verify/normalise")
    g.add_argument("--base-res", type=int, default=512, help="bucket table for the manifest's bucket sizes")
    g.add_argument("--align", type=int, default=32)
    g.add_argument("--no-progress", action="store_true")


def ingest_config(a: argparse.Namespace) -> IngestConfig:
    return IngestConfig(
        url_col=a.url_col, caption_col=a.caption_col, label_col=a.label_col,
        extra_cols=tuple(c for c in a.extra_cols.split(",") if c), input_format=a.input_format, resize=a.resize,
        max_side=a.max_side, encode_format=a.encode_format, processes=a.processes, threads=a.threads,
        samples_per_shard=a.samples_per_ingest_shard, timeout=a.timeout, retries=a.retries,
    )  # fmt: skip


def shard_config(a: argparse.Namespace) -> ShardConfig:
    return ShardConfig(
        samples_per_shard=a.samples_per_shard, max_shard_bytes=a.max_shard_bytes, min_side=a.min_side,
        max_aspect_ratio=a.max_aspect_ratio, min_caption_chars=a.min_caption_chars,
        max_caption_chars=a.max_caption_chars, dedupe_url=not a.no_dedupe_url, dedupe_hash=not a.no_dedupe_hash,
        verify=a.verify, jpeg_quality=a.jpeg_quality, workers=a.workers, base_res=a.base_res, align=a.align,
        progress=not a.no_progress,
    )  # fmt: skip


def print_ingest(s: IngestSummary) -> None:
    print(
        f"[ingest] {s.out}: {s.input_rows} rows read, {s.rows_to_download} to download "
        f"(dropped before download: {s.skipped_before_download or 'none'}); shards {s.shards_done} done now, "
        f"{s.shards_skipped} already done, {s.shards_total} total; success {s.success}, "
        f"failed to download {s.failed_to_download}, failed to decode {s.failed_to_resize}; {s.seconds:.1f}s"
    )


def print_shard(s: ShardSummary) -> None:
    if s.up_to_date:
        print(f"[shard] {s.root}: up to date (no new ingest shards; {s.ingest_shards_pending} still being ingested)")
    else:
        print(
            f"[shard] {s.root}: {s.ingest_shards_new} ingest shards -> {s.samples_written} samples in "
            f"{s.shards_written} shards; {s.rows_per_second:.0f} rows/s; {s.seconds:.1f}s"
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
    parser = CliParser(prog="pixeldit-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="URL list -> img2dataset shards (incremental)")
    p.add_argument("url_list", help="parquet/csv/jsonl file or folder, local or s3://")
    p.add_argument("--out", required=True, help="ingest folder, local or s3://")
    _ingest_args(p)
    p = sub.add_parser("shard", help="ingest folder(s) -> aspect-ratio-bucketed shards + manifest")
    p.add_argument("ingested", nargs="+", help="ingest folder(s)")
    p.add_argument("--out", required=True, help="output root, local or s3://")
    _shard_args(p)
    p = sub.add_parser("run", help="ingest then shard")
    p.add_argument("url_list")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=None, help="ingest folder (default: {out}/_ingest)")
    _ingest_args(p)
    _shard_args(p)
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
    p = sub.add_parser("serve", help="serve a folder on 127.0.0.1")
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """A user's mistake (bad path, setting, unreachable storage) ends in one line and exit code 2."""
    return cli_main("pixeldit-data", lambda args: _dispatch(build_parser().parse_args(args)), argv)


def _dispatch(a: argparse.Namespace) -> int:
    if a.command == "ingest":
        print_ingest(ingest(a.url_list, a.out, ingest_config(a)))
    elif a.command == "shard":
        print_shard(build_shards(a.ingested, a.out, shard_config(a)))
    elif a.command == "run":
        work = a.work_dir or join(a.out, "_ingest")
        print_ingest(ingest(a.url_list, work, ingest_config(a)))
        print_shard(build_shards(work, a.out, shard_config(a)))
    elif a.command == "stats":
        report = compute_stats(a.root, png=a.png)
        print(json.dumps(report, indent=2) if a.json else format_report(report))
    elif a.command == "synth":
        return _synth(a)
    elif a.command == "serve":
        return _serve(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
