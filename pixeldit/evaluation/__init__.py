"""Evaluation of PixelDiT releases and checkpoints: generation under a pinned protocol, FID, FD-DINOv2, CLIP score,
and the GenEval / DPG-Bench image layouts.

    from pixeldit.evaluation import EvalProtocol, EvalResources, run_eval
    result = run_eval("releases/xl", EvalProtocol("classes", "0-999", images_per_prompt=50,
                                                  metrics=("fid",), reference="/data/imagenet-val"),
                      "evals/xl", EvalResources(inception="weights/inception-2015-12-05.pt"))

Modules: ``protocol`` (EvalProtocol, EvalResources), ``prompts`` (prompt sets), ``generation``, ``layouts``
(benchmark folder layouts), ``synthetic_checks`` (colour and shape checks on the synthetic set),
``prompt_following`` (those checks on samples of a release and of a random-init twin, side-by-side grid),
``extractors`` (Inception via clean-fid, DINOv2, CLIP), ``frechet`` (the distance
and feature statistics), ``reference`` (cached reference statistics), ``model_card``, ``run`` (run_eval),
``cli`` (pixeldit-eval).
"""
from .frechet import FeatureStats, StatsAccumulator, frechet_distance, stats_of
from .prompts import PROMPT_KINDS, PromptEntry, PromptSet, load_prompt_set
from .protocol import METRICS, EvalProtocol, EvalResources
from .run import run_eval

__all__ = ["FeatureStats", "StatsAccumulator", "frechet_distance", "stats_of", "PROMPT_KINDS", "PromptEntry",
           "PromptSet", "load_prompt_set", "METRICS", "EvalProtocol", "EvalResources", "run_eval"]
