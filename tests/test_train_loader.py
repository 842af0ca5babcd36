"""Training loader: rank-aligned bucket plan, exact mid-epoch resume, decode/crop, local and S3 reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.buckets import bucket_table
from data_pipeline.dataset_format import MANIFEST, read_sample_index
from pixeldit.train.bucket_sampler import EpochPlan
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.loader import build_loader, decode_and_crop
from train_helpers import write_tiny_dataset


def _plan(world_size, rank, epoch=0, micro_batch=2, seed=0):
    rng = np.random.default_rng(5)
    n = 61
    shard_of = np.repeat(np.arange(16), 4)[:n]
    pos = np.tile(np.arange(4), 16)[:n]
    buckets = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    groups = {b: np.flatnonzero(buckets == b) for b in ("a", "b", "c")}
    sizes = {"a": (16, 32), "b": (32, 32), "c": (32, 16)}
    return EpochPlan(groups, shard_of, pos, sizes, seed=seed, salt=1, epoch=epoch, world_size=world_size,
                     rank=rank, micro_batch=micro_batch), groups


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_plan_is_rank_aligned_disjoint_and_deterministic(world_size):
    plans = [_plan(world_size, r)[0] for r in range(world_size)]
    groups = _plan(world_size, 0)[1]
    lengths = {len(p) for p in plans}
    assert len(lengths) == 1 and lengths.pop() > 0  # every rank: same number of micro-batches
    for i in range(len(plans[0])):
        specs = [p[i] for p in plans]
        assert len({(s.bucket, s.height, s.width) for s in specs}) == 1  # same bucket on every rank
        assert all(len(s.rows) == 2 for s in specs)
        assert all(set(s.rows) <= set(groups[s.bucket].tolist()) for s in specs)
    seen = [r for p in plans for i in range(len(p)) for r in p[i].rows]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    for b, rows in groups.items():  # at most world * micro_batch - 1 samples per bucket dropped
        used = sum(1 for p in plans for i in range(len(p)) if p[i].bucket == b) * 2
        assert len(rows) - used < world_size * 2
    again = _plan(world_size, 0)[0]
    assert [again[i] for i in range(len(again))] == [plans[0][i] for i in range(len(plans[0]))]
    other = _plan(world_size, 0, epoch=1)[0]
    assert [other[i].rows for i in range(len(other))] != [plans[0][i].rows for i in range(len(plans[0]))]


def test_rank_gets_contiguous_shards():
    """Shards are split across ranks: with 2 ranks, at most one shard per bucket is shared."""
    plans = [_plan(2, r, micro_batch=1)[0] for r in range(2)]
    shard_of = np.repeat(np.arange(16), 4)
    per_rank = []
    for p in plans:
        per_rank.append({(p[i].bucket, int(shard_of[p[i].rows[0]])) for i in range(len(p))})
    assert len(per_rank[0] & per_rank[1]) <= 3  # one boundary shard per bucket at most


def test_decode_and_crop_covers_then_center_crops():
    from PIL import Image
    import io
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255  # white centre band
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    x = decode_and_crop(buf.getvalue(), 16, 16)  # (3, 16, 16): scale 0.8 -> 32x16, crop the middle 16
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[:, :, 4:12].mean() > 0.9  # the centre band survives the center crop
    y = decode_and_crop(buf.getvalue(), 32, 64)  # upscale to cover
    assert y.shape == (3, 32, 64)


def _cfg(root, buckets="aspect", micro_batch=2, workers=0):
    stage = StageConfig(name="s", steps=10, data_path=str(root), resolution=32, buckets=buckets, bucket_align=16,
                        micro_batch=micro_batch)
    cfg = RunConfig(stages=[stage])
    cfg.data.num_workers = workers
    return cfg


def test_loader_reads_shards_and_resumes_exactly_mid_epoch(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 9, "0.50": 6, "2.00": 5}, per_shard=4)
    index = read_sample_index(str(root))
    assert len(index) == 20 and len(index.shards) == 3 + 2 + 2
    loader = build_loader(_cfg(root), 0, rank=0, world_size=2, num_classes=10)
    per_epoch = len(loader)  # per rank: 9 -> 2, 6 -> 1, 5 -> 1 micro-batches of 2
    assert per_epoch == 2 + 1 + 1
    batches = [loader.next() for _ in range(per_epoch + 3)]  # rolls into epoch 1
    assert loader.state_dict() == {"epoch": 1, "position": 3}
    b = batches[0]
    h, w = bucket_table(32, 16)[b["bucket"]]
    assert b["x0"].shape == (2, 3, h, w) and b["label"].dtype == torch.int64
    assert all(c.startswith("sample ") and b["bucket"] in c for c in b["caption"])
    assert all(s.startswith(f"shards/{b['bucket']}/") for s in b["shard"])

    resumed = build_loader(_cfg(root), 0, rank=0, world_size=2, num_classes=10)
    resumed.load_state_dict({"epoch": 0, "position": 2})
    for expected in batches[2:]:
        got = resumed.next()
        assert got["key"] == expected["key"] and torch.equal(got["x0"], expected["x0"])


def test_fixed_stage_crops_everything_square_with_workers(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4, "0.50": 4, "2.00": 4}, per_shard=4)
    loader = build_loader(_cfg(root, buckets="fixed", micro_batch=3, workers=2), 0, rank=1, world_size=2)
    assert len(loader) == 2
    shapes = {tuple(loader.next()["x0"].shape) for _ in range(2)}
    assert shapes == {(3, 3, 32, 32)}
    loader.close()


def test_class_labels_are_checked(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4}, num_classes=10)
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        build_loader(_cfg(root), 0, rank=0, world_size=1, num_classes=3)


def test_incomplete_dataset_is_reported(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4})
    (root / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        read_sample_index(str(root))


def test_s3_reads_match_local_with_workers(tmp_path, monkeypatch):
    """Same batches from a moto S3 server (s3fs created inside each of 2 workers) as from the local copy."""
    from moto.server import ThreadedMotoServer
    import s3fs

    from train_helpers import free_port

    root = write_tiny_dataset(tmp_path / "data", {"1.00": 8, "2.00": 4}, per_shard=4)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bkt")
        fs.put(str(root) + "/", "bkt/data/", recursive=True)
        cfg_s3 = _cfg("s3://bkt/data", workers=2)
        cfg_s3.data.storage_options = options
        remote = build_loader(cfg_s3, 0, rank=0, world_size=1)
        local = build_loader(_cfg(root), 0, rank=0, world_size=1)
        assert len(remote) == len(local) == 6
        for _ in range(len(local)):
            a, b = remote.next(), local.next()
            assert a["key"] == b["key"] and torch.equal(a["x0"], b["x0"])
        remote.close()
    finally:
        server.stop()
