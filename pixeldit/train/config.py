"""The one typed run configuration of a training run.

A ``RunConfig`` tree of dataclasses is built from defaults, then a YAML file, then dotted CLI overrides
(``stages.1.lr=5e-5``; CLI > file > defaults), validated up front and saved into the run folder
(``{run_dir}/config.yaml``). The progressive curriculum is ``stages``: a list of ``StageConfig``, each with
its own steps, batch, LR, data path, bucket table and time shift. DeepSpeed settings that also live here
(micro batch, accumulation, precision, gradient clipping) are filled into / checked against the ZeRO JSON
in ``ds_configs/`` by ``pixeldit.train.ds_config.build_ds_config``. ``validate`` checks the config on its
own (every error a ``ConfigError`` naming the key); ``pixeldit.train.preflight`` also checks the files it
names before anything starts.

Example (YAML)::

    run_dir: runs/t2i
    model: {size: T2I}
    deepspeed: {zero: zero2, precision: bf16}
    stages:
      - {name: s512-fixed, steps: 100000, data_path: s3://bkt/data, resolution: 512, buckets: fixed,
         micro_batch: 32, lr: 1.0e-4, warmup_steps: 2000, shift: 3.0, repa: true}
      - {name: s512-aspect, steps: 50000, data_path: s3://bkt/data, resolution: 512, buckets: aspect, shift: 3.0}
      - {name: s1024, steps: 30000, resolution: 1024, buckets: aspect, micro_batch: 8, lr: 5.0e-5, shift: 4.0,
         grad_checkpointing: true, sources: [{path: s3://bkt/data, weight: 3}, {path: s3://bkt/hq, weight: 1}]}
    data: {num_workers: 8, cache_dir: /local/nvme/pixeldit-cache, cache_max_gb: 500, s3: {read_timeout_s: 30}}
    distributed: {startup_timeout_s: 1800, step_timeout_s: 300, sigterm_grace_s: 3}
    node_check: {enabled: true, allreduce_mb: 64, read_mb: 16, disk_fail_checkpoints: 1.5}
    straggler: {every: 50, threshold: 0.2, windows: 3}

Node-health sections (issue 17): ``distributed`` (collective timeouts for start-up / after the first step, the
SIGTERM grace: ``pixeldit.train.collectives``, ``pixeldit.train.signals``), ``node_check`` (the runtime preflight
on every start: matmul, all-reduce bandwidth, free disk, data read rate; ``pixeldit.train.node_check``) and
``straggler`` (per-rank step-time windows; ``pixeldit.train.stragglers``); each key is commented at its field.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipeline.captions import DEFAULT_CAPTION_TEMPERATURE
from data_pipeline.filters import parse_filter
from pixeldit.diffusion.objective import ObjectiveConfig
from pixeldit.diffusion.samplers import SamplerName
from pixeldit.errors import ConfigError
from pixeldit.models import MODEL_SIZES, ModelArgs, get_model_args
from pixeldit.run_folder import VERIFY_MODES
from pixeldit.s3 import resolve_s3_settings
from pixeldit.storage import REDACTED, redact_options, write_text_atomic

BucketMode = Literal["fixed", "aspect"]
Schedule = Literal["constant", "cosine"]
Precision = Literal["bf16", "fp32"]
ZeroConfig = Literal["zero1", "zero2", "zero3", "zero3_offload"]  # the JSONs of ds_configs/ (checked in tests)
WandbMode = Literal["offline", "online", "disabled"]
TextMode = Literal["online", "cached"]
OptimizerName = Literal["adamw", "came"]
VerifyMode = Literal[VERIFY_MODES]  # pixeldit.run_folder.checkpoint_problem
# the dynamo backend that compiles each captured graph: inductor generates fused kernels (the speed-up);
# aot_eager runs the AOT-autograd forward/backward graphs with eager kernels (same capture and autograd path,
# no code generation: a CPU test's choice); eager runs the captured graphs as they are (capture only)
CompileBackend = Literal["inductor", "aot_eager", "eager"]


@dataclass
class ModelConfig:
    size: str = "debug"  # a key of pixeldit.models.MODEL_SIZES
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelArgs fields, e.g. {text_dim: 384}

    def args(self) -> ModelArgs:
        valid = sorted(f.name for f in dataclasses.fields(ModelArgs) if f.name != "name")
        unknown = sorted(set(self.overrides) - set(valid))
        if unknown:
            raise ConfigError(f"model.overrides: unknown ModelArgs fields {unknown}; valid fields: {valid}")
        try:
            return get_model_args(self.size, **self.overrides)
        except ValueError as e:  # an unknown size, or overrides that make an invalid architecture
            raise ConfigError(f"model (size={self.size!r}, overrides={self.overrides}): {e}") from None


@dataclass
class DataSource:
    """One dataset root of a stage and its mixing weight."""

    path: str = ""  # dataset root written by data_pipeline (local folder or s3://bucket/prefix)
    weight: float = 1.0  # share of every epoch's draws (normalised over the stage's sources)


@dataclass
class StageConfig:
    """One curriculum stage: the trainer runs ``steps`` optimizer steps, then moves to the next stage."""

    name: str = "stage0"
    steps: int = 1000
    data_path: str = ""  # dataset root written by data_pipeline (local folder or s3://bucket/prefix), or:
    sources: list[DataSource] = field(default_factory=list)  # several roots with mixing weights (no data_path)
    resolution: int = 256  # base resolution of the bucket table
    buckets: BucketMode = "fixed"  # fixed: every image center-cropped to resolution^2; aspect: ratio buckets
    bucket_align: int = 32  # bucket sides are multiples of this (bucket_table(resolution, bucket_align))
    micro_batch: int = 32  # images per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warmup at the start of this stage
    schedule: Schedule = "constant"  # after warmup: constant, or cosine down to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    shift: float | None = None  # timestep shift (SD3-style resolution shift); None: objective.shift
    repa: bool = False  # REPA loss on in this stage
    grad_checkpointing: bool = False  # activation checkpointing of patch and PiT blocks
    grad_clip: float | None = None  # gradient clipping of this stage (0 = off); None: optim.grad_clip
    # train on the rows of data_path (or of every root of sources) where this holds, e.g. "aesthetic >= 6"
    # (data_pipeline.filters: columns of samples.parquet, metadata included); "" = every row. Checked against the
    # dataset before training starts; a plan input like dedupe (pixeldit.train.sources.selection_masks)
    filter: str = ""

    def clip(self, optim: "OptimConfig") -> float:
        return optim.grad_clip if self.grad_clip is None else self.grad_clip

    def data_sources(self) -> list[DataSource]:
        """The stage's dataset roots with their weights (``data_path`` is one root of weight 1)."""
        return list(self.sources) if self.sources else [DataSource(self.data_path, 1.0)]


