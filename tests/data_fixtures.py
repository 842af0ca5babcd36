"""Helpers shared by the data_pipeline tests: a moto S3 server on loopback and expected pixels."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextlib.contextmanager
def moto_s3(bucket: str = "data") -> Iterator[str]:
    """Start a moto S3 server on 127.0.0.1, point AWS_ENDPOINT_URL at it, create `bucket`; yields s3://bucket."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached per kwargs, not per endpoint
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def expected_rgb(source: bytes) -> np.ndarray:
    """What a normalised sample must look like, computed straight from the source file with PIL.

    EXIF orientation applied; 16-bit -> top byte; alpha composited on white; palette/CMYK -> RGB.
    """
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(source)))
    if img.mode.startswith("I;16"):
        return np.repeat((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA"):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float64)
        a = rgba[..., 3:] / 255.0
        return np.rint(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def decoded(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB", img.mode
    return np.asarray(img)


def assert_pixels_match(stored: bytes, source: bytes, lossy: bool) -> None:
    """Exact equality for lossless paths; mean abs error < 3/255 levels when a JPEG was re-encoded."""
    got, want = decoded(stored), expected_rgb(source)
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if lossy:
        assert diff.mean() < 3.0, diff.mean()
    else:
        assert diff.max() <= 1, diff.max()  # alpha compositing may round differently by one level
