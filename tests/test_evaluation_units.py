"""Evaluation units: the Frechet distance against the scipy-sqrtm reference, feature statistics, the extractors
(tiny random weights through the real loading code), prompt sets, the protocol, the model card table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from eval_fixtures import (GENEVAL_LINES, save_tiny_clip, save_tiny_dinov2, save_tiny_inception, write_dpg_prompts,
                           write_geneval_metadata, write_image_folder)
from pixeldit.evaluation import EvalProtocol, EvalResources, FeatureStats, StatsAccumulator, frechet_distance, stats_of
from pixeldit.evaluation.extractors import ClipScorer, DinoV2Extractor, InceptionExtractor
from pixeldit.evaluation.model_card import BEGIN, END, update_model_card
from pixeldit.evaluation.prompts import load_prompt_set, parse_class_ids
from pixeldit.evaluation.reference import ReferenceSet, reference_stats
from pixeldit.release import SamplerDefaults


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The reference formula (pytorch-fid): sqrtm of the product, real part, trace."""
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def features(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, as network features are
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


@pytest.mark.parametrize("d,scale,shift", [(16, 1.0, 0.3), (64, 1.5, -0.1), (64, 1.0, 0.0)])
def test_frechet_equals_the_scipy_reference(d, scale, shift):
    a, b = features(500, d, 0), features(400, d, 1, scale, shift)
    sa, sb = stats_of(a, "x"), stats_of(b, "x")
    ours, ref = sa.distance(sb), scipy_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ref > 1e-3 and abs(ours - ref) <= 1e-6 * ref, (ours, ref)
    assert np.allclose(sa.mu, a.mean(0)) and np.allclose(sa.sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_of_a_set_against_itself_is_zero():
    for n, d in ((500, 64), (40, 64)):  # also rank-deficient (fewer samples than dimensions)
        s = stats_of(features(n, d, 2, shift=3.0), "x")
        assert abs(s.distance(s)) < 1e-12 * np.trace(s.sigma), (n, d, s.distance(s))


def test_frechet_closed_forms_and_input_checks():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2; diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]])) == \
        pytest.approx(4 + 1, rel=1e-12)
    a, b = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == \
        pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="different extractors"):
        stats_of(features(10, 3, 0), "a").distance(stats_of(features(10, 3, 1), "b"))


def test_streaming_statistics_and_their_file_format():
    f = features(300, 32, 3, shift=50.0)  # a large mean: the running sums are centred
    acc = StatsAccumulator("fp")
    for chunk in np.array_split(f, 7):
        acc.add(chunk)
    s, whole = acc.stats(), stats_of(f, "fp")
    assert s.n == 300 and np.allclose(s.mu, whole.mu, rtol=0, atol=1e-12)
    assert np.allclose(s.sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-10)
    back = FeatureStats.from_bytes(s.to_bytes())
    assert back.n == 300 and back.fingerprint == "fp" and np.array_equal(back.mu, s.mu)
    with pytest.raises(ValueError, match="cache.npz: not a feature statistics file"):
        FeatureStats.from_bytes(b"not an npz", where="cache.npz")
    with pytest.raises(ValueError, match="at least 2"):
        StatsAccumulator("x").stats()
    with pytest.raises(ValueError, match="finite"):
        StatsAccumulator("x").add(np.full((2, 3), np.nan))


def test_inception_extractor_is_clean_fid_on_the_local_file(tmp_path):
    path = save_tiny_inception(tmp_path / "inc")
    images = np.random.default_rng(0).integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)
    ext = InceptionExtractor(path)  # the file, or its folder
    got = ext.features(images)
    assert got.shape == (3, 2048) and got.dtype == np.float64
    assert np.array_equal(InceptionExtractor(tmp_path / "inc").features(images), got)
    model = torch.jit.load(str(path))  # by hand: PIL bicubic per channel in float to 299 (clean-fid's "clean")
    resized = np.stack([np.stack([np.asarray(Image.fromarray(im[..., c].astype(np.float32), mode="F")
                                             .resize((299, 299), Image.BICUBIC)).clip(0, 255) for c in range(3)])
                        for im in images])
    with torch.no_grad():
        want = model.layers((torch.from_numpy(resized) - 128) / 128).reshape(3, 2048).double().numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    other = InceptionExtractor(save_tiny_inception(tmp_path / "inc2", seed=1))
    assert other.fingerprint != ext.fingerprint  # different weights, different cache entries
    (tmp_path / "wrong.pt").write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        InceptionExtractor(tmp_path / "wrong.pt")


