"""Text encoder and embedding cache on a tiny random Gemma-2 (saved and reloaded) and the real MiniLM."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from data_pipeline.dataset_format import CAPTIONS as CAPTIONS_FILE
from data_pipeline.dataset_format import (CAPTIONS_SCHEMA, NO_LABEL, CaptionRow, SampleRow, rows_to_table,
                                          text_embedding_dir, write_samples, write_table)
from pixeldit.conditioning import (OFFICIAL_SYSTEM_PROMPT, TextEmbeddingCache, TextEncoder, precompute_text_embeddings,
                                   resolve_system_prompt)
from pixeldit.conditioning.text_cache import read_shard_header, shard_file
from pixeldit.node_cache import NodeCache
from pixeldit.storage import join

WORDS = ("a an the red blue green circle square triangle photo picture of cat dog bowl soup describe image in "
         "detail : , . very long prompt").split()
SYSTEM = "describe the image in detail : "


def save_gemma_like_tokenizer(path: Path):
    """Word-level tokenizer with Gemma's conventions: <pad>=0, <eos>=1, <bos>=2 prepended, right padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A 2-layer random Gemma2ForCausalLM checkpoint (as gemma-2-2b-it is) + tokenizer in one folder."""
    path = tmp_path_factory.mktemp("gemma2")
    tok = save_gemma_like_tokenizer(path)
    return path, tok, save_gemma2(path, tok)


def full_states(lm, tok, text: str) -> torch.Tensor:
    """Hidden states of the unpadded sequence from the original checkpoint's base model: (L, C)."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return lm.model(input_ids=ids).last_hidden_state[0]


def test_gemma2_first_token_plus_prompt_states(gemma):
    path, tok, lm = gemma
    enc = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
    assert enc.dim == 32 and enc.sys_tokens == 6
    prompt = "a red circle"  # 3 tokens
    emb, mask = enc.encode([prompt, "a very long prompt of a blue square , a red cat and a green dog"])
    assert emb.shape == (2, 8, 32) and mask.shape == (2, 8) and emb.dtype == torch.float32
    ref = full_states(lm, tok, SYSTEM + prompt)  # (1 + 6 + 3, C): <bos>, system, prompt
    assert torch.allclose(emb[0, 0], ref[0], atol=1e-5)  # the first token
    assert torch.allclose(emb[0, 1:4], ref[7:10], atol=1e-5)  # the user prompt's states after the system prompt
    assert mask[0].tolist() == [True] * 4 + [False] * 4  # then padding, whose states are zero
    assert emb[0, 4:].abs().sum() == 0
    # a long prompt keeps the first token + its first max_length - 1 tokens, every slot valid
    long_ref = full_states(lm, tok, SYSTEM + "a very long prompt of a blue square , a red cat and a green dog")
    assert mask[1].all() and torch.allclose(emb[1, 1:], long_ref[7:14], atol=1e-5)
    assert torch.equal(enc.encode([prompt])[0][0], emb[0])  # deterministic, independent of the batch


def save_gemma2(path: Path, tok):
    """A 2-layer random Gemma2ForCausalLM for ``tok`` saved with it into ``path``; returns the model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    lm = Gemma2ForCausalLM(cfg).eval()
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return lm


