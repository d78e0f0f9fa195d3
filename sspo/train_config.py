"""The training config: one dataclass tree for every method of :data:`sspo.methods.METHODS`."""

from __future__ import annotations

import dataclasses

from .config import check, one_of
from .data import DataConfig
from .losses import SSR_VARIANTS
from .methods import METHODS, Method
from .pool import ERD_STRATEGIES


TRAIN_MODULES = ("auto", "unet", "motion")


def resolve_train_modules(train_modules: str, video: bool) -> str:
    """``model.train_modules`` for a video or an image model: "auto" is "motion" for video, else "unet"."""
    return ("motion" if video else "unet") if train_modules == "auto" else train_modules


@dataclasses.dataclass
class ModelConfig:
    pretrained: str = "shapes-base"  # hub id, local diffusers folder, or shapes-base[:quick]
    revision: str | None = None
    variant: str | None = None  # e.g. fp16 weights on the hub
    # AnimateDiff: a MotionAdapter (hub id or from_pretrained folder) joined to an image pipeline
    # (pretrained: SD-1.5), as AnimateDiffPipeline.from_pretrained(..., motion_adapter=...) does.
    motion_adapter: str | None = None
    lora: bool = True  # False: full fine-tuning of what `train_modules` names
    # What trains: "unet" (every UNet layer), "motion" (a video UNet's motion modules only, as
    # AnimateDiff LoRAs do), "auto" (motion for video pipelines, unet for image ones).
    train_modules: str = "auto"
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | xformers (enable_xformers_memory_efficient_attention)

    def __post_init__(self) -> None:
        check(bool(self.pretrained), "model.pretrained", "set a hub id or a diffusers folder")
        check(self.lora_rank > 0, "model.lora_rank", "must be positive")
        one_of(self.attention, ("sdpa", "xformers"), "model.attention")
        one_of(self.train_modules, TRAIN_MODULES, "model.train_modules")


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 4  # per device and micro-batch (pairs for preference methods)
    gradient_accumulation_steps: int = 1
    lr_warmup_steps: int = 0
    use_8bit_adam: bool = False  # bitsandbytes, `pip install 'sspo[bnb]'`

    def __post_init__(self) -> None:
        check(self.learning_rate > 0, "optim.learning_rate", "must be positive")
        check(self.batch_size > 0, "optim.batch_size", "must be positive")
        check(self.gradient_accumulation_steps > 0, "optim.gradient_accumulation_steps", "must be positive")
        check(self.max_grad_norm > 0, "optim.max_grad_norm", "must be positive")


@dataclasses.dataclass
class SamplerConfig:
    """How a pool checkpoint generates negatives ``x_l`` (its own inference pipeline)."""

    scheduler: str = "ddim"  # ddim | pipeline (the pipeline's own) | dpm++ | euler
    steps: int = 20
    guidance_scale: float = 5.0  # SD-1.5's usual is 7.5; the shapes world's base likes 5
    eta: float = 0.0
    batch_size: int = 64  # generation batch (grouped by checkpoint), independent of training batch

    def __post_init__(self) -> None:
        one_of(self.scheduler, ("ddim", "pipeline", "dpm++", "euler"), "negatives.scheduler")
        check(self.steps > 0, "negatives.steps", "must be positive")
        check(self.batch_size > 0, "negatives.batch_size", "must be positive")


@dataclasses.dataclass
class ValidationConfig:
    every_iterations: int = 0  # 0: off; N: every N iterations and after the last
    shapes_eval: bool = False  # score the world's eval prompts (shapes; motion for clips) exactly, sampled as the negatives are
    prompts: tuple[str, ...] = ()  # fixed prompts: an image grid in <output_dir>/validation and tensorboard
    seed: int = 0
    prompts_per_split: int = 8


@dataclasses.dataclass
class DiagnosticsConfig:
    # Shapes world: score every negative exactly and, for this many pairs of every micro-batch, the
    # policy's own sample too: SSR and RCR against ground truth (<output_dir>/ssr_truth.jsonl). 0: off.
    ssr_truth_per_batch: int = 0

    def __post_init__(self) -> None:
        check(self.ssr_truth_per_batch >= 0, "diagnostics.ssr_truth_per_batch", "must be 0 (off) or positive")


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    negatives: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    method: str = "sspo"  # a name in sspo.methods.METHODS: sft | dpo | spin | sspo
    beta: float = 5000.0  # Diffusion-DPO's beta for SD-1.5 (T * omega(lambda_t) folded in)
    ssr: str = "sign"  # sign | indicator | off (Table 6 ablations); spin and dpo force off
    ssr_draws: int = 1  # (t, eps) draws whose mean errors decide K; 1 = the paper (the loss's own draw)
    erd: str = "uniform"  # uniform (RCR) | initial | last; spin forces last, dpo initial
    erd_per: str = "batch"  # batch (paper) | sample
    iterations: int = 4  # the pool grows once per iteration
    steps_per_iteration: int = 25  # K_updates: optimizer steps per iteration
    pregenerate: bool = True  # generate an iteration's negatives up front, grouped by checkpoint
    cache_reference_errors: bool = True  # with pregenerate: reference errors computed then, too
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    output_dir: str = "runs/sspo"
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    log_every: int = 1
    save_every_steps: int = 0  # 0: save a resumable state at iteration ends only
    checkpoints_total_limit: int = 2
    nonfinite: str = "error"  # a non-finite loss or gradient: error (stop; the last state stays) | skip (count it, step nothing)

    def __post_init__(self) -> None:
        one_of(self.method, METHODS, "method")
        one_of(self.ssr, SSR_VARIANTS, "ssr")
        one_of(self.erd, ERD_STRATEGIES, "erd")
        one_of(self.erd_per, ("batch", "sample"), "erd_per")
        one_of(self.mixed_precision, ("no", "fp16", "bf16"), "mixed_precision")
        one_of(self.report_to, ("tensorboard", "wandb", "none"), "report_to")
        one_of(self.nonfinite, ("error", "skip"), "nonfinite")
        check(self.beta > 0, "beta", "must be positive")
        check(self.ssr_draws >= 1, "ssr_draws", "must be at least 1")
        check(self.iterations > 0, "iterations", "must be positive")
        check(self.steps_per_iteration > 0, "steps_per_iteration", "must be positive")
        check(self.checkpoints_total_limit > 0, "checkpoints_total_limit", "must be positive")
        check(not self.diagnostics.ssr_truth_per_batch or self.data.source == "shapes", "diagnostics.ssr_truth_per_batch",
              "needs data.source: shapes (the exact evaluator scores the world's prompts only); set it to 0 for other data")

    # What the method implies (sspo/methods.py); a method's fixed erd / ssr wins over the keys.
    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def uses_reference(self) -> bool:
        return self.spec.uses_reference

    @property
    def generates_negatives(self) -> bool:
        return self.spec.generates_negatives

    @property
    def effective_erd(self) -> str:
        return self.spec.erd or self.erd

    @property
    def effective_ssr(self) -> str:
        return self.spec.ssr or self.ssr
