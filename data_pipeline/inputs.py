"""Read URL lists (parquet / CSV / JSONL, local or S3) into one clean table for img2dataset.

The clean table has columns: url (string), caption (string or null), label (int64, only with a label
column), caption_fix ("" or "caption_non_utf8"), row (position in the input), then the metadata columns
(``meta_cols``, typed: see ``meta_array``). Rows with a missing URL, rows an ingest filter rejects, rows with a
repeated URL (first occurrence kept) and, when labels are asked for, rows whose label is not an integer are
dropped here and counted.

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

from .filters import RowFilter
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


def _read_one(path: str, fmt: str, columns: list[str]) -> dict[str, pa.Array]:
    """The requested ``columns`` of one input file as Arrow arrays (CSV strings as bytes, decoded later)."""
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
            table = pa.table({k: _json_array([r.get(k) for r in rows], f"{path}: column {k!r}") for k in keys})
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found; columns present: {sorted(table.column_names)}")
    return {c: table.column(c).combine_chunks() for c in columns}


def _json_array(values: list[Any], where: str) -> pa.Array:
    """JSON values as one Arrow array; text with undecodable bytes as bytes (decoded like captions later)."""
    if any(isinstance(v, str) for v in values):
        fixed = []
        for v in values:
            try:
                fixed.append(v.encode("utf-8") if isinstance(v, str) else v)
            except UnicodeEncodeError:  # lone surrogates from surrogateescape: the original bytes
                fixed.append(v.encode("utf-8", "surrogateescape"))
        if all(v is None or isinstance(v, bytes) for v in fixed):
            return pa.array(fixed, pa.binary())
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds (numbers and text): keep them as text
        return pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v for v in values])


def meta_array(values: pa.Array, where: str) -> pa.Array:
    """An input column as a metadata column (dataset_format.META_TYPES): integers -> int64, other numbers ->
    float64, booleans, text (bytes decoded like captions), anything else (lists, structs, dates) as JSON text."""
    t = values.type
    if pa.types.is_dictionary(t):
        return meta_array(values.dictionary_decode(), where)
    if pa.types.is_null(t):
        return pa.nulls(len(values), pa.string())
    if pa.types.is_integer(t):
        try:
            return values.cast(pa.int64())
        except pa.ArrowInvalid:  # uint64 beyond int64
            return values.cast(pa.float64())
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return values.cast(pa.float64())
    if pa.types.is_boolean(t):
        return values
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return values.cast(pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pa.array([decode_caption(v)[0] for v in values.to_pylist()], pa.string())
    return pa.array([None if v is None else json.dumps(v, default=str, sort_keys=True)
                     for v in values.to_pylist()], pa.string())


def _concat_meta(name: str, chunks: list[pa.Array]) -> pa.Array:
    """One metadata column over all input files: int64 next to float64 becomes float64; other clashes fail."""
    types = {c.type for c in chunks if len(c) and c.null_count < len(c)}
    if types == {pa.int64(), pa.float64()}:
        chunks = [c.cast(pa.float64()) for c in chunks]
        types = {pa.float64()}
    if len(types) > 1:
        raise ValueError(f"metadata column {name!r} has different types in different input files "
                         f"({', '.join(sorted(map(str, types)))}); give it one type")
    target = types.pop() if types else pa.string()
    return pa.concat_arrays([c.cast(target) for c in chunks]) if chunks else pa.array([], target)


def prepare_url_list(
    url_list: str,
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    label_col: str | None = None,
    meta_cols: tuple[tuple[str, str], ...] = (),
    row_filter: RowFilter | None = None,
    input_format: InputFormat = "auto",
) -> PreparedList:
    """Read every input file, decode captions, drop missing / duplicate URLs (and bad labels, and rows
    ``row_filter`` rejects: it reads the metadata columns, named as in the output).

    ``meta_cols``: (input column, output name) pairs, carried with their types (``meta_array``).
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input_format {input_format!r}; valid: {', '.join(INPUT_FORMATS)}")
    files = list_inputs(url_list, input_format)
    sources = [src for src, _ in meta_cols]
    wanted = list(dict.fromkeys([url_col, caption_col] + ([label_col] if label_col else []) + sources))
    skipped: collections.Counter[str] = collections.Counter()
    names = ["url", "caption", "caption_fix", "row", *(["label"] if label_col else [])]
    out: dict[str, list[Any]] = {k: [] for k in names}
    meta_chunks: dict[str, list[pa.Array]] = {name: [] for _, name in meta_cols}
    seen: set[str] = set()
    row = 0
    for path in files:
        cols = _read_one(path, detect_format(path) if input_format == "auto" else input_format, wanted)
        meta = {name: meta_array(cols[src], f"{path}: column {src!r}") for src, name in meta_cols}
        selected = None
        if row_filter is not None:
            table = pa.table(meta) if meta else pa.table({"_": pa.nulls(len(cols[url_col]))})
            row_filter.check(table.schema, f"the metadata columns of {path} (--meta-cols)")
            selected = row_filter.mask(table)
        urls, captions = cols[url_col].to_pylist(), cols[caption_col].to_pylist()
        labels = cols[label_col].to_pylist() if label_col else None
        kept: list[int] = []
        for i in range(len(urls)):
            row += 1
            url, _ = decode_caption(urls[i])
            url = (url or "").strip()
            if not url:
                skipped[Skip.MISSING_URL.value] += 1
                continue
            if selected is not None and not selected[i]:
                skipped[Skip.FILTERED.value] += 1
                continue
            if url in seen:
                skipped[Skip.DUPLICATE_URL.value] += 1
                continue
            label = None
            if labels is not None:
                label = parse_label(labels[i])
                if label is None:
                    skipped[Skip.BAD_LABEL.value] += 1
                    continue
            seen.add(url)
            caption, fixed = decode_caption(captions[i])
            out["url"].append(url)
            out["caption"].append(caption)
            out["caption_fix"].append(Fix.CAPTION_NON_UTF8.value if fixed else "")
            out["row"].append(row - 1)
            if label_col:
                out["label"].append(label)
            kept.append(i)
        for name, values in meta.items():
            meta_chunks[name].append(values.take(pa.array(kept, pa.int64())))
    schema = {"row": pa.int64(), "label": pa.int64()}  # everything else: string
    table = pa.table({k: pa.array(v, schema.get(k, pa.string())) for k, v in out.items()})
    for name, chunks in meta_chunks.items():
        table = table.append_column(name, _concat_meta(name, chunks))
    return PreparedList(table=table, input_rows=row, skipped=dict(skipped), files=files)
