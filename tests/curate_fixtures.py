"""A committed root with planted near-duplicates, a tiny random CLIP and aesthetic head, side caption files.

``write_curation_root`` writes distinct images (8 x 8 random colour grids upsampled bicubic: pHashes ~20-40 bits
apart), copies of some of them resized to 3/4 and re-encoded as JPEG quality 75 (``resized``), copies with the
same pixels saved as PNG (``lossless``) and one truncated JPEG (``broken``), in shards written by
data_pipeline's shard writer and committed through ``dataset_format.write_index``.
"""
from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from data_pipeline.dataset_format import NO_LABEL, SampleRow, ShardRow, rows_to_table, shard_name, write_index
from data_pipeline.tarshard import ShardWriter
from eval_fixtures import save_tiny_clip  # noqa: F401 (re-exported)


def grid_image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def encode(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


@dataclass
class CurationRoot:
    root: Path
    keys: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)  # copy key -> original key
    lossless: dict[str, str] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)
    png: list[str] = field(default_factory=list)  # keys stored as PNG (decoded without draft)


def write_curation_root(root: Path, distinct: int = 16, resized: int = 4, lossless: int = 2,
                        per_shard: int = 6) -> CurationRoot:
    """Originals first (keys sort before their copies), then copies and the broken sample, in shards."""
    out = CurationRoot(root=root)
    items: list[tuple[str, bytes, str, int, int]] = []  # key, bytes, ext, width, height
    sizes = [(64, 64), (96, 48)]
    for n in range(distinct):
        w, h = sizes[n % 2]
        fmt = "PNG" if n % 3 == 0 else "JPEG"
        key = f"a{n:04d}"
        items.append((key, encode(grid_image(n, w, h), fmt), fmt.lower().replace("jpeg", "jpg"), w, h))
        if fmt == "PNG":
            out.png.append(key)
    for n in range(resized):
        w, h = sizes[n % 2]
        copy = grid_image(n, w, h).resize((w * 3 // 4, h * 3 // 4), Image.LANCZOS)
        items.append((f"b{n:04d}", encode(copy, "JPEG", 75), "jpg", copy.width, copy.height))
        out.resized[f"b{n:04d}"] = f"a{n:04d}"
    png_sources = [n for n in range(distinct) if n % 3 == 0][::-1]  # same pixels only from a lossless original
    for n in range(lossless):
        src = png_sources[n]
        w, h = sizes[src % 2]
        items.append((f"c{n:04d}", encode(grid_image(src, w, h), "PNG"), "png", w, h))
        out.lossless[f"c{n:04d}"] = f"a{src:04d}"
        out.png.append(f"c{n:04d}")
    items.append(("d0000", encode(grid_image(999, 64, 64), "JPEG")[:300], "jpg", 64, 64))
    out.broken.append("d0000")
    rows, manifest = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for s in range(-(-len(items) // per_shard)):
            rel = shard_name("1.00", s)
            writer = ShardWriter(str(root / rel), scratch)
            for i, (key, data, ext, w, h) in enumerate(items[s * per_shard:(s + 1) * per_shard]):
                caption = f"an image numbered {key}"
                span = writer.add(key, data, ext, caption, {"key": key}, None)
                rows.append(SampleRow(key=key, shard=rel, ratio_key="1.00", sample_index=i, image_offset=span.offset,
                                      image_size=span.size, image_ext=ext, caption=caption, width=w, height=h,
                                      label=NO_LABEL, url=f"http://x/{key}", sha256=None))
                out.keys.append(key)
            count, size = writer.num_samples, writer.commit()
            manifest.append(ShardRow(shard=rel, ratio_key="1.00", bucket_height=64, bucket_width=64,
                                     num_samples=count, bytes=size, min_width=1, max_width=96, min_height=1,
                                     max_height=96))
    write_index(str(root), rows_to_table(rows[::-1], SampleRow), {"total": len(rows), "ok": len(rows)},
                rows_to_table(manifest, ShardRow), {})
    return out


def save_aesthetic_head(path: Path, dims: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random head in the LAION layout: layers.{0,2,4,...}.weight / .bias (dropouts between), safetensors."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        state[f"layers.{2 * n}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        state[f"layers.{2 * n}.bias"] = torch.randn(b, generator=g) * 0.1
    save_file(state, str(path))
    return state


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
