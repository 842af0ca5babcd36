"""Stats of a sharded root: samples per bucket, success / failure counts by reason, a histogram PNG.

    report = compute_stats("s3://bucket/data", png="buckets.png")
    print(format_report(report))
"""

from __future__ import annotations

import io
import os
from typing import Any

from pixeldit.storage import write_bytes_atomic

from .buckets import RATIO_KEYS
from .dataset_format import MANIFEST, STATS, ShardRow, read_manifest, read_stats, table_rows


def compute_stats(root: str, png: str | None = None) -> dict[str, Any]:
    """The stats of `root` (dataset_format.STATS), cross-checked against the manifest, plus per-bucket shard counts.

    With `png` (local path or URL), also writes a bar chart of samples per bucket there. Raises
    FileNotFoundError when `root` has no committed run, ValueError if stats and manifest disagree.
    """
    stats = read_stats(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root}: {STATS} exists but {MANIFEST} does not; re-run the shard stage")
    per_bucket: dict[str, int] = {}
    shards_per_bucket: dict[str, int] = {}
    for r in table_rows(manifest, ShardRow):
        per_bucket[r.ratio_key] = per_bucket.get(r.ratio_key, 0) + int(r.num_samples)
        shards_per_bucket[r.ratio_key] = shards_per_bucket.get(r.ratio_key, 0) + 1
    if per_bucket != stats.get("buckets", {}):
        raise ValueError(f"{root}: {STATS} buckets disagree with {MANIFEST}; re-run the shard stage")
    report = {
        **stats,
        "shards_per_bucket": dict(sorted(shards_per_bucket.items(), key=lambda kv: float(kv[0]))),
        "success_rate": stats["ok"] / stats["total"] if stats.get("total") else 0.0,
    }
    if png:
        write_histogram(per_bucket, png, title=f"{stats['ok']} samples in {len(per_bucket)} buckets")
        report["histogram"] = png
    return report


def write_histogram(per_bucket: dict[str, int], png: str, title: str = "") -> None:
    """Bar chart of samples per ratio key (all keys of the table, empty ones included) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = [per_bucket.get(k, 0) for k in RATIO_KEYS]
    fig, ax = plt.subplots(figsize=(12, 4), dpi=100)
    ax.bar(range(len(RATIO_KEYS)), counts, color="#4472c4")
    ax.set_xticks(range(len(RATIO_KEYS)), RATIO_KEYS, rotation=90, fontsize=8)
    ax.set_xlabel("aspect-ratio bucket (height / width)")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or "samples per bucket")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    if "://" not in png:
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    write_bytes_atomic(png, buf.getvalue())


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of compute_stats() / the root's stats."""
    lines = [
        f"total rows: {report.get('total', 0)}   ok: {report.get('ok', 0)}   "
        f"pending: {report.get('pending', 0)}   shards: {report.get('shards', 0)}   "
        f"bytes: {report.get('bytes', 0):,}"
    ]
    for title, key in (("skipped", "skipped"), ("normalised (kept)", "normalised")):
        items = report.get(key) or {}
        ranked = sorted(items.items(), key=lambda kv: -kv[1])
        lines.append(f"{title}: " + (", ".join(f"{k}={v}" for k, v in ranked) or "none"))
    buckets = report.get("buckets") or {}
    if buckets:
        width = max(buckets.values())
        lines.append("samples per bucket (h/w):")
        for k, v in buckets.items():
            lines.append(f"  {k:>5} {v:>8}  " + "#" * max(1, round(40 * v / width)))
    if report.get("histogram"):
        lines.append(f"histogram: {report['histogram']}")
    return "\n".join(lines)
