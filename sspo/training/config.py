"""The training config: one dataclass tree for every method of :data:`sspo.training.methods.METHODS`."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from sspo.config import MAX_SEED, Registered, check, setting, validate
from sspo.data.config import DataConfig
from sspo.errors import ConfigError
from sspo.evaluation.scorers import SCORER_CHOICES
from sspo.models.families import FAMILIES, TRAIN_MODULES
from sspo.models.families.flow import FlowConfig
from sspo.training.losses import SSR_VARIANTS
from sspo.training.methods import METHODS, Method
from sspo.training.pool import ERD_STRATEGIES
from sspo.worlds.registry import WORLDS

SCHEDULERS = ("ddim", "pipeline", "dpm++", "euler", "unipc")
# diffusers' get_scheduler names (piecewise_constant, which takes rules as a string, is left out)
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler decays polynomial to this learning rate
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORTERS = ("tensorboard", "wandb", "none")


@dataclasses.dataclass
class ModelConfig:
    # A hub id, a local diffusers folder, or a world's base: shapes-base[:quick|:64px|:flow|:flow-quick], moving-shapes-base[:quick].
    pretrained: str = setting("shapes-base", nonempty=True)
    revision: str | None = None  # a hub model's branch, tag or commit; None: its default branch
    variant: str | None = None  # e.g. fp16 weights on the hub
    # AnimateDiff: a MotionAdapter (hub id or from_pretrained folder) joined to an image pipeline
    # (pretrained: SD-1.5), as AnimateDiffPipeline.from_pretrained(..., motion_adapter=...) does.
    motion_adapter: str | None = None
    # The model family (sspo/models/families/): how training draws timesteps and adds noise, what the
    # denoiser predicts, how negatives are sampled, what LoRA wraps, how weights are saved.
    # "auto": the registered family that recognises the pipeline (one module of sspo/models/families/ each).
    family: str = setting("auto", choices=Registered(FAMILIES, "auto"))
    lora: bool = True  # False: full fine-tuning of what `train_modules` names
    # What trains: "unet" (every layer of the denoiser), "motion" (a video model's motion modules
    # only, as AnimateDiff LoRAs do), "auto" (motion for video pipelines, every layer for image ones).
    train_modules: str = setting("auto", choices=TRAIN_MODULES)
    lora_rank: int = setting(8, at_least=1)  # the rank r of every LoRA update B @ A
    lora_alpha: int = setting(8, at_least=1)  # the LoRA update is scaled by lora_alpha / lora_rank
    # Module names (or name endings) the LoRA wraps; the trainer refuses names the denoiser lacks.
    lora_targets: tuple[str, ...] = setting(("to_q", "to_k", "to_v", "to_out.0"), nonempty=True)
    gradient_checkpointing: bool = False  # recompute the denoiser's activations in the backward pass: less memory, more time
    attention: str = setting("sdpa", choices=("sdpa", "xformers"))  # xformers: enable_xformers_memory_efficient_attention (CUDA only)

    def __post_init__(self) -> None:
        validate(self, "model.")


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = setting(1e-4, above=0)  # AdamW's peak learning rate (after warm-up)
    weight_decay: float = setting(1e-2, at_least=0)  # AdamW's decoupled weight decay
    adam_beta1: float = setting(0.9, at_least=0, below=1)  # torch's AdamW takes betas in [0, 1)
    adam_beta2: float = setting(0.999, at_least=0, below=1)  # AdamW's second-moment decay
    adam_epsilon: float = setting(1e-8, above=0)  # 0 divides 0 by 0 for a parameter whose gradient stays 0
    max_grad_norm: float = setting(1.0, above=0)  # gradients clipped to this global L2 norm before each step
    batch_size: int = setting(4, at_least=1)  # per device and micro-batch (pairs for preference methods)
    gradient_accumulation_steps: int = setting(1, at_least=1)  # micro-batches per optimizer step
    lr_warmup_steps: int = setting(0, at_least=0)  # optimizer steps of linear warm-up from 0 to learning_rate (every lr_scheduler but constant)
    # The learning-rate schedule by diffusers' name; the decaying ones reach their end at the run's
    # last optimizer step (iterations x steps_per_iteration), after lr_warmup_steps of warm-up.
    lr_scheduler: str = setting("constant_with_warmup", choices=LR_SCHEDULERS)
    lr_num_cycles: int = setting(1, at_least=1)  # cosine_with_restarts: hard restarts over the run
    lr_power: float = setting(1.0, above=0)  # polynomial: the decay's power (1 is linear)
    use_8bit_adam: bool = False  # bitsandbytes, `pip install 'sspo[bnb]'`
    # Full fine-tuning keeps an exponential moving average of the trained weights (diffusers' EMAModel, stepped after
    # every optimizer step); the final model and validation samples use the average, the pool's checkpoints (the
    # reference and the negatives' generators, theta_n) the raw policy.
    ema: bool = False  # the average of the trained weights, saved with each resumable state and as the final model (model.lora: false only)
    ema_decay: float = setting(0.9999, at_least=0, at_most=1)  # the average's decay, after EMAModel's ramp (1 + n) / (10 + n) over steps n; 0: the raw weights

    def __post_init__(self) -> None:
        validate(self, "optim.")
        check(self.lr_scheduler != "polynomial" or self.learning_rate > POLYNOMIAL_LR_END, "optim.learning_rate",
              f"got {self.learning_rate:g}, but polynomial decays to diffusers' end value {POLYNOMIAL_LR_END:g}, which must be lower; "
              "raise optim.learning_rate or choose another optim.lr_scheduler")


@dataclasses.dataclass
class NegativesConfig:
    """How a pool checkpoint generates negatives ``x_l`` (its own inference pipeline)."""

    # dpm++ (DPM-Solver++ 2M) and unipc (UniPC-2M) are few-step solvers; on the shapes world neither matches ddim's
    # 20 steps in the exact reward of its samples with fewer steps (docs/bench/README.md "Few-step samplers").
    # ddim | pipeline (the pipeline's own) | dpm++ | euler | unipc; null: the model family's usual, recorded resolved in the
    # run's config.yaml: its default_sampler, ddim for SD-1.5, SDXL and AnimateDiff, dpm++ for PixArt, pipeline for the flow ones (SD3, FLUX)
    scheduler: str | None = setting(None, choices=SCHEDULERS)
    steps: int = setting(20, at_least=1)  # sampler steps per negative
    # At most 1: no classifier-free guidance. null: the model's usual (a world's base: its world's, 1 for the flow
    # base and 5 for the others; else its family's default_guidance_scale), recorded resolved in the run's config.yaml.
    # FLUX-dev takes it as its guidance embedding's input, not as classifier-free guidance.
    guidance_scale: float | None = setting(None, at_least=0)
    eta: float = setting(0.0, at_least=0, at_most=1)  # ddim: 0 is deterministic DDIM, 1 is DDPM-like
    batch_size: int = setting(64, at_least=1)  # generation batch (grouped by checkpoint), independent of training batch
    # LoRA with fp32 weights (mixed_precision: no): a checkpoint's adapter is merged into the base weights while it samples, and
    # the base's own bits are copied back after; the negatives differ from unmerged sampling by float rounding only. Half-precision
    # weights always sample unmerged: merging would round small LoRA updates away.
    fuse_lora: bool = False  # sample with the checkpoint's LoRA merged into the base weights (fp32 weights only; faster, negatives differ by rounding)
    compile: bool = False  # torch.compile the denoiser's sampling forwards, once per run (inductor: needs a C++ compiler on the CPU)

    def __post_init__(self) -> None:
        validate(self, "negatives.")


@dataclasses.dataclass
class ValidationConfig:
    every_iterations: int = setting(0, at_least=0)  # 0: off; N: every N iterations and after the last
    world_eval: bool = False  # score a world's eval prompts (seen and held-out) exactly, sampled as `sspo eval` samples at the negatives' steps and guidance
    world: str | None = setting(None, choices=Registered(WORLDS))  # the world world_eval scores (shapes | moving-shapes | a registered one); None: the one data.source names
    prompts: tuple[str, ...] = ()  # fixed prompts: an image grid in <output_dir>/validation and tensorboard
    # Scored with `sspo eval`'s metrics, one sample per prompt (seed `seed`): each column's mean goes to the trackers and
    # <output_dir>/validation.jsonl, the samples to tensorboard or wandb.
    metrics: tuple[str, ...] = setting((), choices=SCORER_CHOICES)  # names as `sspo eval --metrics` takes them (a world's, pickscore, hpsv2 ...); empty: none
    prompt_file: str | None = setting(None, nonempty=True)  # the prompts `metrics` scores, a file as `sspo eval --prompts` reads (.txt: one per line); None: `prompts`
    scorer_paths: dict[str, str] = dataclasses.field(default_factory=dict)  # metric -> its weights (local path or hub id), as `sspo eval --scorer-path`; default: the published
    scorer_options: dict[str, dict] = dataclasses.field(default_factory=dict)  # metric -> its build_scorer options, as `sspo eval --scorer-option` (pickscore: {processor: PATH})
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # the sampler seed of every validation sample
    prompts_per_split: int = setting(8, at_least=1)  # world_eval: prompts per split (seen, held-out)

    def __post_init__(self) -> None:
        self.metrics = tuple(dict.fromkeys(self.metrics))
        validate(self, "validation.")
        for key in ("scorer_paths", "scorer_options"):
            for metric, value in getattr(self, key).items():
                check(metric in self.metrics, f"validation.{key}", f"names metric {metric!r}, which validation.metrics does not score ({', '.join(self.metrics) or 'none'}); "
                      "add it to validation.metrics or remove it here")
                check(isinstance(value, dict if key == "scorer_options" else str), f"validation.{key}.{metric}",
                      f"got {value!r}, expected {'a mapping of option: value' if key == 'scorer_options' else 'a path or hub id'}")
        check(not (self.metrics and self.every_iterations) or self.prompt_file or self.prompts, "validation.metrics",
              "has no prompts to score; set validation.prompt_file (a text file, one prompt per line) or validation.prompts")


@dataclasses.dataclass
class DiagnosticsConfig:
    # A world of images (the shapes world: its own pairs or `sspo pairs`' parquet): score every negative exactly and, for this many pairs of every micro-batch, the
    # policy's own sample too: SSR and RCR against ground truth (<output_dir>/ssr_truth.jsonl). 0: off.
    ssr_truth_per_batch: int = setting(0, at_least=0)

    def __post_init__(self) -> None:
        validate(self, "diagnostics.")


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the pipeline trained and what of it trains
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the winners (and a dataset's losers): source, columns, resizing
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # AdamW, its schedule, batch sizes
    negatives: NegativesConfig = dataclasses.field(default_factory=NegativesConfig)  # how pool checkpoints sample x_l (spin, sspo)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)  # images and a world's rewards during training
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)  # checks of SSR against a world's exact rewards
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)  # flow-matching families (SD3, FLUX): sigma's density and the error weights
    method: str = setting("sspo", choices=Registered(METHODS))  # a name in sspo.training.methods.METHODS: sft | dpo | spin | sspo
    # The DPO temperature, T * omega(lambda_t) folded in; null: the model family's usual, recorded resolved in the run's
    # config.yaml: its default_beta, Diffusion-DPO's 5000 for SD-1.5's errors, 500 for SD3, 1500 for FLUX.1 (docs/method.md).
    beta: float | None = setting(None, above=0)
    ssr: str = setting("sign", choices=SSR_VARIANTS)  # sign | indicator | off (Table 6 ablations); spin and dpo force off
    ssr_draws: int = setting(1, at_least=1)  # (t, eps) draws whose mean errors decide K; 1 = the paper (the loss's own draw)
    erd: str = setting("uniform", choices=ERD_STRATEGIES)  # uniform (RCR) | initial | last; spin forces last, dpo initial
    erd_per: str = setting("batch", choices=("batch", "sample"))  # batch (paper) | sample
    iterations: int = setting(4, at_least=1)  # the pool grows once per iteration
    steps_per_iteration: int = setting(25, at_least=1)  # K_updates: optimizer steps per iteration
    pregenerate: bool = True  # generate an iteration's negatives up front, grouped by checkpoint
    cache_reference_errors: bool = True  # with pregenerate: reference errors computed then, too
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # the run's: initial LoRA weights, data order, noise, every draw
    # no | fp16 (needs a GPU) | bf16; null: accelerate's (`accelerate launch --mixed_precision`, its config file, ACCELERATE_MIXED_PRECISION), else no
    mixed_precision: str | None = setting(None, choices=MIXED_PRECISIONS)
    # Under a multi-process launch, how long a process waits for the others at a collective before it
    # stops with an error. The main process validates, scores and loads reward models alone while the
    # others wait, which can outlast torch's default (10 minutes under NCCL).
    process_timeout_s: int = setting(3600, at_least=1, at_most=10**9)
    output_dir: str = setting("runs/sspo", own_folder=True)  # the run's folder: never '', '.', '/', '~', the home or current folder
    report_to: str = setting("tensorboard", choices=REPORTERS)  # tensorboard | wandb (pip install 'sspo[wandb]') | none
    tracker_project: str = setting("sspo", nonempty=True)  # the trackers' project: wandb's project; tensorboard logs to <output_dir>/logs/<tracker_project>/<run name>
    tracker_run_name: str | None = setting(None, nonempty=True)  # the run's name in that project (wandb's run name, tensorboard's folder); None: output_dir's folder name
    log_every: int = setting(1, at_least=1)  # optimizer steps between metrics lines
    save_every_steps: int = setting(0, at_least=0)  # 0: save a resumable state at iteration ends only
    checkpoints_total_limit: int = setting(2, at_least=1)  # resumable states kept in checkpoints/ (the oldest deleted after a new one is complete)
    nonfinite: str = setting("error", choices=("error", "skip"))  # a non-finite loss or gradient: error (stop; the last state stays) | skip (count it, step nothing)

    def __post_init__(self) -> None:
        validate(self)
        self.output_dir = os.path.expanduser(self.output_dir)  # a YAML file's ~/runs/x is the home folder's, as on the command line
        image_worlds = [name for name, world in WORLDS.items() if not world.clips]
        check(not self.diagnostics.ssr_truth_per_batch or self.eval_world in image_worlds, "diagnostics.ssr_truth_per_batch",
              f"needs a world's prompts, of images ({', '.join(image_worlds)}: data.source: shapes, or its pairs in a parquet with "
              "validation.world: shapes): a world's exact evaluator scores those only; set it to 0 for other data")
        check(not self.diagnostics.ssr_truth_per_batch or not self.data.caption_dropout, "diagnostics.ssr_truth_per_batch",
              "scores each pair against its prompt, and data.caption_dropout trains some on the empty prompt; set one of them to 0")
        for key in ("tracker_project", "tracker_run_name"):
            name = getattr(self, key)
            check(name is None or ("/" not in name and "\\" not in name and name.strip(".")), key,
                  f"got {name!r}, which tensorboard would make a folder of: give a name without '/', '\\' or only dots")
        check(not (self.optim.ema and self.model.lora), "optim.ema", "averages full fine-tuning's weights, and model.lora is true; "
              "set model.lora=false to fine-tune every weight, or optim.ema=false")
        scores_world = self.validation.world_eval and self.validation.every_iterations > 0
        check(not scores_world or self.eval_world in WORLDS, "validation.world", f"is unset and data.source {self.data.source!r} is not a world, so "
              f"validation.world_eval has nothing to score; name one of {', '.join(WORLDS)}, or set validation.world_eval: false")

    @property
    def run_name(self) -> str:
        """The run's name in its trackers: ``tracker_run_name``, else the output folder's name."""
        return self.tracker_run_name or Path(os.path.abspath(self.output_dir)).name

    @property
    def eval_world(self) -> str:
        """The world ``validation.world_eval`` scores: ``validation.world``, else the one ``data.source`` names."""
        return self.validation.world or self.data.source

    # What the method implies (sspo/training/methods.py); a method's fixed erd / ssr wins over the keys.
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

    @property
    def unused_keys(self) -> tuple[str, ...]:
        """The keys this method's training never reads (its row fixes them, or it has no reference
        model, negatives or SSR for them to set): they change no trained weight. Validation samples
        and the model card may still show ``negatives.steps`` and ``guidance_scale``."""
        spec = self.spec
        unused = {"beta": not spec.uses_reference, "erd": spec.erd is not None or not spec.uses_reference, "erd_per": not spec.generates_negatives,
                  "ssr": spec.ssr is not None, "ssr_draws": self.effective_ssr == "off", "negatives": not spec.generates_negatives}
        return tuple(key for key, is_unused in unused.items() if is_unused)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` as the run uses it, with what it leaves unset filled in: ``mixed_precision`` from
    accelerate's launch, ``negatives.guidance_scale``, ``negatives.scheduler`` and ``beta`` from the
    model. The run's saved config.yaml holds these values, so a resume under another launch is refused."""
    if cfg.mixed_precision is None:
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        check(launched in MIXED_PRECISIONS, "mixed_precision", f"is unset and accelerate's launch asks for {launched!r}, which sspo does not "
              f"train with; launch with --mixed_precision {' | '.join(MIXED_PRECISIONS)}, or set mixed_precision in the config")
        cfg = dataclasses.replace(cfg, mixed_precision=launched)
    if cfg.negatives.guidance_scale is None:
        from sspo.worlds.names import usual_guidance_scale

        guidance = usual_guidance_scale(cfg.model.pretrained, cfg.model.family, cfg.model.revision, key="model.pretrained")
        cfg = dataclasses.replace(cfg, negatives=dataclasses.replace(cfg.negatives, guidance_scale=guidance))
    return with_family_defaults(cfg)