@dataclass
class CameSection:
    """CAME's own settings (pixeldit.train.came); defaults of the paper and of the official PixelDiT recipe."""

    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999)  # first moment, squared gradient, instability
    eps: tuple[float, float] = (1e-30, 1e-16)  # added to the squared gradient / to the instability
    clip_threshold: float = 1.0  # the normalised update is scaled down to this RMS


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"  # adamw, or came (factored second moments, kept factored under ZeRO)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.0  # matrices only (both optimizers)
    grad_clip: float = 1.0  # DeepSpeed gradient_clipping (0 = off); stages[].grad_clip overrides it per stage
    fused: bool | None = None  # AdamW: torch's fused kernel; None: fused on CUDA, the foreach kernels elsewhere
    came: CameSection = field(default_factory=CameSection)


@dataclass
class DeepSpeedSection:
    zero: ZeroConfig = "zero2"  # ds_configs/{zero}.json
    config_dir: str = ""  # folder of ZeRO JSON files; empty: the ones shipped as pixeldit.ds_configs
    precision: Precision = "bf16"


@dataclass
class CompileSection:
    """torch.compile of the model's blocks (``pixeldit.train.compile``; why per block there)."""

    enabled: bool | None = None  # None: on with CUDA, off on CPU (compiling costs minutes there; see BENCHMARKS)
    dynamic: bool | None = None  # symbolic H/W; None: in aspect-bucket stages (one graph serves every bucket)
    recompile_budget: int = 2  # graph compiles per stage after its first step before a warning
    backend: CompileBackend = "inductor"  # CompileBackend above; only inductor makes the step faster


