"""Proof that the quickstart learns its prompts: colour AND shape accuracy, trained vs random init, 48 images.

    python -m tools.bench_learning                      # the default pixeldit-quickstart, then 48 images
    python -m tools.bench_learning --quickstart-args "--steps-per-stage 6000"   # any quickstart flags

Runs ``pixeldit-quickstart`` (synthetic shapes -> img2dataset -> shards -> DeepSpeed curriculum -> release
-> its own 12-image check), then samples 24 prompts "a large {colour} {shape} on a {background} background"
x 2 seeds (every colour 8 times, every shape 16 times) from the trained release and from a random-init model of
the same architecture (same prompts and seeds), and reports for each the colour accuracy (chance 1/6) and the
shape accuracy (chance 1/3) of ``pixeldit.evaluation.synthetic_checks``, with the side-by-side grid
``{out}/eval/side_by_side.png``.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from data_pipeline.synthetic import BACKGROUNDS, COLOURS, SHAPES


def prompts() -> list[str]:
    """24 prompts, every colour 4 times and every shape 8 times, backgrounds in turn."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    return [f"a large {colours[i % 6]} {SHAPES[(i // 6 + i) % 3]} on a {backgrounds[(i // 6) % 4]} background"
            for i in range(24)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_learning")
    ap.add_argument("--quickstart-args", default="", help="extra pixeldit-quickstart flags, one string")
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1000, help="seed of the first image (the quickstart's own check: 0)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()

    from launchers.quickstart import build_parser, run_quickstart
    from pixeldit.evaluation.prompt_following import prompt_following

    qs = build_parser().parse_args(["--out", str(out), *shlex.split(a.quickstart_args)])
    summary = run_quickstart(qs)
    check = prompt_following(summary["release"], prompts(), out / "eval", text_encoder=qs.text_encoder,
                             per_prompt=a.per_prompt, seed=a.seed, steps=qs.sample_steps, cfg_scale=qs.cfg_scale,
                             size=qs.resolutions[1])
    n = check["images"]
    print(f"\n| model | colour accuracy ({n} images, chance {1 / len(COLOURS):.0%}) | shape accuracy (chance "
          f"{1 / len(SHAPES):.0%}) |\n|---|---|---|")
    for name in ("trained", "random_init"):
        print(f"| {name.replace('_', ' ')} | {check[name]['colour']:.1%} | {check[name]['shape']:.1%} |")
    print(f"quickstart: {summary['minutes']} min end to end; side by side: {check['side_by_side']}")
    (out / "bench_learning.json").write_text(json.dumps({"quickstart": summary, **check}, indent=1))


if __name__ == "__main__":
    main()