def with_family_defaults(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``beta`` and ``negatives.scheduler``, where it leaves them unset, its model family's."""
    if cfg.beta is None or cfg.negatives.scheduler is None:
        from sspo.worlds.names import usual_family

        family = usual_family(cfg.model.pretrained, cfg.model.family, cfg.model.revision)
        cfg = dataclasses.replace(cfg, beta=family.default_beta if cfg.beta is None else cfg.beta,
                                  negatives=dataclasses.replace(cfg.negatives, scheduler=cfg.negatives.scheduler or family.default_sampler))
    return cfg


def check_environment(cfg: TrainConfig) -> None:
    """Refuse, before anything is loaded or written, a setting this machine cannot run: fp16 or
    xformers without a GPU, an optional package that is not installed, or compiling on the CPU without a C++ compiler."""
    problems = []  # every one at once: a config copied from a GPU machine may have several
    if not _has_gpu():
        if cfg.mixed_precision == "fp16":
            problems.append(("mixed_precision", "fp16 needs a GPU and torch sees none; set mixed_precision=bf16 (which runs on the CPU) or mixed_precision=no"))
        if cfg.model.attention == "xformers":
            problems.append(("model.attention", "xformers runs on a GPU only and torch sees none; set model.attention=sdpa"))
    needs = (
        (cfg.model.attention == "xformers", "model.attention", "xformers", "pip install xformers, or set model.attention=sdpa"),
        (cfg.optim.use_8bit_adam, "optim.use_8bit_adam", "bitsandbytes", "pip install 'sspo[bnb]', or set optim.use_8bit_adam=false"),
        (cfg.report_to == "wandb", "report_to", "wandb", "pip install 'sspo[wandb]', or set report_to=tensorboard or none"),
    )
    problems += [(key, f"needs {module}, which is not installed; {fix}") for wanted, key, module, fix in needs
                 if wanted and not any(key == k for k, _ in problems) and not _importable(module)]
    if cfg.negatives.compile and not _has_gpu() and not _has_cpp_compiler():
        problems.append(("negatives.compile", "compiles with torch's inductor, which on the CPU needs a C++ compiler, and none was found; "
                         "install g++ (or set CXX to one), or set negatives.compile=false"))
    if problems:
        raise ConfigError("; ".join(f"config key '{key}': {message}" for key, message in problems))


def _has_gpu() -> bool:
    """Whether accelerate will train on a GPU: CUDA (or Apple's MPS) is there and the launch did not ask for the CPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return not parse_flag_from_env("ACCELERATE_USE_CPU") and (torch.cuda.is_available() or torch.backends.mps.is_available())


def _has_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (g++, or $CXX)."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return True


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
