"""Score stage, near-duplicate removal and several captions per image, through the real loading code.

The CLIP model is a tiny random transformers CLIPModel saved in the test and loaded by ``ClipEmbedder`` (the
project's one CLIP loader); the aesthetic head is a random LAION-shaped head saved as safetensors.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate_fixtures import save_aesthetic_head, save_tiny_clip, write_curation_root, write_jsonl
from data_pipeline.captions import (DEFAULT_CAPTION_TEMPERATURE, caption_probabilities, draw_caption,
                                    read_caption_sets)
from data_pipeline.cli import main as data_cli
from data_pipeline.dataset_format import (SCORES, read_captions, read_dedupe, read_sample_index,
                                          read_samples, read_score_part_metadata, read_scores, score_part_name)
from data_pipeline.dedupe import (DedupeConfig, choose_representatives, dedupe_dataset, embedding_pairs, keep_mask,
                                  phash_pairs)
from data_pipeline.score import ScoreConfig, score_dataset
from pixeldit.errors import DataError

HEAD_DIMS = (8, 16, 4, 1)  # the tiny CLIP's projection_dim -> 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    clip = save_tiny_clip(folder / "clip")
    head = folder / "aesthetic.safetensors"
    state = save_aesthetic_head(head, HEAD_DIMS)
    return clip, head, state


def reference_embedding(clip_dir, img: Image.Image) -> torch.Tensor:
    """CLIPModel's own image_embeds of a full-decoded image, preprocessing written out here."""
    from transformers import CLIPModel

    x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[2:]
    nh, nw = max(32, round(h * 32 / min(h, w))), max(32, round(w * 32 / min(h, w)))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)
    x = x[:, :, (nh - 32) // 2:(nh - 32) // 2 + 32, (nw - 32) // 2:(nw - 32) // 2 + 32].clamp(0, 1)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    return torch.nn.functional.normalize(emb.pooler_output, dim=-1)[0]


def same_table(a: pa.Table, b: pa.Table) -> bool:
    """Equal values, NaN equal to NaN (Table.equals says NaN != NaN)."""
    return a.schema == b.schema and all(
        np.array_equal(a[n].to_numpy(zero_copy_only=False), b[n].to_numpy(zero_copy_only=False),
                       equal_nan=pa.types.is_floating(a.schema.field(n).type)) for n in a.column_names)


def image_bytes(root, row) -> bytes:
    with open(root / row["shard"], "rb") as f:
        f.seek(row["image_offset"])
        return f.read(row["image_size"])


def test_scores_join_samples_one_to_one_and_match_the_model(tmp_path, models):
    clip, head, state = models
    data = write_curation_root(tmp_path / "data")
    summary = score_dataset(str(data.root), ScoreConfig(clip=str(clip), aesthetic=str(head), batch_size=4,
                                                        progress=False))
    assert summary.committed and summary.samples_scored == len(data.keys) and summary.undecodable == data.broken
    scores, samples = read_scores(str(data.root)), read_samples(str(data.root))
    assert scores.num_rows == samples.num_rows == len(data.keys)
    joined = samples.join(scores, "key", join_type="inner", right_suffix="_s")
    assert joined.num_rows == samples.num_rows  # 1:1 on key, and on (shard, sample_index)
    assert joined["shard"].to_pylist() == joined["shard_s"].to_pylist()
    assert joined["sample_index"].to_pylist() == joined["sample_index_s"].to_pylist()
    rows = {r["key"]: r for r in joined.to_pylist()}
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip)
    for key in data.png[:3]:  # PNGs decode in full (no JPEG draft): the exact model output
        img = Image.open(io.BytesIO(image_bytes(data.root, rows[key])))
        emb = reference_embedding(clip, img)
        with torch.no_grad():
            txt = model.get_text_features(**tok([rows[key]["caption"]], return_tensors="pt")).pooler_output
        want = float(emb @ torch.nn.functional.normalize(txt, dim=-1)[0])
        assert rows[key]["clip_score"] == pytest.approx(want, abs=1e-5)
        x = emb
        for n in range(len(HEAD_DIMS) - 1):
            x = x @ state[f"layers.{2 * n}.weight"].T + state[f"layers.{2 * n}.bias"]
        assert rows[key]["aesthetic"] == pytest.approx(float(x[0]), abs=1e-5)
        import imagehash

        assert rows[key]["phash"] == int(str(imagehash.phash(img.convert("RGB"))), 16)
    broken = rows[data.broken[0]]
    assert np.isnan(broken["clip_score"]) and np.isnan(broken["aesthetic"])
    # every sample has its one caption in captions.parquet, scored like clip_score
    caps = read_captions(str(data.root))
    assert caps.num_rows == samples.num_rows and set(caps["source"].to_pylist()) == {"caption"}
    by_key = {r["key"]: r for r in caps.to_pylist()}
    assert all(by_key[k]["clip_score"] == pytest.approx(rows[k]["clip_score"]) for k in data.png)
    assert by_key[data.broken[0]]["score"] == 0.0  # undecodable: a uniform draw


