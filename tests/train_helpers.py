"""Shared helpers of the trainer tests: a tiny bucketed dataset in the contracts.md layout, and configs.

``write_tiny_dataset`` writes webdataset tars with the stdlib ``tarfile`` module plus ``samples.parquet``
(with the byte offset of every image member) and ``manifest.parquet`` (written last), exactly the layout
data_pipeline produces, so the loader is tested against the contract itself.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pixeldit.train.trainer import pick_free_port as free_port  # noqa: F401 (re-exported for tests)

ROOT = Path(__file__).resolve().parents[1]

# ratio key -> (height, width) of the stored (original) images; ratio = h / w
SOURCE_SIZES = {"1.00": (40, 40), "0.50": (30, 60), "2.00": (72, 36)}


def _image(h: int, w: int, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=3)
    arr = (base + 90 * np.sin(xx[..., None] / (3 + seed % 5) + yy[..., None] / 7 + rng.random(3))) % 256
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


def write_tiny_dataset(root: str | os.PathLike, counts: dict[str, int], per_shard: int = 4,
                       num_classes: int = 10, seed: int = 0) -> Path:
    """Write ``counts[ratio_key]`` samples per bucket into shards of ``per_shard`` samples."""
    root = Path(root)
    rows, manifest = [], []
    n = 0
    for key, count in counts.items():
        h, w = SOURCE_SIZES[key]
        (root / "shards" / key).mkdir(parents=True, exist_ok=True)
        for s in range(-(-count // per_shard)):
            rel = f"shards/{key}/{key}-{s:06d}.tar"
            members = []
            with tarfile.open(root / rel, "w") as tar:
                for i in range(min(per_shard, count - s * per_shard)):
                    sk = f"{n:08d}"
                    ext = "png" if n % 4 == 3 else "jpg"
                    label = n % num_classes
                    caption = f"sample {n} in bucket {key}"
                    data = _image(h, w, seed * 100003 + n, ext)
                    meta = {"key": sk, "url": f"http://x/{sk}", "caption": caption, "width": w, "height": h,
                            "ratio_key": key, "sha256": "", "label": label}
                    for name, blob in ((f"{sk}.{ext}", data), (f"{sk}.txt", caption.encode()),
                                       (f"{sk}.json", json.dumps(meta).encode()), (f"{sk}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
                    members.append((sk, ext, len(data), caption, label, i))
                    n += 1
            with tarfile.open(root / rel) as tar:
                offsets = {m.name: m.offset_data for m in tar.getmembers()}
            for sk, ext, size, caption, label, i in members:
                rows.append({"key": sk, "shard": rel, "ratio_key": key, "sample_index": i,
                             "image_offset": offsets[f"{sk}.{ext}"], "image_size": size, "image_ext": ext,
                             "caption": caption, "width": w, "height": h, "label": label, "url": f"http://x/{sk}"})
            manifest.append({"shard": rel, "ratio_key": key, "bucket_height": h, "bucket_width": w,
                             "num_samples": len(members), "bytes": (root / rel).stat().st_size,
                             "min_width": w, "max_width": w, "min_height": h, "max_height": h})
    pq.write_table(pa.Table.from_pylist(rows), root / "samples.parquet")
    (root / "stats.json").write_text(json.dumps({"total": n, "ok": n}))
    pq.write_table(pa.Table.from_pylist(manifest), root / "manifest.parquet")
    return root


def torchrun(config: Path, nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    """Command and environment of ``pixeldit-train`` under torchrun on CPU ranks (gloo) for ``config``."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "pixeldit.train.cli", "--config", str(config)]
    return cmd, env