@dataclass
class DataSection:
    """How the loader reads the stages' datasets (pixeldit/train/loader.py)."""

    num_workers: int = 4  # DataLoader workers per rank (0: load in the training process)
    prefetch_factor: int = 2
    # fsspec options (e.g. s3 endpoint_url). Credentials (key, secret, token) are redacted wherever the config
    # is saved and refused by the launcher: give them as AWS_* environment variables or an AWS profile
    storage_options: dict[str, Any] = field(default_factory=dict)
    s3: dict[str, float] = field(default_factory=dict)  # S3 timeouts/retries: pixeldit.s3.S3Settings fields
    cache_dir: str = ""  # node-local cache of remote shards (flock-shared by the node); "": $TMPDIR/pixeldit-cache
    cache_max_gb: float = 100.0  # size bound of the cache (LRU eviction); 0: no cache, one ranged GET per image
    prefetch_batches: int = 8  # global batches ahead of the training step whose shards are fetched
    fetch_threads: int = 4  # concurrent shard downloads per rank
    shuffle_block_shards: int = 16  # shards shuffled together per bucket (>= nodes keeps reads node-local)
    max_bad_samples: int = 100  # per rank and stage: undecodable samples skipped and counted, then the run fails
    skip_damaged_shards: bool = False  # shards missing or of the wrong size: fail (default) or leave them out
    worker_timeout_s: float = 600.0  # a DataLoader worker silent this long is an error (0: wait forever)
    target_mfu: float = 0.4  # the MFU the stage-start data-rate line sizes the data rate for
    # roots with several captions per sample (captions.parquet): each draw picks caption i with probability
    # softmax(score / T)_i (data_pipeline.captions); small T: nearly always the best-scored caption
    caption_temperature: float = DEFAULT_CAPTION_TEMPERATURE


@dataclass
class DistributedSection:
    """Collective timeouts and SIGTERM handling (``pixeldit.train.collectives``, ``pixeldit.train.signals``)."""

    startup_timeout_s: float = 1800.0  # process group start-up through the first completed step (compile, loads)
    step_timeout_s: float = 300.0  # every collective after the first step: longer than the slowest save/validation
    sigterm_grace_s: float = 2.5  # SIGTERM: leave within this many seconds, even with a stuck main thread


@dataclass
class NodeCheckSection:
    """The runtime preflight on every start and restart (``pixeldit.train.node_check``)."""

    enabled: bool = True
    matmul_size: int = 256  # n x n device matmul against a float64 CPU reference
    allreduce_mb: float = 16.0  # MiB of the timed all-reduce
    min_allreduce_gb_s: float = 0.0  # fail below this all-reduce bus bandwidth (0: report only)
    read_mb: float = 4.0  # MiB read from a shard of the first remaining stage's data root
    min_read_mb_s: float = 0.0  # fail below this read rate (0: report only)
    disk_warn_checkpoints: float = 3.0  # warn when run_dir's free disk holds fewer estimated checkpoints
    disk_fail_checkpoints: float = 1.0  # fail below this many


@dataclass
class StragglerSection:
    """Per-rank step-time report (``pixeldit.train.stragglers``)."""

    every: int = 50  # window in optimizer steps; one all_gather of a few floats per window (0: off)
    threshold: float = 0.2  # slower than the median of ranks by more than this fraction: a slow window
    windows: int = 3  # consecutive slow windows before the rank is flagged with its host


@dataclass
class ConditioningConfig:
    text_mode: TextMode = "online"  # online: run the frozen TextEncoder per batch; cached: embedding cache
    text_encoder: str = ""  # path of the text encoder (HF folder)
    system_prompt: str | None = None  # prepended to captions; None: DEFAULT_SYSTEM_PROMPT; a name of
    # pixeldit.diffusion.SYSTEM_PROMPTS ("pixeldit", "official": the official model's instruction) or the text
    embedding_cache: str = ""  # cached embeddings (text_mode=cached); empty: {stage data_path}/text_emb
    repa_teacher: str = ""  # path of the DINOv2 teacher (HF folder); needed when any stage has repa


