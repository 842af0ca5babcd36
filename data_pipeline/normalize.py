"""Verify one image payload cheaply and normalise it to 8-bit RGB jpg / png / webp.

What is read, honestly:
  * always: the header (PIL `Image.open`: format, mode, size, EXIF) plus a structural check of the
    end of the file: JPEG must have an EOI marker after its last scan, PNG chunks are walked and
    CRC-checked up to IEND (no inflate), WebP's RIFF length must fit the payload. No pixel decode.
  * verify="decode": additionally decodes all pixels (catches damaged entropy-coded data; slower).
  * pixels are decoded and re-encoded only when normalisation changes them: EXIF orientation != 1,
    mode not 8-bit RGB (CMYK, alpha, palette, 16-bit, grayscale, ...), or a container other than
    jpg/png/webp. JPEG sources are re-encoded as JPEG (quality `jpeg_quality`), WebP as WebP, the rest
    as PNG. Otherwise the original bytes are kept unchanged.
Bucket assignment never needs a decode: width/height come from the img2dataset parquet or this header.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from .reasons import Fix, Skip

VerifyLevel = Literal["structure", "decode"]
VERIFY_LEVELS = ("structure", "decode")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SWAPS = {5, 6, 7, 8}  # EXIF orientations that exchange width and height
# exifread's printable "Image Orientation" values (img2dataset's exif column) -> EXIF orientation
EXIFREAD_ORIENTATION = {
    "Horizontal (normal)": 1, "Mirrored horizontal": 2, "Rotated 180": 3, "Mirrored vertical": 4,
    "Mirrored horizontal then rotated 90 CCW": 5, "Rotated 90 CW": 6,
    "Mirrored horizontal then rotated 90 CW": 7, "Rotated 90 CCW": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Verified:
    """A kept image: `data` is None when the original bytes are kept unchanged."""

    data: bytes | None
    ext: str  # "jpg" | "png" | "webp"
    width: int  # displayed size (after EXIF orientation)
    height: int
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    min_side: int = 0
    max_aspect_ratio: float = 0.0  # 0 = no limit
    verify: VerifyLevel = "structure"
    jpeg_quality: int = 95


def orientation_from_exif_json(exif_json: str | None) -> int:
    """EXIF orientation (1..8) from img2dataset's exif column (JSON of exifread tags); 1 if absent."""
    if not exif_json:
        return 1
    import json

    try:
        tags = json.loads(exif_json)
    except ValueError:
        return 1
    return EXIFREAD_ORIENTATION.get(str(tags.get("Image Orientation", "")).strip(), 1)


def _png_chunks(payload: bytes) -> tuple[bool, bytes | None]:
    """Walk PNG chunk headers (no inflate): (IEND reached within the payload, eXIf chunk data or None)."""
    pos, n, exif = 8, len(payload), None
    while pos + 12 <= n:
        (length,) = struct.unpack(">I", payload[pos : pos + 4])
        tag, end = payload[pos + 4 : pos + 8], pos + 12 + length
        if end > n:
            return False, exif
        if tag == b"eXIf":
            exif = payload[pos + 8 : pos + 8 + length]
        elif tag == b"IEND":
            return True, exif
        pos = end
    return False, exif


def _structure_ok(payload: bytes, fmt: str) -> bool:
    if fmt == "JPEG":
        return payload.rfind(b"\xff\xd9") > payload.rfind(b"\xff\xda") >= 0
    if fmt == "PNG":
        return _png_chunks(payload)[0]
    if fmt == "WEBP":
        return len(payload) >= 12 and struct.unpack("<I", payload[4:8])[0] + 8 <= len(payload)
    return True


def _orientation(img: Image.Image, payload: bytes) -> int:
    """EXIF orientation stored in the image (0 if none), without decoding pixels.

    Pillow's PNG getexif() decodes the whole image to reach an eXIf chunk after IDAT, so for PNG the
    chunk is located by walking chunk headers instead.
    """
    if img.format == "PNG":
        raw = _png_chunks(payload)[1]
        if raw is None:
            return 0
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 0) or 0)
    return int(img.getexif().get(0x0112, 0) or 0)


def _png_bit_depth(payload: bytes) -> int:
    return payload[24] if payload[:8] == b"\x89PNG\r\n\x1a\n" and len(payload) > 24 else 8