def test_score_stage_resumes_and_splits_into_parts(tmp_path, models):
    clip, head, _ = models
    data = write_curation_root(tmp_path / "data", distinct=6, resized=1, lossless=0, per_shard=3)
    root = str(data.root)
    cfg = ScoreConfig(clip=str(clip), batch_size=2, progress=False, num_parts=2)
    first = score_dataset(root, cfg)  # part 0 only: no commit yet
    assert not first.committed and not (data.root / SCORES).exists() and first.shards_scored == 2
    second = score_dataset(root, ScoreConfig(**{**cfg.__dict__, "part": 1}))
    assert second.committed and second.shards_scored == 1
    before = read_scores(root)
    part = data.root / score_part_name("shards/1.00/1.00-000001.tar")
    stamp = part.stat().st_mtime_ns
    again = score_dataset(root, ScoreConfig(clip=str(clip), batch_size=2, progress=False))
    assert again.shards_scored == 0 and again.shards_skipped == 3 and again.committed
    assert part.stat().st_mtime_ns == stamp and same_table(read_scores(root), before)
    part.unlink()  # a lost part is recomputed, alone
    redo = score_dataset(root, ScoreConfig(clip=str(clip), batch_size=2, progress=False))
    assert redo.shards_scored == 1 and redo.shards_skipped == 2 and same_table(read_scores(root), before)
    # another model (here: adding an aesthetic head) recomputes every shard
    other = score_dataset(root, ScoreConfig(clip=str(clip), aesthetic=str(head), batch_size=2, progress=False))
    assert other.shards_scored == 3 and read_score_part_metadata(root, "shards/1.00/1.00-000000.tar")["aesthetic"]


def test_planted_near_duplicates_found_with_full_recall_and_no_false_positive(tmp_path, models):
    clip, _, _ = models
    data = write_curation_root(tmp_path / "data")
    root = str(data.root)
    score_dataset(root, ScoreConfig(clip=str(clip), batch_size=8, progress=False))
    # pHash: resized + re-encoded and lossless copies, each pointing at its original
    summary = dedupe_dataset(root, DedupeConfig(phash_distance=4, min_similarity=None))
    got = {r["key"]: (r["representative"], r["reason"]) for r in read_dedupe(root).to_pylist()}
    want = {k: (v, "phash") for k, v in {**data.resized, **data.lossless}.items()}
    assert got == want and summary.dropped == len(want) and summary.samples == len(data.keys) - 1  # broken left out
    # embeddings alone (tiny random CLIP: only same-pixel copies are that close)
    dedupe_dataset(root, DedupeConfig(phash_distance=None, min_similarity=0.99999, block=5))
    got = {r["key"]: (r["representative"], r["reason"]) for r in read_dedupe(root).to_pylist()}
    assert got == {k: (v, "embedding") for k, v in data.lossless.items()}
    # the loader's row-selection hook
    index = read_sample_index(root)
    keep = keep_mask(root, index.keys)
    dropped = set(data.lossless)
    order = index.keys.to_pylist()
    assert [k for k, ok in zip(order, keep) if not ok] == sorted(dropped, key=order.index)
    assert keep.sum() == len(index) - len(dropped)


def test_phash_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    flips = rng.integers(0, 64, size=(300, 6))
    near = base.copy()
    for r in range(150):  # copies 1..6 bits away
        for b in flips[r, :r % 6 + 1]:
            near[r] ^= np.uint64(1) << np.uint64(int(b))
    hashes = np.concatenate([base, near[:150]])
    for t in (0, 3, 4, 7):
        i, j, d = phash_pairs(hashes, t)
        dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        bi, bj = np.nonzero(np.triu(dist <= t, k=1))
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(bi.tolist(), bj.tolist()))
        assert (d == dist[i, j]).all()
    with pytest.raises(ValueError, match="0..31"):
        phash_pairs(hashes, 40)