@dataclass
class CheckpointConfig:
    every: int = 1000  # save every N optimizer steps (and at every stage end and at the end)
    keep: int = 3  # keep the last k step folders (up to the newest save; newer folders are never pruned)
    # checks of the checkpoint a run resumes from: "size" (every file of its manifest.json there with its size; a
    # stat per file) or "full" (and its SHA-256, spread over the ranks: ~1 s per GB per rank)
    verify: VerifyMode = "size"
    # a damaged `latest` (or folder it names) falls back to the newest intact step folder, said in one line;
    # false: stop with an error instead
    fallback: bool = True
    resume_from: str = ""  # a step folder to start from when the run has no checkpoint of its own yet
    init_from: str = ""  # a release folder (ours, or an imported official model): when the run has no checkpoint
    # of its own yet, the model and its EMA start from its weights with a fresh optimizer (pixeldit.train.warm_start)
    load_universal: bool = False  # resume_from is a DeepSpeed universal checkpoint (any world size)


@dataclass
class ValidationConfig:
    """Validation loss on the dataset's held-out split (``pixeldit.train.validation``)."""

    every: int = 1000  # every N optimizer steps (0: off); into metrics.jsonl, losses' wandb run
    max_per_bucket: int = 64  # held-out samples per bucket (the same ones every time; 0: all of them)
    batch_size: int = 0  # images per forward (0: 2 x the stage's micro_batch), 8 per sample; the cost, not the value


@dataclass
class SpikeSection:
    """Loss-spike rollback (``pixeldit.train.spikes``): a step whose loss or gradient norm jumps is undone (back
    to the last checkpoint) and its global batch skipped."""

    enabled: bool = False  # off by default: thresholds depend on the run; turn it on for long runs
    zscore_loss: float = 8.0  # robust z-score of the step loss (per stage and bucket) above which a step is a spike
    zscore_grad: float = 8.0  # the same for the gradient norm; 0 turns either check off
    window: int = 200  # recent applied steps per bucket the median and MAD are taken over
    min_history: int = 20  # steps of a bucket before its steps are judged
    max_rollbacks: int = 5  # rollbacks per run; the next spike stops the run (SpikeLimitError)


@dataclass
class LoggingConfig:
    wandb: WandbMode = "offline"
    project: str = "pixeldit"
    run_name: str = ""
    log_every: int = 10
    progress_bar: bool = True
    image_every: int = 0  # image grid from the EMA model every N steps (0: off)
    image_count: int = 8
    image_sample_steps: int = 25
    image_sampler: SamplerName = "euler"
    image_cfg_scale: float = 4.0
    image_prompts: list[str] = field(default_factory=lambda: [
        "a red circle on a white background", "a photo of a cat", "a mountain lake at sunrise",
        "a bowl of fruit on a wooden table"])  # text-to-image previews
    peak_tflops: float = 0.0  # per-device dense peak for MFU; 0: guess from the device name (none on CPU)


