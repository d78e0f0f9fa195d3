"""What ``sspo bench`` times: its arms, its settings, and the training config each arm runs.

Every arm runs the real :class:`~sspo.training.trainer.Trainer` on the same model, batch and precision;
only what happens inside the timed region differs, matching how each method runs in training:

=====================  ==========================================================================
arm                    timed per optimizer step
=====================  ==========================================================================
``sft``                policy forward + backward on the winners
``dpo``                Diffusion-DPO as published: reference forward (x_w, x_l) + policy forward
                       and backward (``cache_reference_errors=false``)
``dpo-cached``         sspo's trainer default for dpo: reference errors computed once per iteration
                       up front, so the step is policy-only (that phase is timed separately)
``sspo-online``        ``pregenerate=false``: the checkpoint samples x_l, reference forward, policy
                       forward + backward, all in the step
``sspo-pregenerated``  the default: an iteration's negatives and reference errors are built up
                       front, grouped by checkpoint (timed separately as the *pregeneration phase*);
                       the step is policy-only
=====================  ==========================================================================

Models: the shapes world's tiny base, or SD-1.5 / SDXL / SD3.5-medium / FLUX.1-dev / PixArt-Sigma
architectures with random weights, or a diffusers pipeline folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from sspo.config import MAX_RESOLUTION, Registered, check, load_config, load_yaml, setting, validate
from sspo.models.architectures import ARCH_MODELS, arch_notes, build_arch, native_resolution
from sspo.paths import CONFIGS
from sspo.training.methods import METHODS
from sspo.worlds.shapes.world import vocabulary as shapes_vocabulary

# The default arms: the baselines and SSPO, each as published and as sspo runs it.
ARMS = ("sft", "dpo", "dpo-cached", "sspo-online", "sspo-pregenerated")
BASELINE = "dpo"
MODELS = ("tiny", "quick", *ARCH_MODELS)  # or a local diffusers pipeline folder
WORLD_BASES = {"shapes-base": "tiny", "shapes-base:quick": "quick"}  # the names other commands give tiny and quick
DEMO_CONFIG = CONFIGS / "demo-shapes.yaml"
SETTING_KEYS = ("batch_size", "gradient_accumulation_steps", "steps_per_iteration", "mixed_precision", "lora")  # recorded with every result


def arm_overrides() -> dict[str, list[str]]:
    """Every arm the bench can time, from the method table (sspo/training/methods.py).

    A method without a reference is one arm. One with dataset losers runs as published (``<m>``,
    reference forward inside the step) and as sspo trains it (``<m>-cached``); one that generates
    negatives runs online and pregenerated (see the module doc).
    """
    arms = {}
    for m in METHODS.values():
        method = f"method={m.name}"
        if not m.uses_reference:
            arms[m.name] = [method]
        elif m.generates_negatives:
            arms[f"{m.name}-online"] = [method, "pregenerate=false"]
            arms[f"{m.name}-pregenerated"] = [method, "pregenerate=true", "cache_reference_errors=true"]
        else:
            arms[m.name] = [method, "pregenerate=true", "cache_reference_errors=false"]
            arms[f"{m.name}-cached"] = [method, "pregenerate=true", "cache_reference_errors=true"]
    return arms


def pregenerated(arm: str) -> bool:
    """Its reference errors (and negatives) are built in a phase before the steps, timed apart."""
    return "cache_reference_errors=true" in arm_overrides()[arm]


@dataclasses.dataclass
class BenchConfig:
    model: str = "tiny"  # tiny | quick | sd15 | sdxl | sd35m | flux | pixart (random-weight architectures, GPU) | a diffusers pipeline folder
    batch_size: int | None = setting(None, at_least=1)  # per micro-batch (default: the demo config's)
    gradient_accumulation_steps: int | None = setting(None, at_least=1)  # micro-batches per optimizer step (default: the demo config's)
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))  # no | fp16 | bf16: the trainer's mixed_precision
    lora: bool = True  # LoRA (off: full fine-tuning)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass
    warmup: int = setting(2, at_least=0)  # optimizer steps before timing (first steps allocate optimizer state)
    steps: int = setting(10, at_least=1)  # timed optimizer steps per arm; median and p90 are reported
    arms: tuple[str, ...] = setting(ARMS, choices=Registered(arm_overrides), nonempty=True)  # the training setups measured; ratios are to dpo's
    sampler_steps: tuple[int, ...] = setting((20, 50), at_least=1)  # also measure negative generation at these sampler steps (the paper's 20-50)
    steps_per_iteration: int | None = setting(None, at_least=1)  # K_updates, optimizer steps per iteration (default: the demo config's)
    pool_size: int = setting(3, at_least=1)  # sspo arms: checkpoints in the pool (as mid-training; 1 = {theta_0})
    resolution: int | None = setting(None, at_least=8, at_most=MAX_RESOLUTION, multiple_of=8)  # training resolution, a multiple of the VAE's 8 (default: the model's native one)
    threads: int | None = setting(None, at_least=1)  # torch intra-op threads on the CPU (default: torch's)
    clock: str = setting("wall", choices=("wall", "cpu"))  # wall | cpu (process CPU time: with one thread, robust to other jobs on a shared CPU)
    isolate: bool = True  # each arm in a fresh subprocess (off: in this process, CPU memory numbers less clean)
    allow_cpu: bool = False  # run sd15 / sdxl / sd35m / flux / pixart on the CPU anyway
    realistic: bool = False  # training scale: batch >= 8, the least K_updates giving >= 64 negatives an iteration and full generation batches; flags win
    overrides: tuple[str, ...] = ()  # extra TrainConfig overrides, e.g. negatives.guidance_scale=7.5

    def __post_init__(self) -> None:
        self.arms, self.sampler_steps, self.overrides = tuple(self.arms), tuple(self.sampler_steps), tuple(self.overrides)
        self.model = WORLD_BASES.get(self.model, self.model)
        validate(self)
        check(self.model in MODELS or (Path(self.model).expanduser() / "model_index.json").is_file(), "model",
              f"got {self.model!r}: expected one of {', '.join(MODELS)} or a diffusers pipeline folder (one holding model_index.json)")


# A transformer pipeline (SD3, FLUX, PixArt) trains as its family's shipped config says: LoRA
# targets, flow matching's sigma draws and guidance, negatives from its usual sampler (at its steps
# and guidance), and latents and text embeddings encoded once (data.cache_latents), so T5 runs
# before the steps. The UNet families train as the demo config does.
FAMILY_KEYS = ("model.lora_targets", "flow", "negatives.scheduler", "negatives.steps", "negatives.guidance_scale", "data.cache_latents")


BENCH_PAIRS = 64  # rows of the bench's pairs file, one per prompt


def bench_pairs(resolution: int) -> Path:
    """A small Pick-a-Pic-style parquet of shapes-world pairs rendered at ``resolution``, cached."""
    from sspo.worlds.shapes.world import WORLD_VERSION, make_split, preference_pairs
    from sspo.worlds.world_data import cached_parquet

    return cached_parquet(f"bench-shapes-pairs-v{WORLD_VERSION}-r{resolution}-n{BENCH_PAIRS}.parquet",
                          lambda: preference_pairs(make_split(0).train[:BENCH_PAIRS], 1, seed=0, size=resolution))


def model_overrides(b: BenchConfig) -> list[str]:
    """TrainConfig overrides that point the demo config at the benchmarked model and its data."""
    if b.model in ("tiny", "quick"):
        out = [f"model.pretrained=shapes-base{':quick' if b.model == 'quick' else ''}"]
        return out + ([f"data.resolution={b.resolution}"] if b.resolution else [])
    folder = _model_folder(b)
    resolution = b.resolution or native_resolution(folder)
    return [f"model.pretrained={folder}", "data.source=parquet", f"data.path={bench_pairs(resolution)}", f"data.resolution={resolution}",
            *family_overrides(folder)]


def _model_folder(b: BenchConfig) -> Path:
    return build_arch(b.model, words=shapes_vocabulary()) if b.model in ARCH_MODELS else Path(b.model).expanduser().resolve()


def family_overrides(folder: Path) -> list[str]:
    """The settings (:data:`FAMILY_KEYS`) of the shipped config of the pipeline's family
    (``ModelFamily.bench_config``); none for a family without one, or a pipeline of none."""
    from sspo.errors import ModelError
    from sspo.models.families import family_of
    from sspo.training.run_state import flatten

    index = folder / "model_index.json"
    try:
        name = family_of(json.loads(index.read_text())).bench_config if index.is_file() else None
    except ModelError:  # no known family: the run names the problem
        name = None
    if name is None:
        return []
    return [f"{key}={json.dumps(value)}" for key, value in flatten(load_yaml(CONFIGS / name)).items()
            if any(key == wanted or key.startswith(wanted + ".") for wanted in FAMILY_KEYS)]


def model_notes(b: BenchConfig) -> dict:
    """What stands in for what in a random-weight architecture (its text encoder, say); {} for other models."""
    return {} if b.model in ("tiny", "quick") else arch_notes(_model_folder(b))


REALISTIC_BATCH = 8  # per device: a micro-batch at which a GPU is busy
REALISTIC_NEGATIVES = 64  # negatives generated per iteration, at least


def train_config(b: BenchConfig, arm: str, output_dir: str | Path):
    from sspo.training.config import TrainConfig

    overrides = [
        f"output_dir={output_dir}", "report_to=none", "validation.every_iterations=0", "validation.world_eval=false",
        f"mixed_precision={b.mixed_precision}", f"model.lora={str(b.lora).lower()}",
        f"model.gradient_checkpointing={str(b.gradient_checkpointing).lower()}",
    ]
    overrides += model_overrides(b) + arm_overrides()[arm]
    explicit = []
    if b.batch_size:
        explicit.append(f"optim.batch_size={b.batch_size}")
    if b.gradient_accumulation_steps:
        explicit.append(f"optim.gradient_accumulation_steps={b.gradient_accumulation_steps}")
    if b.steps_per_iteration:
        explicit.append(f"steps_per_iteration={b.steps_per_iteration}")
    explicit += list(b.overrides)

    def load(scale: list[str]):  # explicit settings after the realistic scale's: they win
        return load_config(TrainConfig, DEMO_CONFIG, overrides + scale + explicit)

    if not b.realistic:
        return load([])
    scale = [f"optim.batch_size={max(load([]).optim.batch_size, REALISTIC_BATCH)}"]
    cfg = load(scale)
    pairs = cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps  # negatives per optimizer step
    k_updates = max(math.ceil(REALISTIC_NEGATIVES / pairs), math.ceil(b.pool_size * cfg.negatives.batch_size / pairs))
    return load([*scale, f"steps_per_iteration={k_updates}"])
