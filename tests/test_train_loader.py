"""Training loader: the world-size independent plan, exact resume on any world size, small buckets, mixing,
damaged shards found before step 1, bad samples, decode/crop, local and S3 reads through the node cache."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.buckets import bucket_table
from data_pipeline.dataset_format import MANIFEST, read_sample_index
from pixeldit.errors import DataError
from pixeldit.train.bucket_sampler import PlanTable, StagePlan, merge_small_buckets, mix_counts
from pixeldit.train.config import DataSource, RunConfig, StageConfig
from pixeldit.train.loader import build_loader
from pixeldit.train.sample_reader import decode_and_crop
from train_helpers import write_tiny_dataset

RATIOS = ["0.25", "0.33", "0.50", "0.67", "0.75", "1.00", "1.33", "1.50", "2.00", "3.00", "4.00"]


def table(n=61, n_ratios=3, per_shard=4, seed=5, sources=1, weights=None):
    """Shards of one ratio key each (as the pipeline writes them), random ratio per sample."""
    rng = np.random.default_rng(seed)
    ratio = np.sort(rng.integers(0, n_ratios, n))
    shard = np.zeros(n, dtype=np.int64)
    pos = np.zeros(n, dtype=np.int64)
    next_id = 0
    for k in range(n_ratios):
        idx = np.flatnonzero(ratio == k)
        shard[idx] = next_id + np.arange(len(idx)) // per_shard
        pos[idx] = np.arange(len(idx)) % per_shard
        next_id += -(-len(idx) // per_shard)
    source = np.arange(n) % sources
    return PlanTable(source, shard, pos, ratio, RATIOS[:n_ratios], weights or [1.0] * sources)


def plan_of(t, global_batch, seed=0, **kw):
    return StagePlan(t, {k: (32, 32) for k in t.ratio_keys}, global_batch=global_batch, seed=seed, salt=1, **kw)


def rank_sequence(plan, epoch, world, accum):
    """The global key sequence as the ranks draw it: per global batch, rank 0's micro-batches, then rank 1's..."""
    ep = plan.epoch(epoch)
    return [ep.rank_rows(b, r, world).tolist() for b in range(len(ep)) for r in range(world)]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (4, 2)])
def test_plan_is_world_size_independent_rank_aligned_and_deterministic(world, accum):
    t = table()
    plan = plan_of(t, global_batch=8)
    ep = plan.epoch(0)
    assert len(ep) > 0 and ep.rows.shape[1] == 8
    seen = []
    for b in range(len(ep)):
        slices = [ep.rank_rows(b, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(slices), ep.rows[b])  # the slices tile the global batch
        assert len({int(t.ratio[x]) for s in slices for x in s}) == 1  # one bucket for every rank
        seen.extend(ep.rows[b].tolist())
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    again = plan_of(t, global_batch=8).epoch(0)
    assert np.array_equal(again.rows, ep.rows) and np.array_equal(again.buckets, ep.buckets)
    assert not np.array_equal(plan.epoch(1).rows, ep.rows)  # epochs are seeded differently
    assert not np.array_equal(plan_of(t, global_batch=8, seed=1).epoch(0).rows, ep.rows)


def test_global_batches_read_few_shards_per_rank():
    """Sorted by shard inside a global batch, a rank's slice of a 16-shard block reads 1-2 shards."""
    t = table(n=4096, n_ratios=1, per_shard=64)
    ep = plan_of(t, global_batch=256).epoch(0)
    per_batch = [len(np.unique(t.shard[ep.rows[b]])) for b in range(len(ep))]
    assert max(per_batch) <= 17  # one block of 16 shards (+ one across a block edge)
    per_rank = [len(np.unique(t.shard[ep.rank_rows(b, r, 16)])) for b in range(len(ep)) for r in range(16)]
    assert max(per_rank) <= 3 and np.mean(per_rank) < 2.1


