"""``run_eval(target, protocol, out)``: generate with a pinned protocol, measure, write results.

Order of work (everything that can fail on a user's input fails before the first image is generated):
 1. resources and protocol checked, the prompt set read, the extractors loaded from their local weights,
    the model loaded and the protocol resolved against its release defaults;
 2. reference statistics per extractor (cached: ``reference.py``);
 3. generation batch by batch (``generation.py``): each batch is written in its layout (``layouts.py``),
    fed to the extractors (features accumulated in float64) and, for CLIP score, scored against its prompts;
 4. ``{out}/results.json`` (atomic) and the generated set's statistics ``{out}/stats-{extractor}.npz``;
    for a release target its ``eval_results.json`` and model card table (``model_card.py``).

A plain function of picklable arguments, so a launcher can submit it as a submitit job; the CLI
(``pixeldit-eval``) is a thin wrapper.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pixeldit.storage import write_bytes_atomic

from .extractors import ClipScorer, DinoV2Extractor, InceptionExtractor
from .frechet import StatsAccumulator
from .generation import Conditioner, generate_batches, image_items, load_target
from .layouts import ImageWriter
from .model_card import update_model_card
from .prompts import load_prompt_set
from .protocol import EvalProtocol, EvalResources
from .reference import ReferenceSet, reference_stats

RESULTS_FILE = "results.json"
FD_METRICS = {"fid": InceptionExtractor, "fd_dinov2": DinoV2Extractor}  # metric -> extractor class
_WEIGHTS = {"fid": "inception", "fd_dinov2": "dinov2"}  # metric -> EvalResources field


def run_eval(target: str, protocol: EvalProtocol, out: str, resources: EvalResources | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Evaluate ``target`` (release, run or step folder) under ``protocol``; returns the results dict."""
    t0 = time.time()
    res = resources or EvalResources()
    res.check(protocol)
    pset = load_prompt_set(protocol.prompts, protocol.source)
    extractors = {m: FD_METRICS[m](getattr(res, _WEIGHTS[m]), res.device) for m in protocol.metrics if m in FD_METRICS}
    clip = ClipScorer(res.clip, res.device) if "clip_score" in protocol.metrics else None
    model, cfg, target_kind, trained_with = load_target(target, res.device)
    protocol = protocol.resolved(cfg.sampler, cfg.resolution)
    if protocol.resolution % model.args.patch_size:
        raise ValueError(f"resolution {protocol.resolution} must be a multiple of the patch size "
                         f"{model.args.patch_size}")
    conditioner = Conditioner(model, cfg, pset, res, trained_with)

    reference: dict[str, Any] = {}
    ref_stats = {}
    if extractors:
        ref = ReferenceSet.open(protocol.reference, protocol.reference_images)
        reference = {"root": protocol.reference, "images": len(ref.rows), "digest": ref.digest[:16], "stats": {}}
        for metric, ext in extractors.items():
            stats, path, cached = reference_stats(ref, ext, protocol.resolution, res.stats_cache, res.batch_size,
                                                  res.workers, progress)
            ref_stats[metric] = stats
            reference["stats"][metric] = {"file": path, "cached": cached}

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ImageWriter(out_dir, pset.kind, protocol) if res.save_images or pset.kind in ("geneval", "dpg_bench") \
        else None
    accumulators = {m: StatsAccumulator(ext.fingerprint) for m, ext in extractors.items()}
    clip_scores: list[np.ndarray] = []
    items = image_items(pset, protocol)
    bar = tqdm(total=len(items), desc="generate", disable=not progress, leave=False)
    for batch, images in generate_batches(model, conditioner, items, protocol, res):
        if writer is not None:
            writer.add(batch, images)
        for metric, ext in extractors.items():
            accumulators[metric].add(ext.features(images))
        if clip is not None:
            clip_scores.append(clip.scores(images, [it.entry.prompt for it in batch]))
        bar.update(len(batch))
    bar.close()

    metrics: dict[str, float] = {}
    for metric, acc in accumulators.items():
        stats = acc.stats()
        write_bytes_atomic(str(out_dir / f"stats-{extractors[metric].name}.npz"), stats.to_bytes())
        metrics[metric] = stats.distance(ref_stats[metric])
    if clip is not None:
        metrics["clip_score"] = float(np.concatenate(clip_scores).mean())
    result = {
        "target": str(target), "target_kind": target_kind,
        "model": {"size": model.args.name, "step": cfg.step, "stage": cfg.stage, "weights": cfg.weights,
                  "dtype": cfg.dtype},
        "protocol": protocol.to_dict(), "protocol_key": protocol.key, "sampling": protocol.sampling_summary(),
        "prompt_set": {"kind": pset.kind, "source": pset.source, "digest": pset.digest, "prompts": len(pset.entries)},
        "num_images": len(items), "metrics": metrics,
        "extractors": {**{m: e.fingerprint for m, e in extractors.items()}, **({"clip_score": clip.fingerprint}
                                                                            if clip is not None else {})},
        "reference": reference,
        "outputs": {"images": str(writer.folder) if writer else None,
                    "index": str(writer.close()) if writer else None},
        "versions": {"torch": torch.__version__},
        "time_s": round(time.time() - t0, 1), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    write_bytes_atomic(str(out_dir / RESULTS_FILE), (json.dumps(result, indent=1) + "\n").encode())
    if target_kind == "release" and res.model_card:
        result["model_card"] = str(update_model_card(target, result))
    return result
