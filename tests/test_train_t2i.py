"""Text-to-image training (single rank, in process): online text encoder (the real MiniLM), REPA on in
stage 1 and off in stage 2 (projector trained with the model), EMA previews from text prompts; cached text
embeddings give the same losses as the online encoder."""
from __future__ import annotations

import json

import pytest

from diffusion_fixtures import minilm_dir, save_tiny_dinov2
from pixeldit.release.zero import consolidate_model
from pixeldit.run_folder import read_meta
from pixeldit.train.config import RunConfig, StageConfig
from pixeldit.train.trainer import run_training
from train_helpers import write_tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), {"1.00": 8, "0.50": 4}, per_shard=4)


def t2i_cfg(run_dir, data, stages, **conditioning) -> RunConfig:
    cfg = RunConfig(run_dir=str(run_dir), stages=stages)
    cfg.model.size, cfg.model.overrides = "debug-T2I", {"text_dim": 384, "text_len": 16}
    cfg.deepspeed.precision = "fp32"
    cfg.data.num_workers = 0
    cfg.logging.wandb, cfg.logging.progress_bar = "disabled", False
    cfg.logging.image_every, cfg.logging.image_count, cfg.logging.image_sample_steps = 2, 2, 2
    for key, value in conditioning.items():
        setattr(cfg.conditioning, key, value)
    return cfg


def stage(name, steps, data, **kw) -> StageConfig:
    return StageConfig(name=name, steps=steps, data_path=str(data), resolution=32, bucket_align=16, micro_batch=2,
                       lr=1e-3, **kw)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def test_t2i_online_encoder_with_repa_curriculum(single_rank, data, tmp_path):
    teacher = save_tiny_dinov2(tmp_path / "dino")
    stages = [stage("repa", 2, data, buckets="fixed", repa=True), stage("plain", 2, data, buckets="aspect")]
    cfg = t2i_cfg(tmp_path / "run", data, stages, text_encoder=str(minilm_dir()), system_prompt="",
                  repa_teacher=str(teacher))
    result = run_training(cfg)
    assert result.status == "finished" and result.step == 4
    recs = records(tmp_path / "run")
    assert all(r["repa"] > 0 for r in recs[:2]) and all(r["repa"] == 0 for r in recs[2:])
    assert all(r["loss"] == pytest.approx(r["flow"] + 0.5 * r["repa"]) for r in recs)
    last = tmp_path / "run" / "checkpoints" / "step_00000004"
    meta = read_meta(last)
    assert meta["text_encoder"] == str(minilm_dir()) and meta["system_prompt"] == ""
    assert meta["model_args"]["text_dim"] == 384
    projector = consolidate_model(last, prefix="projector.")
    assert projector and all(k.startswith("net.") for k in projector)  # trained with the model by DeepSpeed
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == ["step_00000002.png",
                                                                                    "step_00000004.png"]


def test_cached_text_embeddings_match_online_encoder(single_rank, data, tmp_path):
    """The cache lookup by (shard, sample_index) gives each sample its own caption's states, as the
    online encoder does; a cached run trains and previews from the first batch (no encoder loaded)."""
    import torch

    from pixeldit.conditioning import TextEncoder, precompute_text_embeddings
    from pixeldit.train.conditioning import build_conditioner
    from pixeldit.train.loader import build_loader

    encoder = TextEncoder.from_pretrained(minilm_dir(), system_prompt="", max_length=16)
    cache = precompute_text_embeddings(str(data), encoder, cache_dir=str(tmp_path / "emb"), progress=False)
    cfg = t2i_cfg(tmp_path / "run", data, [stage("s", 3, data, buckets="aspect")], text_mode="cached",
                  system_prompt="", embedding_cache=cache)
    args, cpu = cfg.model.args(), torch.device("cpu")
    cached = build_conditioner(cfg, args, cpu, 0, encoder=None)
    online = build_conditioner(cfg, args, cpu, 0, encoder=encoder)
    online.cache = None  # same object type, encoding captions instead
    loader = build_loader(cfg, 0, rank=0, world_size=1)
    for _ in range(len(loader)):
        batch = loader.next()
        (c1, n1), (c2, n2) = cached(batch), online(batch)
        assert torch.equal(c1["context_mask"], c2["context_mask"]) and torch.equal(n1["context_mask"], n2["context_mask"])
        assert torch.allclose(c1["context"], c2["context"], atol=2e-3)  # fp16 storage
        assert torch.allclose(n1["context"], n2["context"], atol=2e-3)
        assert not torch.allclose(c1["context"], c1["context"].roll(1, 0), atol=1e-2)  # captions differ
    result = run_training(cfg)
    assert result.status == "finished" and all(x == x for x in result.losses)
    assert (tmp_path / "run" / "samples" / "step_00000002.png").exists()