def test_dinov2_extractor_gives_the_cls_token_at_224(tmp_path):
    from transformers import Dinov2Model

    path = save_tiny_dinov2(tmp_path / "dino")
    images = np.random.default_rng(1).integers(0, 256, size=(2, 48, 64, 3), dtype=np.uint8)
    got = DinoV2Extractor(path).features(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = Dinov2Model.from_pretrained(path).eval()(pixel_values=x)
    assert got.shape == (2, 32)
    assert np.allclose(got, out.pooler_output.double().numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="DINOv2 teacher folder"):
        DinoV2Extractor(tmp_path / "missing")


def test_clip_score_of_images_and_prompts(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    path = save_tiny_clip(tmp_path / "clip")
    scorer = ClipScorer(path)
    images = np.random.default_rng(2).integers(0, 256, size=(2, 48, 40, 3), dtype=np.uint8)
    prompts = ["a photo of a red cat", "a bench"]
    got = scorer.scores(images, prompts)
    model, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # shorter side 40 -> 32, centre crop
    x = torch.nn.functional.interpolate(x, size=(38, 32), mode="bicubic", antialias=True)[:, :, 3:35].clamp(0, 1)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        out = model(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1),
                    **tok(prompts, padding=True, return_tensors="pt"))
    want = 100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)
    assert got.shape == (2,) and np.allclose(got, want.double().numpy(), atol=1e-4)
    assert ((got >= 0) & (got <= 100)).all()
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.scores(images, prompts[:1])
    save_tiny_dinov2(tmp_path / "dino")
    with pytest.raises(ValueError, match="not a CLIP model"):
        ClipScorer(tmp_path / "dino")


def test_reference_statistics_are_cached_per_root_and_extractor(tmp_path):
    root = write_image_folder(tmp_path / "ref", 9)
    ext = InceptionExtractor(save_tiny_inception(tmp_path / "inc"))
    ref = ReferenceSet.open(str(root), max_images=100)
    assert len(ref.rows) == 9
    stats, path, cached = reference_stats(ref, ext, 32, batch_size=4)
    assert not cached and path.startswith(str(root / "eval_stats")) and stats.n == 9
    again, path2, cached = reference_stats(ReferenceSet.open(str(root), 100), ext, 32, batch_size=5)
    assert cached and path2 == path and np.array_equal(again.sigma, stats.sigma)
    # another subset, resolution or extractor: another entry; a changed folder: another identity
    assert reference_stats(ReferenceSet.open(str(root), 5), ext, 32)[1] != path
    assert reference_stats(ref, ext, 48)[1] != path
    other = InceptionExtractor(save_tiny_inception(tmp_path / "inc2", seed=1))
    assert reference_stats(ref, other, 32, cache_dir=str(tmp_path / "cache"))[1].startswith(str(tmp_path / "cache"))
    write_image_folder(tmp_path / "ref", 10)
    assert ReferenceSet.open(str(root), 100).digest != ref.digest
    with pytest.raises(FileNotFoundError, match="neither a dataset root"):
        ReferenceSet.open(str(tmp_path / "nothing"), 10)


def test_reference_from_a_dataset_root(tmp_path):
    from train_helpers import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "data", {"1.00": 6, "0.50": 4}, per_shard=4)
    ref = ReferenceSet.open(str(root), max_images=7)
    assert len(ref.rows) == 7 and list(ref.rows) == sorted(ref.rows)  # a seeded subset of the 10, in order
    batches = list(ref.batches(32, batch_size=3))
    assert [b.shape for b in batches] == [(3, 32, 32, 3)] * 2 + [(1, 32, 32, 3)] and batches[0].dtype == np.uint8
    ext = DinoV2Extractor(save_tiny_dinov2(tmp_path / "dino"))
    stats, path, _ = reference_stats(ref, ext, 32)
    assert stats.n == 7 and path.startswith(str(root / "eval_stats" / "dinov2-32px-n7-"))


