"""Read URL lists (parquet / CSV / JSONL, local or S3) into one clean table for img2dataset.

The clean table has columns: url (string), caption (string or null), label (int64, only with a label
column), caption_fix ("" or "caption_non_utf8"), row (position in the input) and any extra columns.
Rows with a missing URL or a repeated URL (first occurrence kept) and, when labels are asked for,
rows whose label is not an integer are dropped here and counted.

Captions are decoded from bytes when the input was not valid UTF-8: UTF-8 first, then cp1252, then
latin-1 (which always succeeds); such rows carry caption_fix="caption_non_utf8".
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pixeldit.storage import fs_and_path

from .reasons import Fix, Skip

InputFormat = Literal["auto", "parquet", "csv", "jsonl"]
INPUT_FORMATS = ("auto", "parquet", "csv", "jsonl")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class PreparedList:
    table: pa.Table
    input_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"cannot tell the format of {path!r} from its extension; pass input_format "
            f"(valid: {', '.join(INPUT_FORMATS[1:])}) or use one of {', '.join(_EXTENSIONS)}"
        )
    return _EXTENSIONS[ext]


def list_inputs(url_list: str, input_format: str) -> list[str]:
    """The input file(s): `url_list` itself, or the sorted matching files of a folder."""
    fs, path = fs_and_path(url_list)
    if not fs.exists(path):
        raise FileNotFoundError(f"URL list {url_list!r} does not exist")
    if not fs.isdir(path):
        return [url_list]
    exts = [e for e, f in _EXTENSIONS.items() if input_format in ("auto", f)]
    found = sorted(p for p in fs.find(path) if any(p.lower().removesuffix(".gz").endswith(e) for e in exts))
    if not found:
        raise ValueError(f"URL list folder {url_list!r} holds no file ending in {', '.join(exts)}")
    proto = url_list.split("://", 1)[0] + "://" if "://" in url_list else ""
    return [proto + p for p in found]


def decode_caption(value: Any) -> tuple[str | None, bool]:
    """(caption text or None, True if it had to be decoded from non-UTF-8 bytes)."""
    if value is None:
        return None, False
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value, False
        except UnicodeEncodeError:  # lone surrogates from a surrogateescape'd byte string
            value = value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError:
            try:
                return raw.decode("cp1252"), True
            except UnicodeDecodeError:
                return raw.decode("latin-1"), True
    return str(value), False


def parse_label(value: Any) -> int | None:
    """An integer class id, or None when the value is missing or not an integer."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, (bytes, str)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        return int(text) if text.lstrip("-").isdigit() else None
    return None


def _read_one(path: str, fmt: str, columns: list[str]) -> dict[str, list[Any]]:
    fs, p = fs_and_path(path)
    compression = "gzip" if p.endswith(".gz") else None
    with fs.open(p, "rb", compression=compression) as f:
        if fmt == "parquet":
            present = pq.read_schema(f).names
            table = pq.read_table(f, columns=[c for c in columns if c in present])
        elif fmt == "csv":
            delimiter = "\t" if p.removesuffix(".gz").endswith(".tsv") else ","
            table = pacsv.read_csv(
                f,
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(check_utf8=False, strings_can_be_null=False),
            )
            # strings were not UTF-8 checked: hand them over as bytes, decode per value below
            cols = zip(table.column_names, table.columns)
            table = pa.table({n: (c.cast(pa.binary()) if pa.types.is_string(c.type) else c) for n, c in cols})
        else:
            rows = [json.loads(line.decode("utf-8", "surrogateescape")) for line in f if line.strip()]
            keys = {k for r in rows for k in r}
            table = None
            data = {k: [r.get(k) for r in rows] for k in keys}
    if table is not None:
        data = {n: table.column(n).to_pylist() for n in table.column_names}
    missing = [c for c in columns if c not in data]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found; columns present: {sorted(data)}")
    return {c: data[c] for c in columns}


def prepare_url_list(
    url_list: str,
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    label_col: str | None = None,
    extra_cols: tuple[str, ...] = (),
    input_format: InputFormat = "auto",
) -> PreparedList:
    """Read every input file, decode captions, drop missing / duplicate URLs (and bad labels)."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input_format {input_format!r}; valid: {', '.join(INPUT_FORMATS)}")
    files = list_inputs(url_list, input_format)
    wanted = [url_col, caption_col] + ([label_col] if label_col else []) + list(extra_cols)
    skipped: collections.Counter[str] = collections.Counter()
    names = ["url", "caption", "caption_fix", "row", *(["label"] if label_col else []), *extra_cols]
    out: dict[str, list[Any]] = {k: [] for k in names}
    seen: set[str] = set()
    row = 0
    for path in files:
        cols = _read_one(path, detect_format(path) if input_format == "auto" else input_format, wanted)
        for i in range(len(cols[url_col])):
            row += 1
            url, _ = decode_caption(cols[url_col][i])
            url = (url or "").strip()
            if not url:
                skipped[Skip.MISSING_URL.value] += 1
                continue
            if url in seen:
                skipped[Skip.DUPLICATE_URL.value] += 1
                continue
            label = None
            if label_col:
                label = parse_label(cols[label_col][i])
                if label is None:
                    skipped[Skip.BAD_LABEL.value] += 1
                    continue
            seen.add(url)
            caption, fixed = decode_caption(cols[caption_col][i])
            out["url"].append(url)
            out["caption"].append(caption)
            out["caption_fix"].append(Fix.CAPTION_NON_UTF8.value if fixed else "")
            out["row"].append(row - 1)
            if label_col:
                out["label"].append(label)
            for c in extra_cols:
                v = cols[c][i]
                out[c].append(decode_caption(v)[0] if isinstance(v, (bytes, str)) else (None if v is None else str(v)))
    schema = {"row": pa.int64(), "label": pa.int64()}  # everything else: string
    table = pa.table({k: pa.array(v, schema.get(k, pa.string())) for k, v in out.items()})
    return PreparedList(table=table, input_rows=row, skipped=dict(skipped), files=files)