@dataclass
class RunConfig:
    run_dir: str = "runs/debug"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    # pixeldit.diffusion.objective.ObjectiveConfig; per stage, stages[i].shift replaces objective.shift and
    # repa_weight applies only where stages[i].repa is true
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    compile: CompileSection = field(default_factory=CompileSection)
    data: DataSection = field(default_factory=DataSection)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    spike: SpikeSection = field(default_factory=SpikeSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    node_check: NodeCheckSection = field(default_factory=NodeCheckSection)
    straggler: StragglerSection = field(default_factory=StragglerSection)
    ema_decay: float = 0.9999
    max_consecutive_nonfinite: int = 20  # non-finite losses in a row before the run stops

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def uses_repa(self) -> bool:
        return any(s.repa for s in self.stages)

    def stage_objective(self, stage: StageConfig) -> ObjectiveConfig:
        """The objective of one of ``stages``: ``objective`` with the stage's shift (if it sets one) and REPA
        weight 0 where the stage has no REPA."""
        return dataclasses.replace(self.objective, shift=self.objective.shift if stage.shift is None else stage.shift,
                                   repa_weight=self.objective.repa_weight if stage.repa else 0.0)


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; errors name the key ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}; valid values: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config keys {[prefix + k for k in unknown]}; valid keys here: {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # the dataclass's own checks (e.g. ObjectiveConfig)
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain dict/list tree (tuples as lists) of a config, for YAML and checkpoint metadata."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(data: dict[str, Any]) -> RunConfig:
    return _from_dict(RunConfig, data)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override to a plain dict tree; value parsed as YAML (1e-4, true, [1, 2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value (e.g. stages.0.lr=1e-4)")
    path, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and raw.strip():
        value = raw  # keep strings verbatim (paths with ':' etc.)
    parts = path.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(node, last, path)
        node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {override!r}: {'.'.join(parts[:-1])} is not a section")


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {where!r}: list index {part!r} invalid; valid indices 0..{len(node) - 1}")
    return int(part)


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if isinstance(node, dict):
        if part not in node:
            raise ConfigError(f"override key {where!r} does not exist; valid keys: {sorted(node)}")
        return node[part]
    raise ConfigError(f"override key {where!r}: parent is not a section")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults < YAML file at ``path`` < dotted ``overrides``; validated."""
    tree = to_dict(RunConfig())
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"run config {path} not found (--config)")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        try:
            tree = to_dict(_from_dict(RunConfig, loaded))  # type-checked; unset keys keep their defaults
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for ov in overrides:
        apply_override(tree, ov)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def to_saved_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as it may be written anywhere (config.yaml, launcher files, wandb): credentials in
    ``data.storage_options`` replaced by ``pixeldit.storage.REDACTED``."""
    tree = to_dict(cfg)
    tree["data"]["storage_options"] = redact_options(tree["data"]["storage_options"])
    return tree


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the config (credentials redacted) as YAML atomically (``pixeldit.storage.write_text_atomic``)."""
    write_text_atomic(path, yaml.safe_dump(to_saved_dict(cfg), sort_keys=False))


def validate(cfg: RunConfig) -> None:
    """Check the config on its own (no file is read); a ``ConfigError`` names the key at fault."""
    if cfg.model.size not in MODEL_SIZES:
        raise ConfigError(f"model.size={cfg.model.size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    args = cfg.model.args()
    if not cfg.stages:
        raise ConfigError("stages: the curriculum needs at least one stage")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: stage names must be unique, got {names}")
    for i, s in enumerate(cfg.stages):
        where = f"stages.{i} ({s.name})"
        for key in ("steps", "micro_batch", "grad_accum", "resolution", "bucket_align"):
            if getattr(s, key) <= 0:
                raise ConfigError(f"{where}.{key}={getattr(s, key)} must be positive")
        if s.data_path and s.sources:
            raise ConfigError(f"{where}: set data_path (one root) or sources (several roots with weights), not both")
        if not s.data_path and not s.sources:
            raise ConfigError(f"{where}.data_path is empty: set the dataset root written by data_pipeline")
        for j, src in enumerate(s.sources):
            if not src.path or not src.weight > 0:
                raise ConfigError(f"{where}.sources.{j}: needs a path and a weight > 0, got {src.path!r}, "
                                  f"{src.weight}")
        paths = [src.path for src in s.data_sources()]
        if len(set(paths)) != len(paths):
            raise ConfigError(f"{where}.sources: a root appears twice ({paths}); give it one weight")
        for key, ok, rule in (("lr", s.lr > 0, "> 0"), ("warmup_steps", s.warmup_steps >= 0, ">= 0"),
                              ("min_lr_ratio", 0.0 <= s.min_lr_ratio <= 1.0, "in [0, 1]"),
                              ("shift", s.shift is None or s.shift > 0, "> 0"),
                              ("grad_clip", s.grad_clip is None or s.grad_clip >= 0, ">= 0 (0 = off)")):
            if not ok:
                raise ConfigError(f"{where}.{key}={getattr(s, key)} must be {rule}")
        if s.bucket_align % args.patch_size:
            raise ConfigError(f"{where}.bucket_align={s.bucket_align} must be a multiple of the patch size "
                              f"{args.patch_size} of model.size={cfg.model.size!r}")
        if s.resolution % s.bucket_align:
            raise ConfigError(f"{where}.resolution={s.resolution} must be a multiple of bucket_align="
                              f"{s.bucket_align} (itself a multiple of the patch size {args.patch_size})")
        if s.filter:
            try:
                parse_filter(s.filter)
            except ValueError as e:
                raise ConfigError(f"{where}.filter: {e}") from None
    if cfg.uses_repa and not cfg.conditioning.repa_teacher:
        raise ConfigError("conditioning.repa_teacher is empty but a stage has repa: true (set the DINOv2 path)")
    if args.conditioning == "text":
        c = cfg.conditioning
        if c.text_mode == "online" and not c.text_encoder:
            raise ConfigError("conditioning.text_encoder is empty: a text-to-image model with text_mode=online needs it")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={cfg.ema_decay} must be in (0, 1)")
    d = cfg.data
    came = cfg.optim.came
    for key, value, ok, rule in (
        ("checkpoint.every", cfg.checkpoint.every, cfg.checkpoint.every > 0, "> 0"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep > 0, "> 0"),
        ("max_consecutive_nonfinite", cfg.max_consecutive_nonfinite, cfg.max_consecutive_nonfinite > 0, "> 0"),
        ("logging.log_every", cfg.logging.log_every, cfg.logging.log_every > 0, "> 0"),
        ("logging.image_every", cfg.logging.image_every, cfg.logging.image_every >= 0, ">= 0 (0 = off)"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.prefetch_factor", d.prefetch_factor, d.prefetch_factor > 0, "> 0"),
        ("data.prefetch_batches", d.prefetch_batches, d.prefetch_batches > 0, "> 0"),
        ("data.fetch_threads", d.fetch_threads, d.fetch_threads > 0, "> 0"),
        ("data.shuffle_block_shards", d.shuffle_block_shards, d.shuffle_block_shards > 0, "> 0"),
        ("data.cache_max_gb", d.cache_max_gb, d.cache_max_gb >= 0, ">= 0 (0 = no node cache)"),
        ("data.max_bad_samples", d.max_bad_samples, d.max_bad_samples >= 0, ">= 0"),
        ("data.worker_timeout_s", d.worker_timeout_s, d.worker_timeout_s >= 0, ">= 0 (0 = wait forever)"),
        ("data.target_mfu", d.target_mfu, 0.0 < d.target_mfu <= 1.0, "in (0, 1]"),
        ("data.caption_temperature", d.caption_temperature, d.caption_temperature > 0, "> 0"),
        ("optim.grad_clip", cfg.optim.grad_clip, cfg.optim.grad_clip >= 0, ">= 0 (0 = off)"),
        ("validation.every", cfg.validation.every, cfg.validation.every >= 0, ">= 0 (0 = off)"),
        ("validation.max_per_bucket", cfg.validation.max_per_bucket, cfg.validation.max_per_bucket >= 0,
         ">= 0 (0 = all)"),
        ("validation.batch_size", cfg.validation.batch_size, cfg.validation.batch_size >= 0, ">= 0 (0 = 2 x micro_batch)"),
        ("compile.recompile_budget", cfg.compile.recompile_budget, cfg.compile.recompile_budget >= 0, ">= 0"),
        ("optim.came.betas", list(came.betas), all(0.0 <= b < 1.0 for b in came.betas), "each in [0, 1)"),
        ("optim.came.eps", list(came.eps), min(came.eps) > 0, "each > 0"),
        ("optim.came.clip_threshold", came.clip_threshold, came.clip_threshold > 0, "> 0"),
        ("spike.zscore_loss", cfg.spike.zscore_loss, cfg.spike.zscore_loss >= 0, ">= 0 (0 = loss not judged)"),
        ("spike.zscore_grad", cfg.spike.zscore_grad, cfg.spike.zscore_grad >= 0, ">= 0 (0 = norm not judged)"),
        ("spike.min_history", cfg.spike.min_history, cfg.spike.min_history >= 3, ">= 3 (a median and MAD of "
                                                                                  "fewer steps mean nothing)"),
        ("spike.window", cfg.spike.window, cfg.spike.window >= cfg.spike.min_history,
         f">= spike.min_history={cfg.spike.min_history}"),
        ("spike.max_rollbacks", cfg.spike.max_rollbacks, cfg.spike.max_rollbacks >= 0, ">= 0"),
        *_node_health_rules(cfg),
    ):
        if not ok:
            raise ConfigError(f"{key}={value} must be {rule}")
    if cfg.spike.enabled and cfg.spike.zscore_loss == 0 and cfg.spike.zscore_grad == 0:
        raise ConfigError("spike.enabled=true with spike.zscore_loss=0 and spike.zscore_grad=0 judges nothing; set "
                          "a threshold (e.g. 8) or spike.enabled=false")
    if cfg.optim.name == "came" and cfg.checkpoint.load_universal:
        raise ConfigError("optim.name=came with checkpoint.load_universal=true: CAME's row/column statistics have no "
                          "DeepSpeed universal-checkpoint form; valid: load_universal with optim.name=adamw, or resume "
                          "a CAME run on the world size it was saved with")
    if cfg.checkpoint.init_from and cfg.checkpoint.resume_from:
        raise ConfigError("checkpoint.init_from and checkpoint.resume_from are both set: init_from starts a run from "
                          "release weights (fresh optimizer), resume_from continues a checkpoint; set one")
    resolve_s3_settings(d.s3)  # unknown keys and bad values named here (ConfigError), before anything starts
    if any(v == REDACTED for v in _leaves(d.storage_options)):
        raise ConfigError(f"data.storage_options holds {REDACTED!r} values: this config was read back from a run "
                          f"folder, where credentials are never saved; remove them and give the credentials as AWS_* "
                          f"environment variables or an AWS profile")


def _node_health_rules(cfg: RunConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, ok, rule) of the distributed / node_check / straggler sections."""
    d, n, s = cfg.distributed, cfg.node_check, cfg.straggler
    return [
        ("distributed.startup_timeout_s", d.startup_timeout_s, d.startup_timeout_s > 0, "> 0"),
        ("distributed.step_timeout_s", d.step_timeout_s, d.step_timeout_s > 0, "> 0"),
        ("distributed.sigterm_grace_s", d.sigterm_grace_s, 0 < d.sigterm_grace_s <= 3.5,
         "in (0, 3.5] (a SIGTERM'd trainer must be gone within 5 s; faulthandler's backstop fires 1 s later)"),
        ("node_check.matmul_size", n.matmul_size, n.matmul_size > 0, "> 0"),
        ("node_check.allreduce_mb", n.allreduce_mb, n.allreduce_mb > 0, "> 0"),
        ("node_check.min_allreduce_gb_s", n.min_allreduce_gb_s, n.min_allreduce_gb_s >= 0, ">= 0 (0 = report only)"),
        ("node_check.read_mb", n.read_mb, n.read_mb > 0, "> 0"),
        ("node_check.min_read_mb_s", n.min_read_mb_s, n.min_read_mb_s >= 0, ">= 0 (0 = report only)"),
        ("node_check.disk_fail_checkpoints", n.disk_fail_checkpoints, n.disk_fail_checkpoints >= 0, ">= 0"),
        ("node_check.disk_warn_checkpoints", n.disk_warn_checkpoints,
         n.disk_warn_checkpoints >= n.disk_fail_checkpoints, ">= node_check.disk_fail_checkpoints"),
        ("straggler.every", s.every, s.every >= 0, ">= 0 (0 = off)"),
        ("straggler.threshold", s.threshold, s.threshold > 0, "> 0"),
        ("straggler.windows", s.windows, s.windows > 0, "> 0"),
    ]


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]
