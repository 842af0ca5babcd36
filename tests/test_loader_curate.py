"""The curate stage's outputs as inputs of the loader's plan: near-duplicates dropped by ``data_pipeline.dedupe``
are never planned; with several captions per sample (captions.parquet) every draw picks one by
softmax(score / T), the same for any world size and after a resume, and the ledger lists which."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.captions import caption_probabilities
from data_pipeline.dataset_format import (CAPTIONS, CAPTIONS_SCHEMA, DEDUPE, DEDUPE_SCHEMA, CaptionRow, DedupeRow,
                                          read_sample_index, rows_to_table, write_table)
from pixeldit import run_folder
from pixeldit.train.config import RunConfig, StageConfig, save_config
from pixeldit.train.loader import build_loader
from train_helpers import write_tiny_dataset

SCORES = (0.30, 0.26, 0.20)  # CLIP-cosine scale: the caption draw's softmax(score / T)


def _cfg(root: Path, micro_batch: int = 2, temperature: float = 0.1, run_dir: Path | None = None) -> RunConfig:
    stage = StageConfig(name="s", steps=12, data_path=str(root), resolution=32, buckets="aspect", bucket_align=16,
                        micro_batch=micro_batch)
    cfg = RunConfig(stages=[stage], run_dir=str(run_dir or root.parent / "run"))
    cfg.data.num_workers = 0
    cfg.data.caption_temperature = temperature
    return cfg


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """20 samples in 3 buckets; every third sample has one caption, the others three (scores ``SCORES``)."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("curated") / "data", {"1.00": 9, "0.50": 6, "2.00": 5})
    index = read_sample_index(str(root))
    rows = []
    for r in range(len(index)):
        key, shard = index.keys[r].as_py(), index.shards[int(index.shard_id[r])]
        count = 1 if r % 3 == 0 else len(SCORES)
        for c in range(count):
            text = index.captions[r].as_py() if c == 0 else f"recaption {c} of {key}"
            rows.append(CaptionRow(key=key, shard=shard, sample_index=int(index.sample_index[r]), caption_index=c,
                                   source="caption" if c == 0 else f"vlm{c}", caption=text, clip_score=SCORES[c],
                                   score=SCORES[c]))
    write_table(f"{root}/{CAPTIONS}", rows_to_table(rows, CaptionRow), CAPTIONS_SCHEMA, {"run": "test"})
    return root


def draws(cfg: RunConfig, world: int, steps: int, state: dict | None = None) -> tuple[list[list[tuple]], dict]:
    """Per optimizer step, (key, caption_index, caption) of the global batch in rank order, and the end state."""
    per_rank, end = [], None
    for rank in range(world):
        loader = build_loader(cfg, 0, rank=rank, world_size=world)
        if state is not None:
            assert loader.load_state_dict(state) is None
        steps_of_rank = []
        for _ in range(steps):
            b = loader.next()
            steps_of_rank.append(list(zip(b["key"], b["caption_index"].tolist(), b["caption"])))
        per_rank.append(steps_of_rank)
        end = loader.state_dict()
    return [[d for r in range(world) for d in per_rank[r][s]] for s in range(steps)], end


def test_near_duplicates_dropped_by_dedupe_are_never_planned(tmp_path):
    root = write_tiny_dataset(tmp_path / "data", {"1.00": 9, "0.50": 6, "2.00": 5})
    index = read_sample_index(str(root))
    keys = [index.keys[r].as_py() for r in range(len(index))]
    dropped = {keys[1], keys[10], keys[17]}  # one per bucket
    table = rows_to_table([DedupeRow(key=k, representative=keys[0], reason="phash", distance=2.0)
                           for k in sorted(dropped)], DedupeRow)
    write_table(f"{root}/{DEDUPE}", table, DEDUPE_SCHEMA, {"run": "test"})
    loader = build_loader(_cfg(root), 0, rank=0, world_size=1)
    assert any("leaving out 3 of 20 samples: near-duplicates (dedupe)" in n for n in loader.notes)
    sources = loader.dataset.sources
    planned = [sources.key(int(r)) for e in range(6) for r in loader.plan.epoch(e).rows.ravel()]
    assert not dropped & set(planned)
    assert set(planned) == set(keys) - dropped  # every kept sample is still drawn
    yielded = {k for _ in range(2 * len(loader)) for k in loader.next()["key"]}
    assert yielded and not dropped & yielded
    assert loader.segment(0)["sources"][0]["selected"] == 17  # the ledger checks the selection is unchanged


def test_caption_draws_are_the_same_on_any_world_size_and_after_a_resume(curated):
    reference, _ = draws(_cfg(curated, micro_batch=4), 1, 8)  # G = 4 on 1 rank: 2 epochs of 4 global batches
    two, _ = draws(_cfg(curated, micro_batch=2), 2, 8)  # G = 4 on 2 ranks
    assert two == reference
    _, state = draws(_cfg(curated, micro_batch=2), 2, 3)  # a 2-rank run checkpointed after step 3
    resumed, _ = draws(_cfg(curated, micro_batch=4), 1, 5, state)
    assert resumed == reference[3:]
    index = read_sample_index(str(curated))
    row_of = {index.keys[r].as_py(): r for r in range(len(index))}
    flat = [d for step in reference for d in step]
    for key, c, text in flat:  # the caption text is the drawn one; one-caption samples always use caption 0
        assert text == (index.captions[row_of[key]].as_py() if c == 0 else f"recaption {c} of {key}")
        assert c == 0 or row_of[key] % 3 != 0
    assert {c for _, c, _ in flat} == {0, 1, 2}
    by_key: dict[str, set] = {}
    for key, c, _ in flat:
        by_key.setdefault(key, set()).add(c)
    assert any(len(v) > 1 for v in by_key.values())  # a sample drawn twice may get another caption


