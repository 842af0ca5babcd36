"""A small, deterministic text-image set of coloured shapes, plus the bad-input zoo.

    ds = make_synthetic_dataset("synth/", num_images=48, seed=0, bad_inputs=True)
    with serve_folder(ds.images_dir) as base_url:
        url_list = ds.write_url_list(base_url, "synth/urls.parquet")
        ...

Images are circles / squares / triangles in one of several colours on a plain background, at several
aspect ratios (1:3 .. 3:1; the shape always inside the centred square, which a centre crop keeps), with
captions that describe them ("a large red circle on a white background"). The class label is shape * len(COLOURS) + colour (see CLASS_NAMES). Good images are
JPEG (3 of 4) or PNG (1 of 4). Everything depends on `seed` only.

`bad_inputs=True` adds one item per bad-input case (see ZOO_CASES); each item's `expect` says what
the pipeline must do with it: "ok", "ok:<Fix>" (kept after a normalisation) or "skip:<Skip>".
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pixeldit.storage import atomic_local_file, write_bytes_atomic

from .reasons import Fix, Skip
from .serve import LOOPBACK, closed_port

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 170), "orange": (245, 130, 20),
}  # fmt: skip
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "pale blue": (190, 215, 240),
}  # fmt: skip
SIZES = ("large", "small")  # radius 0.4 / 0.22 of the shorter side; a large shape's centre moves at most 0.1 of it
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2), (3, 1), (1, 3))  # (w, h)
ZOO_CASES = (
    "truncated_jpeg", "zero_byte", "html_as_image", "cmyk_jpeg", "rgba_png", "png16_rgb", "png16_gray",
    "palette_png", "exif_rotated", "extreme_ratio", "tiny", "missing_caption", "empty_caption",
    "non_utf8_caption", "duplicate_url", "duplicate_content", "unreachable", "not_found",
)  # fmt: skip
URL_LIST_FORMATS = ("parquet", "csv", "jsonl")


@dataclass(frozen=True)
class SyntheticItem:
    """One row of the URL list. `name` is the file the URL points at, relative to images_dir."""

    name: str
    caption: str | bytes | None
    label: int
    kind: str  # "good" or a ZOO_CASES entry
    expect: str  # "ok" | "ok:<Fix value>" | "skip:<Skip value>"
    width: int = 0  # displayed (EXIF-corrected) size of the image, 0 when not an image
    height: int = 0
    served: bool = True  # False: the URL points at a loopback port nothing listens on


@dataclass
class SyntheticDataset:
    root: str
    items: list[SyntheticItem] = field(default_factory=list)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.root, "images")

    def url_of(self, item: SyntheticItem, base_url: str, dead_port: int) -> str:
        host = base_url if item.served else f"http://{LOOPBACK}:{dead_port}"
        return f"{host}/{item.name}"

    def write_url_list(self, base_url: str, path: str, fmt: str = "parquet",
                       columns: dict[str, list] | None = None) -> str:
        """Write url, caption, label rows to `path` (parquet, csv or jsonl); returns `path`.

        Non-UTF-8 captions stay raw bytes: a binary caption column in parquet, raw bytes in csv/jsonl.
        ``columns``: more columns, one value per item (e.g. scores that ``--meta-cols`` carries).
        """
        if fmt not in URL_LIST_FORMATS:
            raise ValueError(f"write_url_list: unknown format {fmt!r}; valid: {', '.join(URL_LIST_FORMATS)}")
        columns = columns or {}
        for name, values in columns.items():
            if len(values) != len(self.items):
                raise ValueError(f"write_url_list: column {name!r} has {len(values)} values for {len(self.items)} items")
        dead = closed_port()
        urls = [self.url_of(it, base_url.rstrip("/"), dead) for it in self.items]
        captions = [it.caption for it in self.items]
        labels = [it.label for it in self.items]
        if fmt == "parquet":
            any_bytes = any(isinstance(c, bytes) for c in captions)
            col = [c.encode() if any_bytes and isinstance(c, str) else c for c in captions]
            table = pa.table(
                {"url": urls, "caption": pa.array(col, pa.binary() if any_bytes else pa.string()), "label": labels,
                 **columns}
            )
            with atomic_local_file(path) as tmp:
                pq.write_table(table, tmp)
            return path
        as_text = [c.decode("utf-8", "surrogateescape") if isinstance(c, bytes) else c for c in captions]
        extra = [[values[i] for values in columns.values()] for i in range(len(self.items))]
        buf = io.StringIO()
        if fmt == "csv":
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["url", "caption", "label", *columns])
            writer.writerows([u, "" if c is None else c, lab, *("" if v is None else v for v in e)]
                             for u, c, lab, e in zip(urls, as_text, labels, extra))
        else:
            for u, c, lab, e in zip(urls, as_text, labels, extra):
                row = {"url": u, "caption": c, "label": lab, **dict(zip(columns, e))}
                buf.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_bytes_atomic(path, buf.getvalue().encode("utf-8", "surrogateescape"))
        return path


def _size_for(aspect: tuple[int, int], base: int) -> tuple[int, int]:
    """(width, height) with w/h = aspect and area about base**2."""
    w, h = aspect
    return max(8, round(base * math.sqrt(w / h))), max(8, round(base * math.sqrt(h / w)))


def draw_shape(
    width: int, height: int, shape: str, colour: str, background: str, rng: random.Random,
    sizes: tuple[str, ...] = SIZES,
) -> tuple[Image.Image, str]:
    """An RGB image of one shape and its caption; the size is drawn from ``sizes`` (a subset of SIZES)."""
    img = Image.new("RGB", (width, height), BACKGROUNDS[background])
    drawn = SIZES[0] if rng.random() < 0.5 else SIZES[1]  # drawn for one size too: the rest of the set is the same
    size = drawn if drawn in sizes else sizes[0]
    side = min(width, height)
    r = side * (0.4 if size == "large" else 0.22)
    # inside the centred side x side square: a centre crop to a square (fixed-size training buckets) keeps the
    # whole shape, so the caption stays true (else ~13% of 32 px crops showed a cut shape)
    left, top = (width - side) / 2, (height - side) / 2
    cx = rng.uniform(left + r, left + side - r)
    cy = rng.uniform(top + r, top + side - r)
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[colour])
    return img, f"a {size} {colour} {shape} on a {background} background"


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16_rgb(rgb8: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) whose top bytes equal `rgb8` (H, W, 3)."""
    h, w, _ = rgb8.shape
    data16 = rgb8.astype(">u2") * 257  # (H, W, 3) big-endian 16-bit
    raw = b"".join(b"\x00" + data16[y].tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def make_synthetic_dataset(
    root: str, num_images: int = 48, seed: int = 0, base_size: int = 64, bad_inputs: bool = False,
    sizes: tuple[str, ...] = SIZES,
) -> SyntheticDataset:
    """Write `num_images` good images (and the zoo if `bad_inputs`) under {root}/images; returns the item list.
    `sizes`: the shape sizes drawn (SIZES, or one of them).

    Also writes {root}/items.jsonl (one line per item: name, caption, label, kind, expect) for humans.
    """
    if not sizes or set(sizes) - set(SIZES):
        raise ValueError(f"sizes={sizes!r}; valid sizes: {', '.join(SIZES)} (one or both)")
    sizes = tuple(s for s in SIZES if s in sizes)
    rng = random.Random(seed)
    ds = SyntheticDataset(root=root)
    os.makedirs(ds.images_dir, exist_ok=True)

    def put(name: str, payload: bytes) -> None:
        with open(os.path.join(ds.images_dir, name), "wb") as f:
            f.write(payload)

    def sample(aspect: tuple[int, int]) -> tuple[Image.Image, str, int]:
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        img, caption = draw_shape(*_size_for(aspect, base_size), shape, colour, rng.choice(tuple(BACKGROUNDS)), rng,
                                  sizes)
        return img, caption, SHAPES.index(shape) * len(COLOURS) + tuple(COLOURS).index(colour)

    for i in range(num_images):
        img, caption, label = sample(ASPECTS[i % len(ASPECTS)])
        fmt = "png" if i % 4 == 3 else "jpg"
        name = f"img_{i:05d}.{fmt}"
        put(name, _encode(img, "PNG") if fmt == "png" else _encode(img, "JPEG", quality=95))
        ds.items.append(SyntheticItem(name, caption, label, "good", "ok", img.width, img.height))
    if bad_inputs:
        _add_zoo(ds, put, sample, base_size)
    with open(os.path.join(root, "items.jsonl"), "w", encoding="utf-8") as f:
        for it in ds.items:
            cap = it.caption.decode("latin-1") if isinstance(it.caption, bytes) else it.caption
            row = {"name": it.name, "caption": cap, "label": it.label, "kind": it.kind, "expect": it.expect}
            f.write(json.dumps(row) + "\n")
    return ds


def _skip(reason: Skip) -> str:
    return f"skip:{reason.value}"


def _ok(fix: Fix) -> str:
    return f"ok:{fix.value}"


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    return _encode(img, "JPEG", quality=95, **kw)


def _add_zoo(ds: SyntheticDataset, put, sample, base: int) -> None:  # type: ignore[no-untyped-def]
    """One item per ZOO_CASES entry (needs at least two good items for the duplicate cases)."""
    goods = [it for it in ds.items if it.kind == "good"]
    if len(goods) < 2:
        raise ValueError("make_synthetic_dataset: bad_inputs=True needs num_images >= 2 (duplicates refer to them)")

    def add(kind, name, payload, caption, label, expect, size=(0, 0), served=True):  # type: ignore[no-untyped-def]
        if payload is not None:
            put(name, payload)
        ds.items.append(SyntheticItem(name, caption, label, kind, expect, size[0], size[1], served))

    img, cap, lab = sample((4, 3))
    full = _jpeg(img)
    add("truncated_jpeg", "zoo_truncated.jpg", full[: len(full) * 2 // 3], cap, lab, _skip(Skip.TRUNCATED))
    add("zero_byte", "zoo_empty.jpg", b"", cap, lab, _skip(Skip.EMPTY_PAYLOAD))
    html = b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n"
    add("html_as_image", "zoo_html.jpg", html, cap, lab, _skip(Skip.NOT_AN_IMAGE))

    img, cap, lab = sample((3, 2))
    add("cmyk_jpeg", "zoo_cmyk.jpg", _jpeg(img.convert("CMYK")), cap, lab, _ok(Fix.CMYK), img.size)
    img, cap, lab = sample((1, 1))
    rgba = img.convert("RGBA")
    alpha = Image.new("L", img.size, 0)
    ImageDraw.Draw(alpha).ellipse((img.width // 8, img.height // 8, img.width * 7 // 8, img.height * 7 // 8), fill=200)
    rgba.putalpha(alpha)
    add("rgba_png", "zoo_rgba.png", _encode(rgba, "PNG"), cap, lab, _ok(Fix.ALPHA), img.size)
    img, cap, lab = sample((2, 3))
    add("png16_rgb", "zoo_png16_rgb.png", png16_rgb(np.asarray(img)), cap, lab, _ok(Fix.HIGH_BIT_DEPTH), img.size)
    img, cap, lab = sample((3, 4))
    gray16 = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    add("png16_gray", "zoo_png16_gray.png", _encode(gray16, "PNG"), cap, lab, _ok(Fix.HIGH_BIT_DEPTH), img.size)
    img, cap, lab = sample((16, 9))
    palette = _encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG")
    add("palette_png", "zoo_palette.png", palette, cap, lab, _ok(Fix.PALETTE), img.size)
    img, cap, lab = sample((1, 2))  # displayed tall (ratio 2); stored landscape with EXIF orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    add("exif_rotated", "zoo_exif_rot.jpg", stored, cap, lab, _ok(Fix.EXIF_ORIENTATION), img.size)

    img, cap, lab = sample((8, 1))
    img = img.resize((base * 4, base // 2))
    add("extreme_ratio", "zoo_extreme.jpg", _jpeg(img), cap, lab, _skip(Skip.ASPECT_RATIO), img.size)
    img, cap, lab = sample((1, 1))
    img = img.resize((8, 8))
    add("tiny", "zoo_tiny.jpg", _jpeg(img), cap, lab, _skip(Skip.TOO_SMALL), img.size)
    for kind, caption, expect in (
        ("missing_caption", None, _skip(Skip.CAPTION_MISSING)),
        ("empty_caption", "   ", _skip(Skip.CAPTION_EMPTY)),
        ("non_utf8_caption", None, _ok(Fix.CAPTION_NON_UTF8)),
    ):
        img, cap, lab = sample((4, 3))
        if kind == "non_utf8_caption":
            caption = (cap + " (café)").encode("cp1252")
        add(kind, f"zoo_{kind}.jpg", _jpeg(img), caption, lab, expect, img.size)

    first, second = goods[0], goods[1]
    add("duplicate_url", first.name, None, "another caption, same url", first.label, _skip(Skip.DUPLICATE_URL))
    with open(os.path.join(ds.images_dir, second.name), "rb") as f:
        same = f.read()
    add("duplicate_content", "zoo_dup_" + second.name, same, second.caption, second.label, _skip(Skip.DUPLICATE_HASH),
        (second.width, second.height))  # fmt: skip
    dead = _skip(Skip.UNREACHABLE)
    add("unreachable", "zoo_unreachable.jpg", None, "a picture nobody can fetch", 0, dead, served=False)
    add("not_found", "zoo_missing_file.jpg", None, "a picture that is not on the server", 0, _skip(Skip.HTTP_ERROR))
