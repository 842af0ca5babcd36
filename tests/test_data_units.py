"""Unit tests of data_pipeline's pure parts: verify/normalise, tar writer, URL-list reading, crash cleanup."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_fixtures import assert_pixels_match
from data_pipeline.inputs import decode_caption, parse_label, prepare_url_list
from data_pipeline.dataset_format import ShardRow, rows_to_table, shard_name
from data_pipeline.normalize import Limits, Verified, orientation_from_exif_json, verify_and_normalise
from data_pipeline.reasons import Fix, Skip, classify_decode_error, classify_download_error
from data_pipeline.shard_sink import cleanup_orphans
from data_pipeline.synthetic import ZOO_CASES, make_synthetic_dataset
from data_pipeline.tarshard import ShardWriter
from pixeldit import storage

# zoo cases decided by the payload alone (the rest depend on captions, URLs or the network)
PAYLOAD_CASES = ("truncated_jpeg", "zero_byte", "html_as_image", "cmyk_jpeg", "rgba_png", "png16_rgb", "png16_gray",
                 "palette_png", "exif_rotated", "extreme_ratio", "tiny")  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    ds = make_synthetic_dataset(str(tmp_path_factory.mktemp("zoo")), num_images=8, seed=3, bad_inputs=True)
    return ds, {it.kind: it for it in ds.items if it.kind != "good"}


def _payload(ds, item) -> bytes:
    with open(os.path.join(ds.images_dir, item.name), "rb") as f:
        return f.read()


def test_zoo_has_every_case_and_is_deterministic(zoo, tmp_path):
    ds, by_kind = zoo
    assert set(by_kind) == set(ZOO_CASES)
    again = make_synthetic_dataset(str(tmp_path), num_images=8, seed=3, bad_inputs=True)
    assert [(i.name, i.caption, i.label) for i in again.items] == [(i.name, i.caption, i.label) for i in ds.items]
    for it in again.items:
        if it.served and os.path.exists(os.path.join(again.images_dir, it.name)):
            assert _payload(again, it) == _payload(ds, it)


@pytest.mark.parametrize("kind", PAYLOAD_CASES)
def test_verify_and_normalise_each_zoo_payload(zoo, kind):
    ds, by_kind = zoo
    item = by_kind[kind]
    payload = _payload(ds, item)
    res = verify_and_normalise(payload, Limits(min_side=16, max_aspect_ratio=4.0))
    outcome, _, detail = item.expect.partition(":")
    if outcome == "skip":
        assert res == Skip(detail)
        return
    assert isinstance(res, Verified)
    assert (res.width, res.height) == (item.width, item.height)
    assert Fix(detail).value in res.fixes
    assert res.data is not None  # every normalisation re-encodes
    assert res.ext == ("jpg" if item.name.endswith(".jpg") else "png")
    assert_pixels_match(res.data, payload, lossy=res.ext == "jpg")


def test_good_images_pass_through_untouched_and_decode_level_agrees(zoo):
    ds, _ = zoo
    for it in (i for i in ds.items if i.kind == "good"):
        payload = _payload(ds, it)
        for level in ("structure", "decode"):
            res = verify_and_normalise(payload, Limits(verify=level))
            assert res == Verified(None, it.name.rsplit(".", 1)[1], it.width, it.height), (it.name, level)


def test_orientation_hint_applies_only_without_exif_in_the_bytes(zoo):
    ds, by_kind = zoo
    plain = Image.new("RGB", (40, 20), (10, 200, 30))
    buf = io.BytesIO()
    plain.save(buf, "PNG")
    res = verify_and_normalise(buf.getvalue(), orientation_hint=6)  # bytes re-encoded by img2dataset: no EXIF
    assert (res.width, res.height) == (20, 40) and Fix.EXIF_ORIENTATION.value in res.fixes
    rotated = _payload(ds, by_kind["exif_rotated"])
    assert verify_and_normalise(rotated, orientation_hint=3).height == by_kind["exif_rotated"].height
    assert orientation_from_exif_json('{"Image Orientation": "Rotated 90 CW"}') == 6
    assert orientation_from_exif_json(None) == orientation_from_exif_json("not json") == 1


def test_truncated_png_and_garbage_are_classified():
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    png = buf.getvalue()
    assert verify_and_normalise(png[:-12]) == Skip.TRUNCATED  # IEND chunk missing
    assert verify_and_normalise(png[:60]) == Skip.TRUNCATED  # header fine, data cut short
    assert verify_and_normalise(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) == Skip.NOT_AN_IMAGE  # no valid header
    assert verify_and_normalise(b"GIF89a not really") in (Skip.NOT_AN_IMAGE, Skip.TRUNCATED, Skip.DECODE_ERROR)
    gif = io.BytesIO()
    img.convert("P").save(gif, "GIF")
    res = verify_and_normalise(gif.getvalue())
    assert isinstance(res, Verified) and res.ext == "png" and Fix.FORMAT.value in res.fixes


@pytest.mark.parametrize(
    "message,reason",
    [("<urlopen error [Errno 111] Connection refused>", Skip.UNREACHABLE),
     ("HTTP Error 404: Not Found", Skip.HTTP_ERROR),
     ("The read operation timed out", Skip.UNREACHABLE), ("weird", Skip.DOWNLOAD_ERROR)],
)  # fmt: skip
def test_classify_download_error(message, reason):
    assert classify_download_error(message) == reason


def test_classify_decode_error():
    assert classify_decode_error("Image decoding error") == Skip.NOT_AN_IMAGE
    assert classify_decode_error("OpenCV(4.14.0) error: (-215:Assertion failed) !buf.empty()") == Skip.EMPTY_PAYLOAD
    assert classify_decode_error("image too small") == Skip.TOO_SMALL


def test_shard_writer_offsets_allow_ranged_reads_and_output_is_deterministic(tmp_path):
    images = [os.urandom(n) for n in (1, 511, 512, 513, 5000)]
    outs = []
    for run in range(2):
        url = str(tmp_path / f"run{run}" / "shard.tar")
        os.makedirs(os.path.dirname(url))
        w = ShardWriter(url, str(tmp_path))
        spans = [
            w.add(f"k{i:04d}", img, "png", f"caption {i} é", {"i": i}, label=i if i % 2 else None)
            for i, img in enumerate(images)
        ]
        assert not os.path.exists(url) and os.path.exists(w.staged) and storage.is_tmp(w.staged)  # invisible until commit
        size = w.commit()
        assert os.path.getsize(url) == size and not os.path.exists(w.staged)
        data = open(url, "rb").read()
        assert [data[s.offset : s.offset + s.size] for s in spans] == images
        outs.append(data)
    assert outs[0] == outs[1]
    with tarfile.open(url) as tf:
        names = tf.getnames()
        assert names[:4] == ["k0000.png", "k0000.txt", "k0000.json"] + ["k0001.png"]
        assert tf.extractfile("k0001.cls").read() == b"1" and "k0000.cls" not in names
        assert tf.extractfile("k0000.txt").read().decode() == "caption 0 é"
        assert json.loads(tf.extractfile("k0003.json").read()) == {"i": 3}
    with pytest.raises(ValueError, match="must not contain"):
        ShardWriter(str(tmp_path / "x.tar"), str(tmp_path)).add("a.b", b"x", "png", "", {}, None)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_prepare_url_list_decodes_dedupes_and_counts(zoo, tmp_path, fmt):
    ds, by_kind = zoo
    path = ds.write_url_list("http://127.0.0.1:9", str(tmp_path / f"urls.{fmt}"), fmt=fmt)
    prep = prepare_url_list(path, label_col="label")
    assert prep.input_rows == len(ds.items)
    assert prep.skipped == {Skip.DUPLICATE_URL.value: 1}
    rows = prep.table.to_pylist()
    assert len({r["url"] for r in rows}) == len(rows) == len(ds.items) - 1
    fixed = [r for r in rows if r["caption_fix"]]
    assert [r["caption"] for r in fixed] == [by_kind["non_utf8_caption"].caption.decode("cp1252")]
    assert all(isinstance(r["label"], int) for r in rows)
    missing = rows[[i.kind for i in ds.items].index("missing_caption")]
    assert missing["caption"] == ("" if fmt == "csv" else None)  # CSV cannot tell missing from empty


def test_prepare_url_list_errors_and_labels(tmp_path):
    import pyarrow as pa

    path = str(tmp_path / "l.parquet")
    pq.write_table(pa.table({"u": ["a", "b", "", "c"], "t": ["x", "y", "z", "w"], "cls": ["1", "x", "2", "3"]}), path)
    prep = prepare_url_list(path, url_col="u", caption_col="t", label_col="cls")
    assert prep.table.column("label").to_pylist() == [1, 3]
    assert prep.skipped == {Skip.BAD_LABEL.value: 1, Skip.MISSING_URL.value: 1}
    with pytest.raises(ValueError, match=r"column\(s\) \['nope', 'caption'\] not found"):
        prepare_url_list(path, url_col="nope")
    (tmp_path / "l.xyz").write_text("url\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        prepare_url_list(str(tmp_path / "l.xyz"))
    assert decode_caption(b"caf\xe9") == ("café", True) and decode_caption("ok") == ("ok", False)
    assert decode_caption(b"\x81\x8d") == ("\x81\x8d", True)  # not cp1252 either: latin-1
    assert parse_label(" 7 ") == 7 and parse_label(2.5) is None and parse_label(True) is None


def test_cleanup_orphans_removes_uncommitted_shards_and_staging_files(tmp_path):
    root = str(tmp_path)
    committed, orphan = shard_name("1.00", 0), shard_name("1.00", 1)
    staging, foreign_tmp = storage.tmp_path(shard_name("2.00", 0)), storage.tmp_path("shards/README.txt")
    for rel in (committed, orphan, staging, "shards/README.txt", foreign_tmp):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        open(os.path.join(root, rel), "wb").close()
    row = ShardRow(shard=committed, ratio_key="1.00", bucket_height=1, bucket_width=1, num_samples=1, bytes=1,
                   min_width=1, max_width=1, min_height=1, max_height=1)  # fmt: skip
    removed = cleanup_orphans(root, rows_to_table([row], ShardRow))
    assert sorted(removed) == sorted([orphan, staging])
    for kept in (committed, "shards/README.txt", foreign_tmp):  # only names the pipeline writes are touched
        assert os.path.exists(os.path.join(root, kept))


def test_prepare_url_list_reads_a_folder_of_mixed_files_in_name_order(tmp_path):
    import gzip

    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "a.csv").write_text("url,caption\nhttp://h/1.jpg,one\nhttp://h/2.jpg,two\n")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"url": "http://h/3.jpg", "caption": "three"}) + "\n")
        f.write(json.dumps({"url": "http://h/1.jpg", "caption": "again"}) + "\n")
    (folder / "notes.txt").write_text("ignored")
    prep = prepare_url_list(str(folder))
    assert [os.path.basename(f) for f in prep.files] == ["a.csv", "b.jsonl.gz"]
    assert prep.table.column("caption").to_pylist() == ["one", "two", "three"]
    assert prep.table.column("row").to_pylist() == [0, 1, 2] and prep.skipped == {"duplicate_url": 1}


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
def test_png_exif_orientation_is_found_without_decoding_and_applied(orientation):
    img = Image.fromarray(np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    res = verify_and_normalise(buf.getvalue())
    assert (res.width, res.height) == ((30, 50) if orientation >= 5 else (50, 30))
    assert res.fixes == (Fix.EXIF_ORIENTATION.value,) and res.ext == "png"
    assert_pixels_match(res.data, buf.getvalue(), lossy=False)
