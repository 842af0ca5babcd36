"""``pixeldit-ledger``: which samples a run trained on, up to any step, computed from the plan.

    pixeldit-ledger runs/t2i --step 120000 > trained.tsv        # step, root, key, caption of every draw
    pixeldit-ledger runs/t2i --step 120000 --unique --out keys.tsv

For opt-out and takedown requests (was this image trained on, and until when?) and for attributing a loss
spike to its samples, without per-step key logs: the loader's plan (pixeldit/train/bucket_sampler.py) is a
pure function of the dataset, the run config and the seed, and every checkpoint's meta.json lists where each
stage's loader started (``data_segments``: stage, optimizer step, epoch / global batch, global batch size,
the roots' fingerprints, damaged shards left out). The ledger rebuilds those plans and walks them: optimizer
step s of a stage consumes one global batch, so it lists exactly the draws of steps 1..N (a step skipped for
a non-finite loss drew its batch too; an undecodable sample replaced in its micro-batch is listed as drawn),
each with the caption_index it was trained with (0: the samples.parquet caption; roots with captions.parquet
draw one per use, ``SourceSet.draw_captions``). ``--unique`` lists each (root, key) once, at its first step.
The global batches of rolled-back loss spikes (``pixeldit.train.spikes``: the skip list of the checkpoint's
meta.json and of ``{run_dir}/spikes/skips.json``) were never trained on: the walk passes over them as the
loader did.

Inputs: ``{run_dir}/config.yaml`` and the newest checkpoint's meta.json (credentials from the environment,
as for training). A dataset root that changed since it was trained on (its committed shards differ from the
recorded fingerprint) is refused with the root named: the plan of a different table is a different plan.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from data_pipeline.dataset_format import ShardProblem
from pixeldit import run_folder
from pixeldit.errors import CheckpointError, CliParser, DataError, cli_main
from pixeldit.s3 import configure_s3
from pixeldit.storage import REDACTED, atomic_local_file

from .config import RunConfig, from_dict, validate
from .curriculum import Curriculum
from .loader import build_plan
from .sources import open_sources
from .spikes import ledger_skips, positions, skip_forward


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The config a run saved (redacted credentials dropped: they come from the environment)."""
    path = Path(run_dir) / run_folder.RUN_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a run folder (the trainer saves its config there)")
    tree = yaml.safe_load(path.read_text()) or {}
    options = tree.get("data", {}).get("storage_options", {})
    tree.setdefault("data", {})["storage_options"] = _without_redacted(options)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def _without_redacted(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _without_redacted(v) for k, v in tree.items() if v != REDACTED}
    return tree


def ledger(run_dir: str | os.PathLike, step: int) -> Iterator[tuple[int, str, str, int]]:
    """(optimizer step, root, sample key, caption_index) of every sample drawn by steps 1..``step``, in order
    (the run folder and the step are checked before the first draw is produced)."""
    cfg = load_run_config(run_dir)
    configure_s3(cfg.data.s3)
    # a damaged `latest` falls back to the newest intact step folder, as the trainer's resume does
    latest, note = run_folder.find_latest(run_folder.checkpoints_dir(run_dir), cfg.checkpoint.fallback)
    if note:
        print(f"pixeldit-ledger: note: {note}", file=sys.stderr, flush=True)
    if latest is None:
        raise CheckpointError(f"{run_dir}: no checkpoint yet, so no record of where the loaders started")
    meta = run_folder.read_meta(latest)
    segments = meta.get("data_segments")
    if not segments:
        raise CheckpointError(f"{latest}/meta.json has no data_segments: the run was trained before the ledger "
                              f"existed; its samples cannot be listed from the plan")
    curriculum = Curriculum(cfg.stages)
    if not 0 <= step <= curriculum.total_steps:
        raise ValueError(f"--step {step} outside 0..{curriculum.total_steps} (the run's curriculum)")
    return _draws(cfg, curriculum, segments, latest, step, ledger_skips(run_dir, meta))