def test_prompt_sets(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  a blue square \n")
    s = load_prompt_set("prompts", str(txt))
    assert [(e.key, e.prompt) for e in s.entries] == [("00000", "a red circle"), ("00001", "a blue square")]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"id": "x1", "prompt": "a cat"}\n{"id": "x2", "prompt": "a dog"}\n')
    assert [e.key for e in load_prompt_set("prompts", str(jl)).entries] == ["x1", "x2"]
    assert parse_class_ids("0-2, 7") == [0, 1, 2, 7]
    assert [e.class_id for e in load_prompt_set("classes", "3,1").entries] == [3, 1]
    g = load_prompt_set("geneval", str(write_geneval_metadata(tmp_path / "meta.jsonl")))
    assert [e.key for e in g.entries] == ["00000", "00001"] and g.entries[1].metadata == GENEVAL_LINES[1]
    d = load_prompt_set("dpg_bench", str(write_dpg_prompts(tmp_path / "dpg")))
    assert [(e.key, e.prompt) for e in d.entries] == [("item_a", "a photo of a bench"), ("item_b", "a photo of a red cat")]
    assert g.digest != d.digest and s.digest == load_prompt_set("prompts", str(txt)).digest
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object"):
        load_prompt_set("prompts", str(bad))
    with pytest.raises(ValueError, match='no "tag"'):
        load_prompt_set("geneval", str(jl))
    with pytest.raises(ValueError, match="bad part '5-2'"):
        parse_class_ids("1,5-2")
    with pytest.raises(FileNotFoundError, match="prompt file"):
        load_prompt_set("prompts", str(tmp_path / "missing.txt"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        load_prompt_set("prompts", str(dup))


def test_protocol_validation_resolution_and_seeds():
    p = EvalProtocol("classes", "0-9", images_per_prompt=3, seed=10, steps=8)
    r = p.resolved(SamplerDefaults("flow_dpm", 100, 3.25, (0.1, 1.0), 1.0), 256)
    assert (r.sampler, r.steps, r.cfg_scale, r.cfg_interval, r.shift, r.resolution) == \
        ("flow_dpm", 8, 3.25, (0.1, 1.0), 1.0, 256)
    assert r.key != p.key and r.image_seed(2, 1) == 10 + 2 * 3 + 1
    assert json.loads(json.dumps(r.to_dict()))["cfg_interval"] == [0.1, 1.0]
    assert r.sampling_summary() == "flow_dpm, 8 steps, CFG 3.25 on [0.1, 1], shift 1, 256px, seed 10"
    for kw, match in [({"prompts": "parti"}, "valid kinds"), ({"sampler": "ddim"}, "valid samplers"),
                      ({"metrics": ("is",)}, "valid metrics"), ({"metrics": ("fid",)}, "need reference="),
                      ({"prompts": "dpg_bench", "images_per_prompt": 3}, "1 or 4"),
                      ({"metrics": ("clip_score",)}, "needs text prompts"),
                      ({"cfg_interval": (0.5, 0.2)}, "0 <= lo <= hi <= 1")]:
        with pytest.raises(ValueError, match=match):
            EvalProtocol(**{"prompts": "classes", "source": "1", **kw})
    with pytest.raises(ValueError, match="needs --inception"):
        EvalResources().check(EvalProtocol("classes", "1", metrics=("fid",), reference="x"))
    with pytest.raises(ValueError, match="needs --clip"):
        EvalResources().check(EvalProtocol("prompts", "p.txt", metrics=("clip_score",)))


def test_model_card_table_is_one_row_per_protocol(tmp_path):
    (tmp_path / "README.md").write_text("# my release\n\nSome text.\n")

    def result(key, fid, date):
        return {"protocol_key": key, "model": {"step": 7},
                "protocol": {"prompts": "classes", "source": "0-9", "reference": "/data/ref"},
                "prompt_set": {"digest": "abc"}, "num_images": 20, "sampling": "flow_unipc, 8 steps",
                "metrics": {"fid": fid}, "date": date}

    update_model_card(tmp_path, result("k1", 12.5, "d1"))
    update_model_card(tmp_path, result("k2", 10.0, "d2"))
    update_model_card(tmp_path, result("k1", 11.0, "d3"))  # same protocol again: replaces its row
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# my release\n\nSome text.\n\n" + BEGIN) and card.count(BEGIN) == 1 and END in card
    rows = [ln for ln in card.splitlines() if ln.startswith("| classes")]
    assert len(rows) == 2 and "| 10.000 |" in rows[0] and "| 11.000 |" in rows[1] and "| - |" in rows[1]
    assert [r["key"] for r in json.loads((tmp_path / "eval_results.json").read_text())] == ["k2", "k1"]