def test_small_buckets_join_the_nearest_and_every_sample_is_seen_within_two_epochs():
    """The reported case: 607 samples in 11 buckets, micro_batch 28 on 2 ranks (G = 56): buckets smaller than
    G train inside their nearest bucket, and every sample is drawn in any two consecutive epochs."""
    rng = np.random.default_rng(0)
    p = [0.01, 0.02, 0.05, 0.1, 0.08, 0.4, 0.1, 0.1, 0.07, 0.04, 0.03]
    ratio = np.sort(rng.choice(11, 607, p=p))
    t = PlanTable(np.zeros(607, dtype=np.int64), np.arange(607) // 20, np.arange(607) % 20, ratio, RATIOS)
    plan = plan_of(t, global_batch=56)
    mapping, merges = merge_small_buckets(plan.ratio_counts, 56)
    assert {m.ratio_key for m in merges} == {k for k, n in plan.ratio_counts.items() if 0 < n < 56}
    assert all(n >= 56 for n in plan.bucket_counts().values())
    report = "\n".join(plan.describe())
    assert "0.25" in report and "fewer samples than one global batch of 56" in report and "left out per epoch" in report
    for e in range(5):
        both = set(plan.epoch(e).rows.ravel().tolist()) | set(plan.epoch(e + 1).rows.ravel().tolist())
        assert both == set(range(607)), f"epochs {e}, {e + 1}"


def test_merge_prefers_nearest_aspect_ratio():
    mapping, merges = merge_small_buckets({"0.25": 3, "0.33": 40, "1.00": 100, "4.00": 5}, 10)
    assert mapping == {"0.25": "0.33", "0.33": "0.33", "1.00": "1.00", "4.00": "1.00"}
    assert [(m.ratio_key, m.into) for m in merges] == [("0.25", "0.33"), ("4.00", "1.00")]


def test_selection_mask_and_mixing_weights():
    t = table(n=120, n_ratios=2, sources=2, weights=[3.0, 1.0])
    selection = np.ones(120, dtype=bool)
    selection[:10] = False
    plan = plan_of(t, global_batch=4, selection=selection)
    assert plan.mix == mix_counts([55, 55], [3.0, 1.0]) == [83, 27]  # 82.5 : 27.5, the tie to the first
    seen = set()
    for e in range(4):
        rows = plan.epoch(e).rows.ravel()
        assert not (set(rows.tolist()) & set(range(10)))  # rows left out never enter an epoch
        counts = np.bincount(t.source[rows], minlength=2)
        assert counts[0] > 2 * counts[1]  # about 3:1 (the per-bucket tail is left out)
        seen |= set(rows[t.source[rows] == 1].tolist())
    assert seen == set(np.flatnonzero(t.source == 1)) - set(range(10))  # the light source cycles through all


def test_decode_and_crop_covers_then_center_crops():
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


def _cfg(root, buckets="aspect", micro_batch=2, workers=0, accum=1, **data):
    stage = StageConfig(name="s", steps=10, data_path=str(root), resolution=32, buckets=buckets, bucket_align=16,
                        micro_batch=micro_batch, grad_accum=accum)
    cfg = RunConfig(stages=[stage])
    cfg.data.num_workers = workers
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 9, "0.50": 6, "2.00": 5}, per_shard=4)


def test_loader_reads_shards_and_resumes_exactly_mid_epoch(tiny):
    index = read_sample_index(str(tiny))
    assert len(index) == 20 and len(index.shards) == 3 + 2 + 2
    assert index.shard_bytes.tolist() == [(tiny / s).stat().st_size for s in index.shards]
    loader = build_loader(_cfg(tiny), 0, rank=0, world_size=2, num_classes=10)
    per_epoch = len(loader)  # G = 4: 9 -> 2, 6 -> 1, 5 -> 1 global batches
    assert per_epoch == 4
    batches = [loader.next() for _ in range(per_epoch + 3)]  # rolls into epoch 1
    assert loader.state_dict() == {"epoch": 1, "batch": 3, "micro": 0, "global_batch": 4, "grad_accum": 1}
    b = batches[0]
    h, w = bucket_table(32, 16)[b["bucket"]]
    assert b["x0"].shape == (2, 3, h, w) and b["label"].dtype == torch.int64
    assert all(c.startswith("sample ") and b["bucket"] in c for c in b["caption"])
    assert all(s.startswith(f"shards/{b['bucket']}/") for s in b["shard"]) and b["source"] == [0, 0]

    resumed = build_loader(_cfg(tiny), 0, rank=0, world_size=2, num_classes=10)
    assert resumed.load_state_dict({"epoch": 0, "batch": 2, "micro": 0, "global_batch": 4}) is None
    for expected in batches[2:]:
        got = resumed.next()
        assert got["key"] == expected["key"] and torch.equal(got["x0"], expected["x0"])