def _to_rgb(img: Image.Image, fixes: list[str], sixteen_bit: bool) -> Image.Image:
    """8-bit RGB version of `img`, noting which normalisations were needed."""
    mode = img.mode
    if mode == "RGB":
        if sixteen_bit:
            fixes.append(Fix.HIGH_BIT_DEPTH.value)  # Pillow already kept the high byte of each sample
        return img
    if mode == "P":
        fixes.append(Fix.PALETTE.value)
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return img
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or (mode == "I" and sixteen_bit):
        fixes.append(Fix.HIGH_BIT_DEPTH.value)
        arr = np.asarray(img).astype(np.uint32) >> 8  # (H, W) 16-bit -> 8-bit, top byte
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        fixes.append(Fix.OTHER_MODE.value)
        arr = np.clip(np.asarray(img, dtype=np.float64), 0, 255)  # (H, W)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        fixes.append(Fix.ALPHA.value)
        if mode in ("LA", "La"):
            fixes.append(Fix.GRAYSCALE.value)
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK":
        fixes.append(Fix.CMYK.value)
        return img.convert("RGB")
    if mode in ("L", "1"):
        fixes.append(Fix.GRAYSCALE.value)
        return img.convert("RGB")
    fixes.append(Fix.OTHER_MODE.value)
    return img.convert("RGB")


def verify_and_normalise(payload: bytes, limits: Limits = Limits(), orientation_hint: int = 1) -> Verified | Skip:
    """Check one payload and return a Verified image, or the Skip reason.

    `orientation_hint` is the EXIF orientation recorded at download time; it is used only when the
    stored bytes carry no EXIF orientation themselves (img2dataset dropped EXIF when it re-encoded).
    """
    if not payload:
        return Skip.EMPTY_PAYLOAD
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(payload))
            fmt = img.format or ""
            width, height = img.size
            orientation = _orientation(img, payload) or orientation_hint
    except UnidentifiedImageError:
        return Skip.NOT_AN_IMAGE
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return Skip.TOO_LARGE
    except (OSError, SyntaxError, ValueError, struct.error, IndexError):
        return Skip.TRUNCATED if len(payload) < 64 else Skip.DECODE_ERROR
    if not _structure_ok(payload, fmt):
        return Skip.TRUNCATED
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in _SWAPS:
        width, height = height, width
    if width < 1 or height < 1 or min(width, height) < limits.min_side:
        return Skip.TOO_SMALL
    if limits.max_aspect_ratio and max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return Skip.ASPECT_RATIO
    sixteen_bit = fmt == "PNG" and _png_bit_depth(payload) == 16
    needs_pixels = orientation != 1 or img.mode != "RGB" or sixteen_bit or fmt not in _EXT
    if not needs_pixels and limits.verify == "structure":
        return Verified(None, _EXT[fmt], width, height)
    try:
        img.load()
    except OSError as err:
        return Skip.TRUNCATED if "truncated" in str(err).lower() else Skip.DECODE_ERROR
    except (SyntaxError, ValueError, struct.error, IndexError):
        return Skip.DECODE_ERROR
    if not needs_pixels:
        return Verified(None, _EXT[fmt], width, height)
    fixes: list[str] = []
    if orientation != 1:
        img = _transpose(img, orientation)
        fixes.append(Fix.EXIF_ORIENTATION.value)
    rgb = _to_rgb(img, fixes, sixteen_bit)
    if fmt not in _EXT:
        fixes.append(Fix.FORMAT.value)
    ext = _EXT.get(fmt, "png")
    buf = io.BytesIO()
    if ext == "jpg":
        rgb.save(buf, format="JPEG", quality=limits.jpeg_quality)
    elif ext == "webp":
        rgb.save(buf, format="WEBP", quality=limits.jpeg_quality)
    else:
        rgb.save(buf, format="PNG")
    return Verified(buf.getvalue(), ext, rgb.width, rgb.height, tuple(dict.fromkeys(fixes)))


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation that is not stored in the image itself (from the exif hint)."""
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }[orientation]  # fmt: skip
    return img.transpose(method)


def verify_batch(batch: list[tuple[bytes, int]], limits: Limits) -> list[Verified | Skip]:
    """verify_and_normalise over (payload, orientation_hint) pairs; the unit of work of a process pool.

    Image decoders fed hostile bytes can raise almost anything; one bad payload must not stop the run,
    so any exception left over is counted as decode_error for that sample.
    """
    out: list[Verified | Skip] = []
    for payload, hint in batch:
        try:
            out.append(verify_and_normalise(payload, limits, hint))
        except Exception:  # noqa: BLE001 - see docstring: counted per sample, never silently dropped
            out.append(Skip.DECODE_ERROR)
    return out