def test_trailing_space_merged_into_the_prompt_is_not_counted(tmp_path):
    """SentencePiece style (Gemma): "describe the image : " ends in a lone "▁" that becomes "▁a" in front of
    "a red circle". The system prompt then occupies 4 tokens, the official pipeline's count
    (len(encode(system)) + max_length - 2 tokens in all), and the kept states start at the user's first word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in ("describe", "▁the", "▁image", "▁:", "▁", "▁a", "▁red", "▁circle"):
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    lm = save_gemma2(tmp_path, tok)
    system = "describe the image : "
    enc = TextEncoder.from_pretrained(tmp_path, system_prompt=system, max_length=6)
    assert enc.sys_tokens == 4 == len(tok(system)["input_ids"]) - 2
    emb, mask = enc.encode(["a red circle"])
    ref = full_states(lm, tok, system + "a red circle")  # <bos>, 4 system tokens, "▁a", "▁red", "▁circle"
    assert mask[0].tolist() == [True] * 4 + [False] * 2
    assert torch.allclose(emb[0, :4], torch.cat([ref[:1], ref[5:8]]), atol=1e-5)


def test_official_system_prompt_by_name_and_unmasked_padding(tmp_path, gemma):
    path, tok, lm = gemma
    assert resolve_system_prompt("official") == OFFICIAL_SYSTEM_PROMPT and resolve_system_prompt("x : ") == "x : "
    assert OFFICIAL_SYSTEM_PROMPT.startswith("Given a user prompt") and OFFICIAL_SYSTEM_PROMPT.endswith("User Prompt: ")
    named = TextEncoder.from_pretrained(path, system_prompt="official", max_length=8)
    assert named.system_prompt == OFFICIAL_SYSTEM_PROMPT
    masked = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
    kept = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8, keep_padding_states=True)
    (em, mm), (ek, mk) = masked.encode(["a red circle"]), kept.encode(["a red circle"])
    assert torch.equal(mm, mk) and torch.equal(em[mm], ek[mk])  # same valid states and mask
    assert em[~mm].abs().sum() == 0 and ek[~mk].abs().min() > 0  # padding: zeroed, or as the encoder made it
    assert "padding_states" not in masked.fingerprint() and kept.fingerprint()["padding_states"] == "keep"
    with pytest.raises(ValueError, match="must encode online"):
        precompute_text_embeddings(str(write_captions(tmp_path / "data")), kept, progress=False)


def test_gemma2_null_is_empty_prompt_without_system_prompt(gemma):
    path, tok, lm = gemma
    enc = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
    ne, nm = enc.encode_null(3)
    assert ne.shape == (3, 8, 32) and nm[:, 0].all() and not nm[:, 1:].any()  # just <bos>
    assert torch.allclose(ne[0, 0], full_states(lm, tok, "")[0], atol=1e-5)
    plain = TextEncoder.from_pretrained(path, system_prompt="", max_length=8)
    assert torch.allclose(plain.encode([""])[0][0], ne[0], atol=1e-6)


def test_null_skips_system_prompt_in_a_bidirectional_encoder():
    """In BERT every state sees the whole sequence, so the system prompt would change the null embedding."""
    from diffusion_fixtures import minilm_dir

    enc = TextEncoder.from_pretrained(minilm_dir(), system_prompt="describe the image in detail: ", max_length=8)
    plain = TextEncoder.from_pretrained(minilm_dir(), system_prompt="", max_length=8)
    ne, nm = enc.encode_null(1)
    pe, pm = plain.encode([""])
    assert torch.allclose(ne, pe, atol=1e-6) and torch.equal(nm, pm)  # [CLS] [SEP]: no system prompt
    se, _ = enc.encode([""])
    assert not torch.allclose(se[0, 0], ne[0, 0], atol=1e-3)  # with the system prompt [CLS] differs


def test_encoder_dtype_and_errors(gemma):
    path, _, _ = gemma
    enc = TextEncoder.from_pretrained(path, system_prompt="", max_length=6, dtype="bf16")
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    emb, _ = enc.encode(["a red circle"])
    assert emb.dtype == torch.float32  # states are returned in fp32 whatever the encoder runs in
    ref, _ = TextEncoder.from_pretrained(path, system_prompt="", max_length=6).encode(["a red circle"])
    assert torch.allclose(emb, ref, atol=0.1)
    assert enc.fingerprint()["weights"] == TextEncoder.from_pretrained(path, max_length=6).weights_digest()
    with pytest.raises(ValueError, match="valid: fp32, bf16, fp16"):
        TextEncoder.from_pretrained(path, dtype="int8")
    with pytest.raises(FileNotFoundError, match="text encoder folder"):
        TextEncoder.from_pretrained(path / "missing")
    with pytest.raises(TypeError, match="list of prompt strings"):
        enc.encode("a red circle")


def test_real_minilm_encoder_is_semantic():
    from diffusion_fixtures import minilm_dir

    enc = TextEncoder.from_pretrained(minilm_dir(), system_prompt="", max_length=16)
    emb, mask = enc.encode(["a photo of a cat", "a picture of a cat", "a bowl of hot soup"])
    assert emb.shape == (3, 16, 384) and enc.dim == 384
    pooled = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (3, 384) mean over valid tokens
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0) + 0.2


# ---------------------------------------------------------------------------------------------- embedding cache

CAPTIONS = {
    "shards/1.00/1.00-000000.tar": ["a red circle", "a blue square", "a very long prompt of a green dog and a cat"],
    "shards/2.00/2.00-000000.tar": ["", "a photo of a cat"],
}


def write_captions(root: Path) -> Path:
    """A samples table holding CAPTIONS (no shards: the cache reads captions only)."""
    rows = [SampleRow(key=f"k{n}", shard=s, ratio_key="1.00", sample_index=i, image_offset=0, image_size=0,
                      image_ext="jpg", caption=c, width=1, height=1, label=NO_LABEL, url="", sha256=None)
            for n, (s, i, c) in enumerate((s, i, c) for s, caps in CAPTIONS.items() for i, c in enumerate(caps))]
    write_samples(str(root), rows_to_table(rows[::-1], SampleRow))  # any row order
    return root


def test_cache_roundtrip_packing_and_refusal(tmp_path, gemma):
    path, _, _ = gemma
    root = write_captions(tmp_path / "data")
    enc = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
    url = precompute_text_embeddings(str(root), enc, progress=False)
    assert url == text_embedding_dir(str(root))
    cache = TextEmbeddingCache(url, expect=enc.fingerprint())
    keys = [("shards/2.00/2.00-000000.tar", 1), ("shards/1.00/1.00-000000.tar", 2),
            ("shards/1.00/1.00-000000.tar", 0), ("shards/2.00/2.00-000000.tar", 0)]
    emb, mask = cache.lookup([k[0] for k in keys], [k[1] for k in keys])
    ref, ref_mask = enc.encode([CAPTIONS[s][i] for s, i in keys])
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(emb, ref, atol=2e-2)  # fp16 storage
    one, _ = cache.lookup("shards/1.00/1.00-000000.tar", [0])  # one shard name for all samples
    assert torch.equal(one[0], emb[2])
    ne, nm = cache.null(2)
    assert torch.allclose(ne, enc.encode_null(2)[0]) and torch.equal(nm, enc.encode_null(2)[1])
    # only the valid prefix of each caption is stored
    header = read_shard_header(cache.fs, f"{cache.root}/{shard_file('shards/1.00/1.00-000000.tar')}")
    assert header.lengths == [4, 4, 8] and header.dtype == torch.float16
    assert os.path.getsize(header.path) < 16 * 32 * 2 + 1024  # 16 states of 32 fp16, not 3 x 8
    # a different system prompt / max_length / encoder is refused, naming the key
    for other in (TextEncoder.from_pretrained(path, system_prompt="other : ", max_length=8),
                  TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=6)):
        with pytest.raises(ValueError, match="different encoder setup"):
            TextEmbeddingCache(url, expect=other.fingerprint())
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        cache.lookup(["shards/9.tar"], [0])
    with pytest.raises(IndexError, match="outside shard"):
        cache.lookup("shards/2.00/2.00-000000.tar", [2])


def test_cache_parts_resume_and_incomplete(tmp_path, gemma):
    path, _, _ = gemma
    root = write_captions(tmp_path / "data")
    cache_dir = str(tmp_path / "emb")
    enc = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
    precompute_text_embeddings(str(root), enc, cache_dir, progress=False, part=0, num_parts=2)
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        TextEmbeddingCache(cache_dir)  # part 1 has not run: no meta.json yet
    precompute_text_embeddings(str(root), enc, cache_dir, progress=False, part=1, num_parts=2)
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["format"] == 3 and meta["shards"] == {s: len(c) for s, c in CAPTIONS.items()}
    # a re-run skips finished shards (file untouched) ...
    f = tmp_path / "emb" / shard_file("shards/1.00/1.00-000000.tar")
    mtime = f.stat().st_mtime_ns
    precompute_text_embeddings(str(root), enc, cache_dir, progress=False)
    assert f.stat().st_mtime_ns == mtime
    stale = TextEmbeddingCache(cache_dir)
    # ... but rewrites shards made by another setup; until every shard is rewritten there is no meta.json
    other = TextEncoder.from_pretrained(path, system_prompt="other : ", max_length=8)
    precompute_text_embeddings(str(root), other, cache_dir, progress=False, part=0, num_parts=2)
    assert f.stat().st_mtime_ns != mtime and not (tmp_path / "emb" / "meta.json").exists()
    with pytest.raises(ValueError, match="another encoder setup"):  # a reader opened before refuses the new shard
        stale.lookup("shards/1.00/1.00-000000.tar", [0])
    precompute_text_embeddings(str(root), other, cache_dir, progress=False, part=1, num_parts=2)
    assert TextEmbeddingCache(cache_dir, expect=other.fingerprint()).fingerprint["system_prompt"] == "other : "


RECAPTIONS = {("shards/1.00/1.00-000000.tar", 1): ["blue square on white", "a square"],
              ("shards/2.00/2.00-000000.tar", 0): ["an empty frame"]}


def write_caption_table(root: Path) -> dict[tuple[str, int], list[str]]:
    """captions.parquet as the score stage writes it: CAPTIONS as caption 0, RECAPTIONS after it."""
    rows, sets = [], {}
    for shard, caps in CAPTIONS.items():
        for i, cap in enumerate(caps):
            sets[shard, i] = [cap] + RECAPTIONS.get((shard, i), [])
            for c, text in enumerate(sets[shard, i]):
                rows.append(CaptionRow(key=f"{shard}-{i}", shard=shard, sample_index=i, caption_index=c,
                                       source="caption" if c == 0 else f"vlm{c}", caption=text, clip_score=0.2,
                                       score=0.2))
    write_table(join(str(root), CAPTIONS_FILE), rows_to_table(rows, CaptionRow), CAPTIONS_SCHEMA, {})
    return sets


def test_cache_holds_every_caption_and_reads_format_2(tmp_path, gemma):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    path, _, _ = gemma
    root = write_captions(tmp_path / "data")
    enc = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
    single = precompute_text_embeddings(str(root), enc, str(tmp_path / "single"), progress=False)
    sets = write_caption_table(root)
    url = precompute_text_embeddings(str(root), enc, progress=False)
    cache = TextEmbeddingCache(url, expect=enc.fingerprint())
    assert cache.meta["captions"] == {"shards/1.00/1.00-000000.tar": 5, "shards/2.00/2.00-000000.tar": 3}
    want = [(s, i, c) for (s, i), caps in sets.items() for c in range(len(caps))]
    emb, mask = cache.lookup([w[0] for w in want], [w[1] for w in want], [w[2] for w in want])
    ref, ref_mask = enc.encode([sets[s, i][c] for s, i, c in want])
    assert torch.equal(mask, ref_mask) and torch.allclose(emb, ref, atol=2e-2)
    default, _ = cache.lookup("shards/1.00/1.00-000000.tar", [1])  # caption 0 by default
    assert torch.allclose(default[0], enc.encode([CAPTIONS["shards/1.00/1.00-000000.tar"][1]])[0][0], atol=2e-2)
    with pytest.raises(IndexError, match="caption_index 3 outside the 3 captions of sample 1"):
        cache.lookup("shards/1.00/1.00-000000.tar", [1], [3])
    # a changed recaption re-encodes its shard only
    files = {s: tmp_path / "data" / "text_emb" / shard_file(s) for s in CAPTIONS}
    stamps = {s: f.stat().st_mtime_ns for s, f in files.items()}
    precompute_text_embeddings(str(root), enc, progress=False)
    assert {s: f.stat().st_mtime_ns for s, f in files.items()} == stamps
    RECAPTIONS[("shards/2.00/2.00-000000.tar", 0)] = ["an empty white frame"]
    try:
        write_caption_table(root)
        precompute_text_embeddings(str(root), enc, progress=False)
    finally:
        RECAPTIONS[("shards/2.00/2.00-000000.tar", 0)] = ["an empty frame"]
    assert files["shards/1.00/1.00-000000.tar"].stat().st_mtime_ns == stamps["shards/1.00/1.00-000000.tar"]
    assert files["shards/2.00/2.00-000000.tar"].stat().st_mtime_ns != stamps["shards/2.00/2.00-000000.tar"]
    # a format 2 cache (one caption per sample, no caption_counts) still loads, caption 0 only
    meta = json.loads((tmp_path / "single" / "meta.json").read_text())
    (tmp_path / "single" / "meta.json").write_text(json.dumps({**meta, "format": 2}))
    for s in CAPTIONS:
        f = tmp_path / "single" / shard_file(s)
        header = read_shard_header(TextEmbeddingCache(single).fs, str(f))
        old = {"lengths": json.dumps(header.lengths), "num_samples": str(header.num_samples),
               "fingerprint": json.dumps(header.fingerprint)}
        f.write_bytes(st_save(st_load(f.read_bytes()), metadata=old))
    old_cache = TextEmbeddingCache(single, expect=enc.fingerprint())
    got, _ = old_cache.lookup("shards/1.00/1.00-000000.tar", [0, 1, 2])
    assert torch.allclose(got, cache.lookup("shards/1.00/1.00-000000.tar", [0, 1, 2])[0])
    with pytest.raises(IndexError, match="caption_index 1 outside the 1 captions"):
        old_cache.lookup("shards/1.00/1.00-000000.tar", [1], [1])
    (tmp_path / "single" / "meta.json").write_text(json.dumps({**meta, "format": 9}))
    with pytest.raises(ValueError, match="cache format 9, this code reads formats 2, 3"):
        TextEmbeddingCache(single)


def test_cache_on_s3(tmp_path, gemma, monkeypatch):
    """The same cache written to and read from S3 (moto server) through fsspec ranged reads."""
    import s3fs
    from moto.server import ThreadedMotoServer

    path, _, _ = gemma
    root = write_captions(tmp_path / "data")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}"}
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("emb-bucket")
        fs.put(str(root) + "/", "emb-bucket/data/", recursive=True)
        enc = TextEncoder.from_pretrained(path, system_prompt=SYSTEM, max_length=8)
        url = precompute_text_embeddings("s3://emb-bucket/data", enc, storage_options=options, progress=False)
        assert url == text_embedding_dir("s3://emb-bucket/data")
        cache = TextEmbeddingCache(url, expect=enc.fingerprint(), storage_options=options)
        emb, mask = cache.lookup(["shards/2.00/2.00-000000.tar", "shards/1.00/1.00-000000.tar"], [1, 2])
        ref, ref_mask = enc.encode(["a photo of a cat", "a very long prompt of a green dog and a cat"])
        assert torch.equal(mask, ref_mask) and torch.allclose(emb, ref, atol=2e-2)
        # through the node cache (the loader's path): one whole-file fetch per shard file, then local reads
        node = NodeCache(str(tmp_path / "node"), 1 << 30, options)
        cached = TextEmbeddingCache(url, expect=enc.fingerprint(), storage_options=options, node_cache=node)
        again, again_mask = cached.lookup(["shards/2.00/2.00-000000.tar", "shards/1.00/1.00-000000.tar"], [1, 2])
        assert torch.equal(again, emb) and torch.equal(again_mask, mask)
        cached.lookup("shards/1.00/1.00-000000.tar", [0, 1])
        assert node.fetched_files == 2 and len(node.entries()) == 2
        shard = "shards/1.00/1.00-000000.tar"
        assert cached.remote_file(shard).url == f"{url}/{shard_file(shard)}"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