def _draws(cfg: RunConfig, curriculum: Curriculum, segments: list[dict[str, Any]], latest: Path,
           step: int, skips: list[dict[str, Any]]) -> Iterator[tuple[int, str, str, int]]:
    for stage_index in range(curriculum.stage_of(max(step - 1, 0)) + 1):
        span = curriculum.span(stage_index)
        own = sorted((s for s in segments if s["stage"] == stage_index), key=lambda s: s["step"])
        last = min(step, span.end)
        if last <= span.start:
            continue
        if not own or own[0]["step"] != span.start:
            raise CheckpointError(f"{latest}/meta.json: no loader record from the start of stage {stage_index} "
                                  f"(step {span.start}); the ledger cannot list steps {span.start + 1}..{last}")
        for k, seg in enumerate(own):
            end = min(last, own[k + 1]["step"] if k + 1 < len(own) else last)
            if end > seg["step"]:
                yield from _segment_draws(cfg, stage_index, seg, end, positions(skips, stage_index))


def _segment_draws(cfg: RunConfig, stage_index: int, seg: dict[str, Any], end: int,
                   skipped: frozenset[tuple[int, int]]) -> Iterator[tuple[int, str, str, int]]:
    left_out = {root: [ShardProblem(s, "left out during training") for s in shards]
                for root, shards in seg.get("left_out", {}).items()}
    problems = {src.path: left_out.get(src.path, []) for src in cfg.stages[stage_index].data_sources()}
    saved = cfg.data.skip_damaged_shards
    cfg.data.skip_damaged_shards = True  # the same rows as in training, whatever the shards look like now
    try:
        sources, selection, _ = open_sources(cfg, stage_index, problems=problems)
    finally:
        cfg.data.skip_damaged_shards = saved
    for now, then in zip(sources.fingerprints(), seg["sources"]):
        if now != then:
            raise DataError(f"dataset root {then['root']} changed since stage {stage_index} trained on it "
                            f"({then['samples']} samples, shards digest {then['digest']}; now {now['samples']}, "
                            f"{now['digest']}): the plan of another table lists other samples")
    plan = build_plan(cfg, stage_index, sources, selection, int(seg["global_batch"]))
    temperature = float(seg.get("caption_temperature", cfg.data.caption_temperature))
    batches_in = lambda e: len(plan.epoch(e))  # noqa: E731
    # global batches of rolled-back loss spikes were never trained on (pixeldit.train.spikes): walked past
    epoch, batch = skip_forward(int(seg["epoch"]), int(seg["batch"]), batches_in, skipped)
    for step in range(int(seg["step"]) + 1, end + 1):
        ep = plan.epoch(epoch)
        rows = ep.rows[batch]
        captions = sources.draw_captions(rows, ep.positions(batch), seed=plan.draw_seed, epoch=epoch,
                                         temperature=temperature)
        for row, caption in zip(rows, captions):
            s, r = sources.locate(int(row))
            yield step, sources.roots[s], sources.indexes[s].keys[r].as_py(), int(caption)
        epoch, batch = skip_forward(epoch, batch + 1, batches_in, skipped)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="pixeldit-ledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (config.yaml, checkpoints/)")
    p.add_argument("--step", type=int, required=True, help="list the samples of optimizer steps 1..STEP")
    p.add_argument("--unique", action="store_true", help="each (root, key) once, at its first step")
    p.add_argument("--out", default="-", help="TSV file to write (default: stdout)")
    return p


def write_ledger(out, run_dir: str, step: int, unique: bool) -> None:
    seen: set[tuple[str, str]] = set()
    draws = ledger(run_dir, step)
    out.write("step\troot\tkey\n" if unique else "step\troot\tkey\tcaption_index\n")
    for s, root, key, caption in draws:
        if not unique:
            out.write(f"{s}\t{root}\t{key}\t{caption}\n")
        elif (root, key) not in seen:
            seen.add((root, key))
            out.write(f"{s}\t{root}\t{key}\n")


def _main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.out == "-":
        write_ledger(sys.stdout, a.run_dir, a.step, a.unique)
    else:
        with atomic_local_file(a.out) as tmp, open(tmp, "w") as f:
            write_ledger(f, a.run_dir, a.step, a.unique)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main("pixeldit-ledger", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