def keys_of(cfg, rank, world, state, steps):
    loader = build_loader(cfg, 0, rank=rank, world_size=world)
    if state is not None:
        loader.load_state_dict(state)
    accum = cfg.stages[0].grad_accum
    out = [[k for _ in range(accum) for k in loader.next()["key"]] for _ in range(steps)]
    return out, loader.state_dict()


def global_sequence(cfg, world, state, steps):
    """Per optimizer step, the keys of the global batch (rank 0's micro-batches, then rank 1's, ...)."""
    per_rank = []
    for r in range(world):
        keys, end = keys_of(cfg, r, world, state, steps)
        per_rank.append(keys)
    return [[k for r in range(world) for k in per_rank[r][s]] for s in range(steps)], end


def test_resume_of_a_two_rank_state_on_one_and_four_ranks_continues_the_same_global_sequence(tiny):
    """Global batch 8 = 2 ranks x 2 x accum 2 = 1 rank x 4 x 2 = 4 ranks x 1 x 2: same key sequence."""
    two = _cfg(tiny, micro_batch=2, accum=2)
    reference, _ = global_sequence(two, 2, None, 7)  # 2 epochs of 2 global batches, and more
    _, state = global_sequence(two, 2, None, 3)  # a 2-rank run checkpointed after step 3
    assert state["epoch"] == 1 and state["global_batch"] == 8
    for world, micro in ((1, 4), (4, 1)):
        got, _ = global_sequence(_cfg(tiny, micro_batch=micro, accum=2), world, state, 4)
        assert got == reference[3:], f"{world} ranks"


def test_loader_leaves_the_global_rng_alone_with_workers(tiny):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loader = build_loader(_cfg(tiny, buckets="fixed", micro_batch=3, workers=2), 0, rank=1, world_size=2)
    assert len(loader) == 3  # 20 samples, G = 6
    shapes = {tuple(loader.next()["x0"].shape) for _ in range(3)}
    assert shapes == {(3, 3, 32, 32)}
    loader.close()
    assert torch.equal(before, torch.get_rng_state())


def test_class_labels_are_checked(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4}, num_classes=10)
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        build_loader(_cfg(root), 0, rank=0, world_size=1, num_classes=3)


def test_incomplete_dataset_is_reported(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 4})
    (root / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        read_sample_index(str(root))


def test_damaged_shards_are_found_before_the_first_batch_and_can_be_skipped(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 12, "2.00": 8}, per_shard=4)
    (root / "shards/1.00/1.00-000001.tar").unlink()
    truncated = root / "shards/2.00/2.00-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(DataError) as err:
        build_loader(_cfg(root), 0, rank=0, world_size=1)
    message = str(err.value)
    assert "2 shards do not match manifest.parquet" in message and "\n" not in message
    assert "1.00-000001.tar: missing" in message and "2.00-000000.tar: 1000 bytes, the manifest says" in message
    assert "data.skip_damaged_shards" in message
    loader = build_loader(_cfg(root, skip_damaged_shards=True), 0, rank=0, world_size=1)
    assert "leaving out 2 damaged shards, 8 of 20 samples" in loader.notes[0]
    keys = {k for _ in range(2 * len(loader)) for k in loader.next()["key"]}
    assert keys == {f"{n:08d}" for n in list(range(4)) + list(range(8, 12)) + list(range(16, 20))}


def test_undecodable_samples_are_replaced_counted_and_bounded(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 8}, per_shard=8)
    index = read_sample_index(str(root))
    shard = root / index.shards[0]
    data = bytearray(shard.read_bytes())
    for row in (1, 5):  # same size, garbage bytes: the shard check passes, decoding fails
        start = int(index.image_offset[row])
        data[start:start + int(index.image_size[row])] = b"\0" * int(index.image_size[row])
    shard.write_bytes(bytes(data))
    bad_keys = {index.keys[1].as_py(), index.keys[5].as_py()}
    loader = build_loader(_cfg(root, micro_batch=4, max_bad_samples=2), 0, rank=0, world_size=1)
    batches = [loader.next() for _ in range(2)]
    assert len(loader.bad_samples) == 2 and all(b["x0"].shape[0] == 4 for b in batches)
    assert not bad_keys & {k for b in batches for k in b["key"]}  # replaced by a good sample of the batch
    strict = build_loader(_cfg(root, micro_batch=4, max_bad_samples=1), 0, rank=0, world_size=1)
    with pytest.raises(DataError, match="more than data.max_bad_samples=1"):
        for _ in range(2):
            strict.next()


