"""Proof that the main job learns: run it longer, then check that sample colours follow the prompts.

    python -m tools.bench_learning                      # ~5 min on 2 CPU cores
    python -m tools.bench_learning --steps-per-stage 3000 --stage2-steps 300 --images 1200

Runs ``pixeldit-quickstart`` (synthetic shapes -> img2dataset -> shards -> DeepSpeed curriculum -> release)
with more data and steps, then samples the same prompts with the same seeds from
- the trained release, and
- a random-init model of the same architecture (a fresh PixelDiT: zero-initialised modulation and head,
  so it returns the starting noise),
and reports the colour accuracy of each (``pixeldit.evaluation.synthetic_checks``: the dominant colour of the shape must be
the prompt's colour; chance is 1/6).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixeldit.evaluation.synthetic_checks import COLOURS, colour_accuracy_of_folder

SHAPES_AND_BACKGROUNDS = [("circle", "white"), ("square", "black"), ("triangle", "grey"), ("circle", "pale blue")]


def prompts() -> list[str]:
    return [f"a large {c} {s} on a {b} background" for c in COLOURS for s, b in SHAPES_AND_BACKGROUNDS]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_learning")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--steps-per-stage", type=int, default=1200)
    ap.add_argument("--stage2-steps", type=int, default=150)
    ap.add_argument("--resolutions", type=int, nargs=2, default=(64, 128))
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--per-prompt", type=int, default=2)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()

    from launchers.quickstart import default_text_encoder
    from launchers.quickstart import main as quickstart

    text_encoder = default_text_encoder()
    if quickstart(["--out", str(out), "--images", str(a.images), "--steps-per-stage", str(a.steps_per_stage),
                   "--stage2-steps", str(a.stage2_steps), "--resolutions", *map(str, a.resolutions),
                   "--ema-decay", "0.995", "--sample-steps", str(a.sample_steps), "--text-encoder", text_encoder]):
        raise SystemExit("pixeldit-quickstart failed (see the line above)")

    from pixeldit.models import build_model
    from pixeldit.release import ReleaseConfig
    from pixeldit.release.writer import save_release
    from pixeldit.release.sample import run as sample

    trained_cfg = ReleaseConfig.load(out / "release")
    random_release = save_release(build_model(trained_cfg.args()).state_dict(), trained_cfg, out / "release_random_init")
    res = a.resolutions[1]
    results = {}
    for name, release in (("trained", out / "release"), ("random init", random_release)):
        folder = out / f"eval_{name.replace(' ', '_')}"
        args = ["--model", str(release), "--out", str(folder), "--steps", str(a.sample_steps), "--cfg-scale",
                str(a.cfg_scale), "--height", str(res), "--width", str(res), "--num-per-prompt", str(a.per_prompt),
                "--seed", "1000", "--text-encoder", text_encoder]
        for p in prompts():
            args += ["--prompt", p]
        sample(args)
        results[name] = colour_accuracy_of_folder(folder)
    n = len(prompts()) * a.per_prompt
    print(f"\n| model | colour accuracy ({n} images, chance {1 / len(COLOURS):.0%}) |\n|---|---|")
    for name, acc in results.items():
        print(f"| {name} | {acc:.1%} |")
    (out / "bench_learning.json").write_text(json.dumps({"images": n, **results}, indent=1))


if __name__ == "__main__":
    main()
