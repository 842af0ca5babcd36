"""pixeldit-eval end to end on tiny releases with tiny random-weight extractors loaded from disk.

Class model: FID + FD-DINOv2 against an image folder; the numbers equal a recomputation from the written
PNGs and the cached reference statistics; images equal ``generate`` with the recorded protocol and seeds;
the batch size changes nothing; the reference cache is reused; one model-card row per protocol.
Text model: GenEval and DPG-Bench layouts (as their scorers read them) and CLIP score.
User errors: one line, exit code 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_fixtures import (GENEVAL_LINES, minilm_dir, save_tiny_clip, save_tiny_dinov2, save_tiny_inception, write_dpg_prompts,
                           write_geneval_metadata, write_image_folder)
from pixeldit.diffusion import generate
from pixeldit.evaluation import FeatureStats, stats_of
from pixeldit.evaluation.cli import main
from pixeldit.evaluation.extractors import DinoV2Extractor, InceptionExtractor
from pixeldit.evaluation.model_card import BEGIN
from pixeldit.release import from_pretrained
from test_sample_cli import make_release


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extractors")
    return {"inception": save_tiny_inception(tmp / "inc"), "dinov2": save_tiny_dinov2(tmp / "dino"),
            "clip": save_tiny_clip(tmp / "clip")}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_class_model_fid_and_fd_dinov2(tmp_path, extractors, capsys):
    rel = make_release(tmp_path, "debug")
    ref = write_image_folder(tmp_path / "ref", 12)
    metrics = ["--metrics", "fid", "fd_dinov2", "--reference", ref, "--inception", extractors["inception"],
               "--dinov2", extractors["dinov2"]]
    common = [rel, "--classes", "1,3", "--images-per-prompt", "3", "--sampler", "flow_unipc", "--seed", "4",
              "--device", "cpu", "--workers", "0"]
    rc, out, err = run([*common, *metrics, "--steps", "2", "--out", tmp_path / "a", "--batch-size", "4"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    p = res["protocol"]
    assert (p["sampler"], p["steps"], p["cfg_scale"], p["cfg_interval"], p["shift"], p["resolution"]) == \
        ("flow_unipc", 2, 2.0, [0.0, 1.0], 1.5, 32)  # flags, then the release defaults, then its resolution
    assert res["num_images"] == 6 and set(res["metrics"]) == {"fid", "fd_dinov2"} and res["target_kind"] == "release"
    assert res["reference"]["images"] == 12 and not res["reference"]["stats"]["fid"]["cached"]
    assert json.loads(out)["metrics"] == res["metrics"]

    index = [json.loads(ln) for ln in (tmp_path / "a" / "images.jsonl").read_text().splitlines()]
    assert [(e["file"], e["class_id"], e["seed"]) for e in index] == \
        [(f"images/{i:05d}-{j:03d}.png", c, 4 + 3 * i + j) for i, c in enumerate((1, 3)) for j in range(3)]
    pngs = np.stack([np.asarray(Image.open(tmp_path / "a" / e["file"])) for e in index])  # (6, 32, 32, 3)

    # the images are generate() under the recorded protocol from each image's own seed
    model, _ = from_pretrained(rel)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4 + 3 * 1 + 2))
    x = generate(model, {"y": torch.tensor([3])}, model.null_condition(1), noise=noise, sampler="flow_unipc",
                 steps=2, cfg_scale=2.0, cfg_interval=(0.0, 1.0), shift=1.5)
    assert np.array_equal(((x + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy(), pngs[5])

    # the metrics = Frechet distances of the PNGs' features to the cached reference statistics (checked on the
    # 32-d DINOv2; for the 2048-d Inception, whose distance costs seconds, its saved statistics are compared)
    dino = DinoV2Extractor(extractors["dinov2"])
    ref_stats = FeatureStats.from_bytes(Path(res["reference"]["stats"]["fd_dinov2"]["file"]).read_bytes())
    assert ref_stats.n == 12 and ref_stats.fingerprint == res["extractors"]["fd_dinov2"] == dino.fingerprint
    assert stats_of(dino.features(pngs), dino.fingerprint).distance(ref_stats) == \
        pytest.approx(res["metrics"]["fd_dinov2"], rel=1e-9)
    ext = InceptionExtractor(extractors["inception"])
    gen = FeatureStats.from_bytes((tmp_path / "a" / "stats-inception_v3.npz").read_bytes())
    want = stats_of(ext.features(pngs), ext.fingerprint)
    assert gen.n == 6 and np.allclose(gen.mu, want.mu, atol=1e-9) and np.allclose(gen.sigma, want.sigma, atol=1e-9)
    assert Path(res["reference"]["stats"]["fid"]["file"]).name.startswith("inception_v3-32px-n12-")

    # another batch size: same images, same numbers, reference statistics from the cache, still one card row
    rc, _, err = run([*common, *metrics, "--steps", "2", "--out", tmp_path / "b", "--batch-size", "5"], capsys)
    assert rc == 0, err
    res_b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res_b["reference"]["stats"]["fd_dinov2"]["cached"] and res_b["protocol_key"] == res["protocol_key"]
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "b" / e["file"])), im) for e, im in zip(index, pngs))
    for k, v in res["metrics"].items():
        assert res_b["metrics"][k] == pytest.approx(v, rel=1e-6)
    card = (rel / "README.md").read_text()
    assert card.startswith("# release") and card.count(BEGIN) == 1
    rows = [ln for ln in card.splitlines() if ln.startswith("| classes: 1,3")]
    assert len(rows) == 1 and "flow_unipc, 2 steps, CFG 2 on [0, 1], shift 1.5, 32px, seed 4" in rows[0]

    # a different protocol adds a row; --no-save-images keeps no PNGs
    rc, _, err = run([*common, "--metrics", "fd_dinov2", "--reference", ref, "--dinov2", extractors["dinov2"],
                      "--steps", "3", "--no-save-images", "--out", tmp_path / "c"], capsys)
    assert rc == 0, err
    assert not (tmp_path / "c" / "images").exists()
    assert len(json.loads((rel / "eval_results.json").read_text())) == 2


def test_text_model_geneval_dpg_bench_and_clip_score(tmp_path, extractors, capsys):
    rel = make_release(tmp_path, "debug-T2I", text_dim=384, text_len=16)
    meta = write_geneval_metadata(tmp_path / "evaluation_metadata.jsonl")
    common = ["--images-per-prompt", "4", "--steps", "2", "--device", "cpu", "--batch-size", "3", "--text-encoder", str(minilm_dir())]
    rc, _, err = run([rel, "--geneval", meta, *common, "--metrics", "clip_score", "--clip", extractors["clip"],
                      "--out", tmp_path / "g"], capsys)
    assert rc == 0, err
    root = tmp_path / "g" / "geneval"
    assert sorted(p.name for p in root.iterdir()) == ["00000", "00001"]
    for i, line in enumerate(GENEVAL_LINES):  # what GenEval's evaluate_images.py reads
        folder = root / f"{i:05d}"
        with open(folder / "metadata.jsonl") as f:
            assert json.load(f) == line
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
        grid = np.asarray(Image.open(folder / "grid.png"))
        assert grid.shape == (32, 128, 3)
        assert np.array_equal(grid[:, 32:64], np.asarray(Image.open(folder / "samples" / "0001.png")))
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert 0 <= res["metrics"]["clip_score"] <= 100 and res["num_images"] == 8
    assert res["prompt_set"]["kind"] == "geneval" and res["extractors"]["clip_score"].startswith("clip-")

    dpg = write_dpg_prompts(tmp_path / "dpg_bench")  # the same two prompts, same seeds: the same images
    rc, _, err = run([rel, "--dpg-bench", dpg, *common, "--out", tmp_path / "d"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "d" / "dpg_bench").iterdir()) == ["item_a.png", "item_b.png"]
    grid = np.asarray(Image.open(tmp_path / "d" / "dpg_bench" / "item_b.png"))  # 2 x 2: TL, TR, BL, BR
    assert grid.shape == (64, 64, 3)
    for j, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        tile = grid[32 * r:32 * (r + 1), 32 * c:32 * (c + 1)]
        assert np.array_equal(tile, np.asarray(Image.open(root / "00001" / "samples" / f"{j:04d}.png")))


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, extractors, capsys):
    rel = make_release(tmp_path, "debug")
    cases = [
        ([rel, "--classes", "1", "--metrics", "fid", "--reference", tmp_path], "metric fid needs --inception"),
        ([rel, "--classes", "1", "--metrics", "fid", "--reference", tmp_path / "none", "--inception",
          extractors["inception"]], "neither a dataset root"),
        ([rel, "--classes", "1,99"], "class ids [99] outside 0..9"),
        ([rel, "--prompts", tmp_path / "missing.txt"], "prompt file"),
        ([rel, "--prompts", tmp_path / "x.txt"], "text-conditional"),  # a class model given prompts
        ([tmp_path / "nothing", "--classes", "1"], "nothing"),
        ([rel, "--classes", "1", "--resolution", "40"], "multiple of the patch size 16"),
        ([rel, "--dpg-bench", tmp_path, "--images-per-prompt", "2"], "DPG-Bench's scorer"),
    ]
    (tmp_path / "x.txt").write_text("a cat\n")
    for argv, match in cases:
        rc, out, err = run([*argv, "--device", "cpu", "--out", tmp_path / "o"], capsys)
        assert rc == 2 and err.startswith("pixeldit-eval: error: ") and match in err, (argv, err)
        assert err.count("\n") == 1, err


@pytest.mark.slow
def test_run_folder_and_its_release_give_the_same_images(tmp_path, capsys):
    """A real 1-rank training run (2 steps, ZeRO-1): evaluating the run folder (EMA weights straight from the
    checkpoint) writes the same images as evaluating the fp32 release exported from it."""
    import subprocess

    from pixeldit.release.export import export_release
    from test_release import ROOT, write_config
    from train_helpers import torchrun, write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", {"1.00": 4}, per_shard=4)
    cmd, env = torchrun(write_config(tmp_path / "run.yaml", tmp_path / "run", data, "zero1", 2, 2e-3), nproc=1)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rel = export_release(tmp_path / "run", tmp_path / "release", dtype="fp32")
    common = ["--classes", "0,5", "--images-per-prompt", "2", "--steps", "2", "--device", "cpu"]
    for target, out in ((tmp_path / "run", tmp_path / "e_run"), (rel, tmp_path / "e_rel")):
        rc, _, err = run([target, *common, "--out", out], capsys)
        assert rc == 0, err
    a, b = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("e_run", "e_rel"))
    assert (a["target_kind"], b["target_kind"]) == ("checkpoint", "release") and a["protocol"] == b["protocol"]
    assert a["model"]["step"] == 2
    for i in range(4):
        name = f"images/{i // 2:05d}-{i % 2:03d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "e_run" / name)),
                              np.asarray(Image.open(tmp_path / "e_rel" / name)))