def test_two_roots_with_weights(tmp_path):
    a = write_tiny_dataset(tmp_path / "a", {"1.00": 8}, per_shard=4)
    b = write_tiny_dataset(tmp_path / "b", {"1.00": 8}, per_shard=4, seed=1)
    cfg = _cfg(a, micro_batch=4)
    cfg.stages[0].data_path = ""
    cfg.stages[0].sources = [DataSource(str(a), 3.0), DataSource(str(b), 1.0)]
    loader = build_loader(cfg, 0, rank=0, world_size=1)
    drawn = [s for _ in range(4 * len(loader)) for s in loader.next()["source"]]
    assert drawn.count(0) == 3 * drawn.count(1)  # 12 : 4 draws per epoch


def test_s3_reads_match_local_through_the_node_cache_with_workers(tmp_path):
    """Same batches from a moto S3 server as from the local copy; whole shards land in the node cache."""
    from data_fixtures import moto_s3
    from pixeldit.storage import fs_and_path

    root = write_tiny_dataset(tmp_path / "data", {"1.00": 8, "2.00": 4}, per_shard=4)
    with moto_s3("bkt") as base:
        fs, _ = fs_and_path(base)
        fs.put(str(root) + "/", "bkt/data/", recursive=True)
        cache_dir = tmp_path / "cache"
        remote = build_loader(_cfg(f"{base}/data", workers=2, cache_dir=str(cache_dir)), 0, rank=0, world_size=1)
        local = build_loader(_cfg(root), 0, rank=0, world_size=1)
        assert len(remote) == len(local) == 6
        for _ in range(len(local)):
            a, b = remote.next(), local.next()
            assert a["key"] == b["key"] and torch.equal(a["x0"], b["x0"])
        remote.close()
        cached = sorted(p.name.split("-", 1)[1] for p in cache_dir.iterdir() if not p.name.startswith("."))
        assert cached == ["1.00-000000.tar", "1.00-000001.tar", "2.00-000000.tar"]


def test_record_hook_writes_the_keys(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELDIT_RECORD_KEYS", str(tmp_path / "keys"))
    loader = build_loader(_cfg(tiny), 0, rank=1, world_size=2)
    keys = [loader.next()["key"] for _ in range(2)]
    lines = [json.loads(x) for x in (tmp_path / "keys" / "rank00001.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == keys and [(x["epoch"], x["batch"]) for x in lines] == [(0, 0), (0, 1)]
    assert os.path.getsize(tmp_path / "keys" / "rank00001.jsonl") > 0


def test_a_stuck_read_in_a_worker_becomes_an_error(tiny, monkeypatch):
    import time

    from pixeldit.errors import StorageError
    from pixeldit.train.sample_reader import SampleReader

    monkeypatch.setattr(SampleReader, "read", lambda self, row: time.sleep(60))  # inherited by the forked worker
    loader = build_loader(_cfg(tiny, workers=1, worker_timeout_s=1.0), 0, rank=0, world_size=1)
    start = time.time()
    with pytest.raises(StorageError, match="data.worker_timeout_s=1 s: a read is stuck"):
        loader.next()
    assert time.time() - start < 30
    loader.close()


def test_data_rate_line_sizes_the_need_from_the_flop_model(tiny):
    from pixeldit.models import get_model_args
    from pixeldit.train.loader import data_rate_line
    from pixeldit.train.metrics import FlopCounter

    cfg = _cfg(tiny)
    loader = build_loader(cfg, 0, rank=0, world_size=2)
    flops = FlopCounter(get_model_args("debug"))
    need = 0.4 * 100e12 * 2 / flops.train_flops(32, 32)  # data.target_mfu x peak x ranks / FLOPs per image
    line = data_rate_line(cfg, 0, loader, flops, 2, 100.0)
    assert line.startswith(f"data rate: the run needs {need:.0f} img/s") and "40% MFU on 2 ranks" in line
    assert "probe:" in line and ("enough" in line or "SHORT by" in line) and "\n" not in line
    assert "the need is unknown" in data_rate_line(cfg, 0, loader, flops, 2, None)
    assert loader.state_dict()["batch"] == 0  # the probe does not move the stream
