"""What flows through the shard stages (shard.py) into the sink (shard_sink.py): one input row, one sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .normalize import Verified


@dataclass
class Row:
    """One img2dataset metadata row (one input URL)."""

    source: str  # ingest root + shard name
    key: str  # img2dataset key inside the ingest folder
    sample_key: str  # key in the output: "{ingest folder number:03d}-{key}", unique across the root
    url: str
    caption: str | None
    status: str
    error: str | None
    width: int | None  # stored size recorded by img2dataset (None with resize="off")
    height: int | None
    exif_orientation: int
    sha256: str | None
    label: int | None
    caption_fix: str
    meta: dict[str, Any]  # metadata columns (ingest --meta-cols) by name
    original_size: tuple[int | None, int | None] = (None, None)
    passes_filter: bool = True  # the shard --filter expression holds for its metadata
    payload: bytes = b""
    ext: str = ""


@dataclass
class Sample:
    """A verified (and possibly normalised) row, with the ratio key of its bucket once assigned."""

    row: Row
    image: Verified
    ratio_key: str = ""