def test_embedding_search_equals_brute_force_for_any_block():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(50, 16))
    emb[40:] = emb[:10] + 0.05 * rng.normal(size=(10, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    bi, bj = np.nonzero(np.triu(sims >= 0.98, k=1))
    assert len(bi) >= 10
    for block in (1, 7, 50, 64):
        i, j, d = embedding_pairs(emb.astype(np.float16), 0.98 - 1e-3, block)
        got = {(a, b) for a, b in zip(i.tolist(), j.tolist()) if sims[a, b] >= 0.98}
        assert got == set(zip(bi.tolist(), bj.tolist()))
        assert np.allclose(d, 1 - sims[i, j], atol=2e-3)


def test_representatives_are_kept_and_never_chained():
    rank = np.arange(4)  # 0 is preferred
    # 1~0 (phash), 2~1 (embedding), 3~2: 1 goes (to 0); 2 stays (its only better match 1 is dropped); 3 goes to 2
    pairs = [(np.array([0]), np.array([1]), np.array([2.0])),
             (np.array([1, 2]), np.array([2, 3]), np.array([0.01, 0.02]))]
    dropped, reps, codes, dists = choose_representatives(rank, pairs)
    assert dict(zip(dropped.tolist(), reps.tolist())) == {1: 0, 3: 2}
    assert codes.tolist() == [0, 1] and dists.tolist() == [2.0, 0.02]


def test_side_captions_are_scored_ordered_and_drawn(tmp_path, models):
    clip, _, _ = models
    data = write_curation_root(tmp_path / "data", distinct=4, resized=0, lossless=0, per_shard=3)
    root = str(data.root)
    side = write_jsonl(tmp_path / "recaptions.jsonl", [
        {"key": "a0001", "source": "vlm", "caption": "a colourful grid"},
        {"key": "a0001", "source": "blip", "caption": "squares", "score": 0.5},
        {"key": "a0002", "source": "vlm", "caption": "tiles"},
        {"key": "zzz", "source": "vlm", "caption": "not in the dataset"},
    ])
    summary = score_dataset(root, ScoreConfig(clip=str(clip), side_captions=(str(side),), progress=False))
    assert summary.side_unknown_keys == 1
    caps = read_captions(root).to_pylist()
    a1 = [(r["caption_index"], r["source"], r["caption"]) for r in caps if r["key"] == "a0001"]
    assert a1 == [(0, "caption", "an image numbered a0001"), (1, "blip", "squares"), (2, "vlm", "a colourful grid")]
    given = next(r for r in caps if r["key"] == "a0001" and r["source"] == "blip")
    assert given["score"] == 0.5 and given["score"] != given["clip_score"]
    assert next(r for r in read_scores(root).to_pylist() if r["key"] == "a0001")["num_captions"] == 3
    # the loader's view, aligned with the sample index
    index = read_sample_index(root)
    sets = read_caption_sets(root, index.keys)
    row = index.keys.to_pylist().index("a0001")
    assert sets.caption(row, 2) == "a colourful grid" and len(sets.scores_of(row)) == 3
    assert sets.scores_of(row)[1] == 0.5
    n = 2000
    picks = np.bincount([sets.draw(row, 0.1, seed=3, epoch=0, position=p, key="a0001") for p in range(n)],
                        minlength=3)
    p = caption_probabilities(sets.scores_of(row), 0.1)
    assert p[1] > 0.5 and np.all(np.abs(picks / n - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9)
    # the caption-embedding cache layout: per shard, per sample, every caption
    from data_pipeline.dataset_format import caption_sets_by_shard

    by_shard = caption_sets_by_shard(root)
    shard, i = index.shards[index.shard_id[row]], int(index.sample_index[row])
    assert by_shard[shard][i] == ["an image numbered a0001", "squares", "a colourful grid"]


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 2: not valid JSON"),
    ({"key": "a0001", "source": "vlm"}, "line 2: 'caption' must be a string"),
    ({"key": "a0001", "source": "vlm", "caption": "  "}, "line 2: empty caption"),
    ({"key": "a0001", "source": "v m", "caption": "x"}, "line 2: source 'v m' must match"),
    ({"key": "a0001", "source": "caption", "caption": "x"}, "line 2: source 'caption'"),
    ({"key": "a0001", "source": "vlm", "caption": "x", "score": "high"}, "line 2: score must be a finite number"),
    ({"key": "a0001", "source": "vlm", "caption": "x", "score": float("nan")}, "line 2: score must be a finite"),
    ({"key": "a0001", "source": "vlm", "caption": "x", "extra": 1}, "line 2: unknown field"),
    ({"key": "a0000", "source": "vlm", "caption": "again"}, "line 2: sample 'a0000' already has a caption from "
                                                           "source 'vlm'"),
])
def test_malformed_side_caption_file_names_its_row(tmp_path, models, line, message, capsys):
    clip, _, _ = models
    data = write_curation_root(tmp_path / "data", distinct=2, resized=0, lossless=0)
    side = write_jsonl(tmp_path / "side.jsonl", [{"key": "a0000", "source": "vlm", "caption": "ok"}, line])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        score_dataset(str(data.root), ScoreConfig(clip=str(clip), side_captions=(str(side),), progress=False))
    # the CLI: one line naming the file and the line, exit 2
    assert data_cli(["score", str(data.root), "--clip", str(clip), "--captions", str(side), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(side) in err[0] and "line 2" in err[0]


def test_malformed_parquet_side_file_names_its_row(tmp_path, models):
    clip, _, _ = models
    data = write_curation_root(tmp_path / "data", distinct=2, resized=0, lossless=0)
    side = tmp_path / "side.parquet"
    pq.write_table(pa.table({"key": ["a0000", "a0001", None], "source": ["vlm"] * 3, "caption": ["x", "y", "z"]}),
                   side)
    with pytest.raises(DataError, match=r"side.parquet row 3: 'key' must be a string"):
        score_dataset(str(data.root), ScoreConfig(clip=str(clip), side_captions=(str(side),), progress=False))


def test_caption_draw_frequencies_follow_the_softmax():
    scores = np.array([0.31, 0.26, 0.22, 0.33, 0.30])
    p = caption_probabilities(scores, DEFAULT_CAPTION_TEMPERATURE)
    assert np.allclose(p, np.exp(scores / 0.1) / np.exp(scores / 0.1).sum())
    n = 40_000
    counts = np.bincount([draw_caption(scores, 0.1, seed=7, epoch=e, position=pos, key=f"k{pos % 97}")
                          for e in range(2) for pos in range(n // 2)], minlength=len(scores))
    chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom: p = 0.0004
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n))
    # the temperature matters: T = 1 is close to uniform, T -> 0 to the argmax
    hot = np.bincount([draw_caption(scores, 1.0, seed=7, epoch=0, position=i, key="k") for i in range(5000)],
                      minlength=5)
    assert hot.min() > 800
    cold = [draw_caption(scores, 1e-3, seed=7, epoch=0, position=i, key="k") for i in range(500)]
    assert set(cold) == {3}
    assert draw_caption([0.2], 0.1, seed=0, epoch=0, position=0, key="k") == 0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        caption_probabilities(scores, 0.0)


def test_caption_draws_are_the_same_after_a_resume_and_on_any_world_size():
    scores = {f"k{i}": np.linspace(0.2, 0.3, 2 + i % 3) for i in range(64)}
    order = [f"k{(i * 37) % 64}" for i in range(64)]  # an epoch's global order

    def draws(positions, seed=11, epoch=2):
        return [draw_caption(scores[order[p]], 0.1, seed=seed, epoch=epoch, position=p, key=order[p])
                for p in positions]

    full = draws(range(64))
    resumed = draws(range(0, 20)) + draws(range(20, 64))  # stop after position 19, start again at 20
    assert resumed == full
    for world in (1, 2, 4):  # each rank draws its slice of every global batch of 8
        per_rank = 8 // world
        got = {}
        for b in range(8):
            for r in range(world):
                pos = range(b * 8 + r * per_rank, b * 8 + (r + 1) * per_rank)
                got.update(zip(pos, draws(pos)))
        assert [got[p] for p in range(64)] == full
    assert draws(range(64), epoch=3) != full and draws(range(64), seed=12) != full  # new epoch, new draws


def test_score_and_dedupe_on_s3(tmp_path, models):
    """The same stages on an S3 root (moto on 127.0.0.1): ranged image reads, atomic part and table uploads."""
    import s3fs

    from data_fixtures import moto_s3

    clip, _, _ = models
    data = write_curation_root(tmp_path / "data", distinct=6, resized=2, lossless=0, per_shard=4)
    with moto_s3("curate") as bucket:
        s3fs.S3FileSystem().put(str(data.root) + "/", f"{bucket}/data/", recursive=True)
        root = f"{bucket}/data"
        summary = score_dataset(root, ScoreConfig(clip=str(clip), progress=False))
        assert summary.committed and summary.samples_scored == len(data.keys)
        local = score_dataset(str(data.root), ScoreConfig(clip=str(clip), progress=False))
        assert local.committed
        assert same_table(read_scores(root), read_scores(str(data.root)))
        dedupe_dataset(root, DedupeConfig(phash_distance=4, min_similarity=None))
        assert {r["key"]: r["representative"] for r in read_dedupe(root).to_pylist()} == data.resized
