"""Benchmark: the score stage (images/s) and the near-duplicate searches, on this machine.

    python -m tools.bench_score --images 128 --image-size 512 --models tiny b32 --threads 1

Steps:
  1. a committed root of ``--images`` JPEGs (quality 90, ``--image-size`` on the longer side, 4:3), written with
     data_pipeline's shard writer (1000 per shard) and committed through dataset_format;
  2. per ``--models`` entry a random-weight transformers CLIP with the shapes of OpenAI's ViT-B/32 or ViT-L/14
     (the compute of the real model; no download) and a word-level tokenizer, plus a LAION-shaped aesthetic
     head; ``score_dataset`` end to end (decode, pHash, image and caption embeddings, aesthetic, parts, commit),
     timed from a cold start of the stage without model loading;
  3. decode + pHash alone (the stage's model-free part), and the dedupe searches on random data:
     ``phash_pairs`` (multi-index, 4 bits) and ``embedding_pairs`` (exact, blocked) at ``--dedupe-n`` items.
Prints a markdown table. ``--device cuda`` runs the models on a GPU (fp16).
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np

CLIP_SHAPES = {  # vision (width, layers, heads, patch, image), text (width, layers, heads), projection
    "tiny": ((64, 2, 2, 16, 224), (64, 2, 2), 64),
    "b32": ((768, 12, 12, 32, 224), (512, 12, 8), 512),
    "l14": ((1024, 24, 16, 14, 224), (768, 12, 12), 768),
}


def write_root(root: str, n: int, size: int) -> None:
    from PIL import Image

    from data_pipeline.dataset_format import NO_LABEL, SampleRow, ShardRow, rows_to_table, shard_name, write_index
    from data_pipeline.tarshard import ShardWriter

    rng = np.random.default_rng(0)
    w, h = size, size * 3 // 4
    rows, manifest = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for s in range(-(-n // 1000)):
            rel = shard_name("0.75", s)
            writer = ShardWriter(os.path.join(root, rel), scratch)
            for i in range(min(1000, n - s * 1000)):
                key = f"{s * 1000 + i:08d}"
                grid = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                caption = f"a picture of coloured squares number {key}"
                span = writer.add(key, buf.getvalue(), "jpg", caption, {"key": key}, None)
                rows.append(SampleRow(key=key, shard=rel, ratio_key="0.75", sample_index=i, image_offset=span.offset,
                                      image_size=span.size, image_ext="jpg", caption=caption, width=w, height=h,
                                      label=NO_LABEL, url="", sha256=None))
            count, nbytes = writer.num_samples, writer.commit()
            manifest.append(ShardRow(shard=rel, ratio_key="0.75", bucket_height=h, bucket_width=w, num_samples=count,
                                     bytes=nbytes, min_width=w, max_width=w, min_height=h, max_height=h))
    write_index(root, rows_to_table(rows, SampleRow), {"total": n, "ok": n}, rows_to_table(manifest, ShardRow), {})


def save_clip(folder: str, shape: str) -> None:
    """Random CLIP weights with the named shapes and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "picture", "of", "coloured", "squares", "number"]
    vocab = {wd: i for i, wd in enumerate(words + [f"{i:08d}" for i in range(10000)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    (vw, vl, vh, patch, image), (tw, tl, th), proj = CLIP_SHAPES[shape]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=tw, intermediate_size=4 * tw,
                                      num_hidden_layers=tl, num_attention_heads=th, max_position_embeddings=77,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3),
                     vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                                        num_attention_heads=vh, image_size=image, patch_size=patch),
                     projection_dim=proj)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def save_head(path: str, dim: int) -> None:
    import torch
    from safetensors.torch import save_file

    dims = [dim, 1024, 128, 64, 16, 1]
    state = {}
    for n, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        state[f"layers.{2 * n}.weight"] = torch.randn(b, a) / a ** 0.5
        state[f"layers.{2 * n}.bias"] = torch.zeros(b)
    save_file(state, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=512, help="longer side of the stored JPEGs (4:3)")
    ap.add_argument("--models", nargs="+", default=["b32"], choices=sorted(CLIP_SHAPES))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads and decode threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dedupe-n", type=int, default=20000)
    a = ap.parse_args(argv)
    import torch

    from data_pipeline.dataset_format import read_samples
    from data_pipeline.dedupe import embedding_pairs, phash_pairs
    from data_pipeline.score import ScoreConfig, decode_for_scoring, score_dataset

    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-score-") as work:
        root = os.path.join(work, "data")
        write_root(root, a.images, a.image_size)
        samples = read_samples(root).to_pylist()
        blobs = []
        for r in samples:
            with open(os.path.join(root, r["shard"]), "rb") as f:
                f.seek(r["image_offset"])
                blobs.append(f.read(r["image_size"]))
        decode_for_scoring(blobs[0], 224)  # imports (imagehash, scipy) outside the timing
        t = time.perf_counter()
        for b in blobs:
            decode_for_scoring(b, 224)
        dt = time.perf_counter() - t
        rows.append((f"decode (draft) + pHash, 1 thread, {a.image_size}x{a.image_size * 3 // 4} JPEG", len(blobs),
                     dt))
        for shape in a.models:
            clip = os.path.join(work, f"clip-{shape}")
            save_clip(clip, shape)
            head = os.path.join(work, f"head-{shape}.safetensors")
            save_head(head, CLIP_SHAPES[shape][2])
            cfg = ScoreConfig(clip=clip, aesthetic=head, batch_size=a.batch_size, device=a.device,
                              decode_threads=a.threads, progress=False, overwrite=True)
            s = score_dataset(root, cfg)
            rows.append((f"score stage, CLIP {shape} shapes, {a.device}, batch {a.batch_size}, {a.threads} threads "
                         f"(end to end, model load {s.load_seconds:.1f}s left out)", s.samples_scored,
                         s.seconds - s.load_seconds))
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=a.dedupe_n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    t = time.perf_counter()
    phash_pairs(hashes, 4)
    rows.append(("phash_pairs, 4 bits (5 bands), uniform hashes", a.dedupe_n, time.perf_counter() - t))
    emb = rng.normal(size=(a.dedupe_n, 768)).astype(np.float16)
    t = time.perf_counter()
    embedding_pairs(emb, 0.95, 4096, a.device)
    rows.append((f"embedding_pairs, D = 768, block 4096, {a.device}", a.dedupe_n, time.perf_counter() - t))
    print("| what | items | seconds | items/s |\n|---|---|---|---|")
    for name, n, sec in rows:
        print(f"| {name} | {n} | {sec:.2f} | {n / sec:.1f} |")


if __name__ == "__main__":
    main()
