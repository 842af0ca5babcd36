"""Text encoder, embedding cache, REPA and the objective end to end on tiny models saved and reloaded."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pixeldit.diffusion import (DinoV2Teacher, ObjectiveConfig, REPAProjector, TextEmbeddingCache, TextEncoder,
                                compute_loss, generate, precompute_text_embeddings)
from pixeldit.models import build_model, get_model_args
from diffusion_fixtures import minilm_dir, save_tiny_dinov2, save_tiny_gemma2


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return save_tiny_gemma2(tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def test_gemma2_encoder_shapes_system_prompt_and_null(gemma_dir):
    enc = TextEncoder.from_pretrained(gemma_dir, system_prompt="Describe the image in detail: ", max_length=12)
    assert enc.dim == 32
    emb, mask = enc.encode(["a red circle", "a very long prompt " * 20])
    assert emb.shape == (2, 12, 32) and mask.shape == (2, 12)
    assert mask[1].all() and not mask[0].all()  # short prompt is padded, long one fills every slot
    # the user prompt survives the system prompt: different prompts -> different states
    e2, _ = enc.encode(["a blue square"])
    assert not torch.allclose(emb[0], e2[0])
    # deterministic
    assert torch.equal(enc.encode(["a red circle"])[0], emb[:1])
    # null = empty prompt WITHOUT the system prompt
    ne, nm = enc.encode_null(3)
    assert ne.shape == (3, 12, 32)
    plain = TextEncoder.from_pretrained(gemma_dir, system_prompt="", max_length=12)
    assert torch.allclose(plain.encode([""])[0][0], ne[0], atol=1e-6)
    assert not torch.allclose(enc.encode([""])[0][0], ne[0])
    with pytest.raises(FileNotFoundError, match="text encoder folder"):
        TextEncoder.from_pretrained(gemma_dir / "missing")


def test_real_minilm_encoder_separates_prompts():
    enc = TextEncoder.from_pretrained(minilm_dir(), system_prompt="", max_length=16)
    emb, mask = enc.encode(["a red circle", "a red circle", "a green triangle"])
    assert emb.shape == (3, 16, 384)
    assert torch.equal(emb[0], emb[1]) and not torch.allclose(emb[0], emb[2])


def test_embedding_cache_roundtrip_and_fingerprint(tmp_path, gemma_dir):
    root = tmp_path / "data"
    root.mkdir()
    caps = ["a red circle", "a blue square", "a green triangle", ""]
    pq.write_table(pa.table({"shard": ["shards/1.00/a.tar"] * 2 + ["shards/2.00/b.tar"] * 2, "sample_index": [1, 0, 0, 1],
                             "caption": caps}), root / "samples.parquet")
    enc = TextEncoder.from_pretrained(gemma_dir, system_prompt="sys: ", max_length=8)
    url = precompute_text_embeddings(str(root), enc, progress=False)
    cache = TextEmbeddingCache(url, expect=enc.fingerprint())
    emb, mask = cache.lookup(["shards/2.00/b.tar", "shards/1.00/a.tar"], [0, 1])
    ref, ref_mask = enc.encode(["a green triangle", "a red circle"])
    assert torch.allclose(emb, ref, atol=1e-2) and torch.equal(mask, ref_mask)
    other = TextEncoder.from_pretrained(gemma_dir, system_prompt="other: ", max_length=8)
    with pytest.raises(ValueError, match="different encoder setup"):
        TextEmbeddingCache(url, expect=other.fingerprint())
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        cache.lookup(["shards/9.tar"], [0])


def test_repa_end_to_end_with_tiny_dinov2(dino_dir):
    torch.manual_seed(0)
    teacher = DinoV2Teacher.from_pretrained(dino_dir)
    args = get_model_args("debug", repa_block=1)
    model = build_model(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    projector = REPAProjector(args.hidden_size, teacher.dim, width=64)
    x0 = torch.rand(2, 3, 32, 48) * 2 - 1
    feats = teacher(x0, (2, 3))
    assert feats.shape == (2, 6, teacher.dim)  # DINOv2 grid resized to the model's 2x3 patch grid
    cfg = ObjectiveConfig(repa_weight=0.5)
    out = compute_loss(model, x0, {"y": torch.tensor([1, 2])}, cfg, projector=projector, teacher=teacher,
                       null_cond=model.null_condition(2), generator=torch.Generator().manual_seed(0))
    assert 0 < out["repa"] < 2 and torch.isclose(out["loss"], out["flow"] + 0.5 * out["repa"])
    out["loss"].backward()
    assert projector.net[0].weight.grad.abs().sum() > 0
    assert model.patch_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # REPA off: no projector work, repa reported as 0
    off = compute_loss(model, x0, {"y": torch.tensor([1, 2])}, ObjectiveConfig(repa_weight=0.0), projector=projector,
                       teacher=teacher, null_cond=model.null_condition(2))
    assert off["repa"] == 0 and torch.isclose(off["loss"], off["flow"])


def test_objective_is_reproducible_and_drops_conditions():
    args = get_model_args("debug")
    model = build_model(args)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    kw = dict(null_cond=model.null_condition(4))
    a = compute_loss(model, x0, {"y": torch.arange(4)}, ObjectiveConfig(), generator=torch.Generator().manual_seed(1), **kw)
    b = compute_loss(model, x0, {"y": torch.arange(4)}, ObjectiveConfig(), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a["loss"], b["loss"])
    seen = []
    model.register_forward_pre_hook(lambda m, args_, kwargs: seen.append(kwargs["y"].clone()), with_kwargs=True)
    compute_loss(model, x0, {"y": torch.arange(4)}, ObjectiveConfig(cond_drop_prob=1.0), **kw)
    assert torch.equal(seen[-1], torch.full((4,), args.num_classes))


def test_generate_text_model_with_cfg(gemma_dir):
    enc = TextEncoder.from_pretrained(gemma_dir, system_prompt="", max_length=8)
    args = get_model_args("debug-T2I", text_dim=enc.dim, text_len=8)
    model = build_model(args)
    emb, mask = enc.encode(["a red circle", "a blue square"])
    ne, nm = enc.encode_null(2)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = generate(model, noise, {"context": emb, "context_mask": mask}, null_cond={"context": ne, "context_mask": nm},
                   steps=4, cfg_scale=3.0, cfg_interval=(0.1, 1.0), shift=2.0)
    assert out.shape == noise.shape and out.abs().max() <= 1
    # a fresh model predicts zero velocity: the sample is the (clamped) noise itself
    assert torch.allclose(out, noise.clamp(-1, 1), atol=1e-5)
