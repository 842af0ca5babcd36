"""Why a sample was skipped, or how it was normalised: the names used in stats.json and the CLI summary.

Every input row ends up as exactly one of: kept, or skipped for one `Skip` reason. A kept sample may
additionally carry any number of `Fix` notes (what normalisation it needed).
"""

from __future__ import annotations

import enum
import re


class Skip(str, enum.Enum):
    """Reasons a sample is dropped (stats.json "skipped")."""

    MISSING_URL = "missing_url"  # empty / null URL in the input list
    DUPLICATE_URL = "duplicate_url"  # URL already seen (first occurrence kept)
    UNREACHABLE = "unreachable"  # connection refused / timeout / DNS failure
    HTTP_ERROR = "http_error"  # HTTP 4xx/5xx
    DOWNLOAD_ERROR = "download_error"  # any other download failure reported by img2dataset
    EMPTY_PAYLOAD = "empty_payload"  # zero-byte response
    NOT_AN_IMAGE = "not_an_image"  # bytes that no image decoder recognises (HTML, text, ...)
    TRUNCATED = "truncated"  # image data ends early (JPEG without EOI, PNG without IEND, ...)
    DECODE_ERROR = "decode_error"  # recognised format that fails to decode
    TOO_LARGE = "too_large"  # more pixels than PIL's decompression-bomb limit
    TOO_SMALL = "too_small"  # shorter side < min_side
    ASPECT_RATIO = "aspect_ratio"  # max(h, w) / min(h, w) > max_aspect_ratio
    CAPTION_MISSING = "caption_missing"  # null caption
    CAPTION_EMPTY = "caption_empty"  # caption empty after stripping whitespace
    CAPTION_LENGTH = "caption_length"  # caption shorter than min_caption_chars or longer than max_caption_chars
    DUPLICATE_HASH = "duplicate_hash"  # image bytes identical (sha256) to a sample kept earlier
    BAD_LABEL = "bad_label"  # label column value missing or not an integer
    INGEST_INCOMPLETE = "ingest_incomplete"  # row of an ingest shard that never finished (no *_stats.json)
    FILTERED = "filtered"  # rejected by a --filter expression on its metadata columns (ingest or shard time)


class Fix(str, enum.Enum):
    """Normalisations applied to kept samples (stats.json "normalised")."""

    CAPTION_NON_UTF8 = "caption_non_utf8"  # caption bytes were not UTF-8; decoded as cp1252 / latin-1
    EXIF_ORIENTATION = "exif_orientation"  # pixels rotated/flipped per EXIF, width/height swapped if needed
    CMYK = "cmyk"  # CMYK -> RGB
    ALPHA = "alpha"  # alpha channel composited on white
    HIGH_BIT_DEPTH = "16bit"  # 16-bit samples scaled to 8-bit
    PALETTE = "palette"  # palette image expanded to RGB
    GRAYSCALE = "grayscale"  # L / LA / 1-bit -> RGB
    OTHER_MODE = "other_mode"  # any other PIL mode (YCbCr, LAB, HSV, I, F) -> RGB
    FORMAT = "format"  # container not jpg/png/webp (gif, bmp, tiff, ...) re-encoded


SKIP_VALUES = tuple(r.value for r in Skip)
FIX_VALUES = tuple(r.value for r in Fix)

_UNREACHABLE = re.compile(
    r"connection refused|errno 111|timed out|timeout|name or service not known|nodename nor servname|"
    r"no route to host|network is unreachable|connection reset|remote end closed|getaddrinfo",
    re.IGNORECASE,
)
_HTTP = re.compile(r"http error \d{3}", re.IGNORECASE)
_EMPTY = re.compile(r"!buf\.empty\(\)|empty buffer|size\(\) > 0|buf.empty", re.IGNORECASE)
_DECODE = re.compile(r"image decoding error|unknown image|cannot identify", re.IGNORECASE)


def classify_download_error(message: str | None) -> Skip:
    """Map an img2dataset "failed_to_download" error message to a Skip reason."""
    text = message or ""
    if _HTTP.search(text):
        return Skip.HTTP_ERROR
    if _UNREACHABLE.search(text):
        return Skip.UNREACHABLE
    return Skip.DOWNLOAD_ERROR


def classify_decode_error(message: str | None) -> Skip:
    """Map an img2dataset "failed_to_resize" error message to a Skip reason.

    img2dataset decodes with OpenCV; a zero-byte payload trips an OpenCV assertion on the empty buffer,
    and bytes OpenCV does not recognise give "Image decoding error". Filters img2dataset applies itself
    (min_image_size, max_aspect_ratio) are mapped too, although ingest() leaves them off by default.
    """
    text = message or ""
    if _EMPTY.search(text):
        return Skip.EMPTY_PAYLOAD
    if _DECODE.search(text):
        return Skip.NOT_AN_IMAGE
    if "image too small" in text:
        return Skip.TOO_SMALL
    if "aspect ratio too large" in text:
        return Skip.ASPECT_RATIO
    return Skip.DECODE_ERROR
