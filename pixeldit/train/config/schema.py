"""The run config's schema: every section as a typed dataclass, the ``RunConfig`` tree, and the choices
(Literals). Documented in the package docstring and at each field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from data_pipeline.captions import DEFAULT_CAPTION_TEMPERATURE
from pixeldit.diffusion.objective import ObjectiveConfig
from pixeldit.diffusion.samplers import SamplerName
from pixeldit.errors import ConfigError
from pixeldit.models import ModelArgs, get_model_args
from pixeldit.run_folder import VERIFY_MODES

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