@pytest.mark.parametrize("temperature", [0.02, 0.1, 1.0])
def test_caption_draws_follow_softmax_of_score_over_temperature(curated, temperature):
    loader = build_loader(_cfg(curated, temperature=temperature), 0, rank=0, world_size=1)
    sources, plan = loader.dataset.sources, loader.plan
    rows = np.array([r for r in range(len(sources)) if r % 3 != 0])  # samples with three captions
    picked = np.concatenate([sources.draw_captions(rows, e * 1000 + np.arange(len(rows)), seed=plan.draw_seed,
                                                   epoch=e, temperature=temperature) for e in range(150)])
    share = np.bincount(picked, minlength=3) / len(picked)  # 13 x 150 = 1950 draws
    expected = caption_probabilities(SCORES, temperature)
    assert np.abs(share - expected).max() < 0.04, (share, expected)
    again = sources.draw_captions(rows, np.arange(len(rows)), seed=plan.draw_seed, epoch=0, temperature=temperature)
    assert np.array_equal(again, picked[:len(rows)])  # a pure function of (seed, epoch, position, key)


def test_ledger_lists_each_draw_with_its_caption(curated, tmp_path, capsys):
    from pixeldit.train.ledger import ledger, main

    run_dir = tmp_path / "run"
    cfg = _cfg(curated, micro_batch=2, run_dir=run_dir)
    loader = build_loader(cfg, 0, rank=0, world_size=2)
    step_dir = run_folder.checkpoints_dir(run_dir) / run_folder.step_dirname(5)
    step_dir.mkdir(parents=True)
    save_config(cfg, run_dir / run_folder.RUN_CONFIG)
    run_folder.write_meta(step_dir, {"step": 5, "data_segments": [loader.segment(0)]})
    run_folder.write_latest(step_dir.parent, step_dir)
    expected, _ = draws(cfg, 2, 5)
    listed = [(key, c) for _, _, key, c in ledger(run_dir, 5)]
    assert listed == [(key, c) for step in expected for key, c, _ in step]
    assert main([str(run_dir), "--step", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step\troot\tkey\tcaption_index" and len(lines) == 1 + 2 * 4
    assert lines[1].split("\t") == ["1", str(curated), expected[0][0][0], str(expected[0][0][1])]
    # the plan's inputs changed (another caption set): the ledger refuses instead of listing another plan
    meta = run_folder.read_meta(step_dir)
    meta["data_segments"][0]["sources"][0]["captions"] = "0" * 16
    run_folder.write_meta(step_dir, meta)
    with pytest.raises(ValueError, match="changed since stage 0 trained on it"):
        list(ledger(run_dir, 5))


class _Cache:
    """A stand-in embedding cache: the state of (shard, sample, caption) is (source, sample, caption) in 3 dims."""

    def __init__(self, source: int):
        self.source = source

    def lookup(self, shards, sample_indices, caption_indices=None):
        n = len(shards)
        caps = torch.zeros(n) if caption_indices is None else torch.as_tensor(caption_indices).float()
        emb = torch.stack([torch.full((n,), float(self.source)), torch.as_tensor(sample_indices).float(), caps], 1)
        return emb[:, None, :], torch.ones(n, 1, dtype=torch.bool)  # (B, 1, 3), (B, 1)

    def null(self, batch):
        return torch.zeros(batch, 1, 3), torch.ones(batch, 1, dtype=torch.bool)


def test_cached_text_condition_uses_the_drawn_caption_of_each_root():
    from pixeldit.train.conditioning import TextConditioner

    cond = TextConditioner(torch.device("cpu"), caches=[_Cache(0), _Cache(1)])
    batch = {"source": [1, 0, 1], "shard": ["a", "b", "c"], "sample_index": torch.tensor([4, 5, 6]),
             "caption_index": torch.tensor([2, 0, 1]), "caption": ["x", "y", "z"]}
    states = cond(batch)[0]["context"][:, 0]  # (B, 3)
    assert states.tolist() == [[1.0, 4.0, 2.0], [0.0, 5.0, 0.0], [1.0, 6.0, 1.0]]


def test_an_embedding_cache_without_every_caption_is_refused_before_training(curated):
    from pixeldit.errors import ConfigError
    from pixeldit.train.conditioning import TextConditioner

    sources = build_loader(_cfg(curated), 0, rank=0, world_size=1).dataset.sources
    index, sets = sources.indexes[0], sources.caption_sets[0]
    per_shard = np.bincount(index.shard_id, weights=np.diff(sets.offsets)).astype(int)
    complete, old = _Cache(0), _Cache(0)
    complete.meta = {"captions": dict(zip(index.shards, per_shard.tolist()))}  # format 3 after the score stage
    old.meta, old.url = {}, "s3://bkt/data/text_emb"  # format 2: one caption per sample
    old.num_samples = {s: int(n) for s, n in zip(index.shards, np.bincount(index.shard_id))}
    TextConditioner(torch.device("cpu"), caches=[complete]).check_captions(sources)
    # rows 0-3 of shard 1.00-000000: 1 + 3 + 3 + 1 captions
    with pytest.raises(ConfigError, match=r"text_emb holds 4 captions of shard shards/1.00/1.00-000000.tar where "
                                          r".* draws among 8 \(7 such shards\)"):
        TextConditioner(torch.device("cpu"), caches=[old]).check_captions(sources)
