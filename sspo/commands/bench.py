"""``sspo bench``: time and peak memory of one optimizer step of sft, Diffusion-DPO and SSPO.

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

Data preparation (VAE-encoding winners and dataset losers, text encoding) is common to every
method and timed separately per step. "All-in" per-step cost = data preparation + step +
the pregeneration phase divided by the optimizer steps of an iteration.

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` over the timed steps (reset after warm-up).
On the CPU, each arm runs in a fresh subprocess (``--no-isolate`` turns that off) and reports its
peak *anonymous* resident memory during the timed steps (``RssAnon``: resident pages minus
file-backed and shared ones, read from ``/proc/self/statm`` by a background thread every 1 ms and
at the region's ends) minus the same before the trainer was built, i.e. model weights, optimizer
state, data and activations, not the Python / torch libraries. File-backed pages are left out because
the kernel may evict them under memory pressure, which would lower a total-RSS peak below its
baseline. The sampler's own CPU time is left out of ``--clock cpu``. Each result says its
``memory_method``.

FLOPs: per arm, outside the timed region, :func:`arm_flops` counts with torch's ``FlopCounterMode``
(matmuls, convolutions, attention) one call of the arm's denoiser on micro-batch 0 as the step sees
it: forward, and forward + backward of the policy; and one image of the real sampler at 1 and 2
steps (their difference is one sampler step, classifier-free guidance included). Each phase's FLOPs
follow: step = policy forward + backward (+ the reference forward and the sampling where the arm
does them in the step); reference phase = a forward on x_w and x_l per pair; generation = S
sampler steps per negative. Data preparation is not counted. Achieved FLOP/s = FLOPs / measured
seconds, and "% of peak" divides by :func:`device_peak`: a spec-sheet table of dense GPU peaks per
precision, or on the CPU threads x clock x fp32 FLOPs per cycle of its widest vector ISA (an
assumption the result states); unknown devices get none.

The FLOP floor of the all-in ratio is what it would be if every phase ran at the same FLOP/s: an
arm's FLOPs per trained pair over dpo's. In units of one denoiser forward on one sample, with
``c`` = forward + backward over forward (about 2 with LoRA, which computes no weight gradients for
the frozen base; about 3 fully fine-tuned) and ``g`` forwards per sampler step (2 with
classifier-free guidance, 1 without)::

    dpo                = 2c + 2             (policy on x_w and x_l, reference forward on both)
    sspo-pregenerated  = 2c + 2 + g S       (the same, and one negative sampled in S steps)
    floor              = (2c + 2 + g S) / (2c + 2)  = (6 + 2S) / 6 with LoRA and guidance

The measured all-in ratio over the floor says how much the implementation loses to the FLOP count
(generation's small per-call batches, sampler overhead); 1 would be none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from sspo.config import check, load_config, load_yaml, setting, validate
from sspo.errors import SSPOError
from sspo.models.architectures import ARCH_MODELS, ARCH_TITLES, arch_notes, build_arch, native_resolution
from sspo.paths import CONFIGS
from sspo.training.methods import METHODS
from sspo.worlds.shapes.world import vocabulary as shapes_vocabulary

# The default arms: the baselines and SSPO, each as published and as sspo runs it.
ARMS = ("sft", "dpo", "dpo-cached", "sspo-online", "sspo-pregenerated")
BASELINE = "dpo"
MODELS = ("tiny", "quick", *ARCH_MODELS)  # or a local diffusers pipeline folder
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


def _pregenerated(arm: str) -> bool:
    """Its reference errors (and negatives) are built in a phase before the steps, timed apart."""
    return "cache_reference_errors=true" in arm_overrides()[arm]


@dataclasses.dataclass
class BenchConfig:
    model: str = "tiny"  # tiny | quick | sd15 | sdxl | sd35m | flux (random weights) | a diffusers pipeline folder
    batch_size: int | None = setting(None, at_least=1)  # per micro-batch; None: the demo config's (16)
    gradient_accumulation_steps: int | None = setting(None, at_least=1)
    mixed_precision: str = setting("no", choices=("no", "fp16", "bf16"))  # no | fp16 | bf16: the trainer's mixed_precision
    lora: bool = True  # False: full fine-tuning
    gradient_checkpointing: bool = False
    warmup: int = setting(2, at_least=0)  # optimizer steps before timing (first steps allocate optimizer state)
    steps: int = setting(10, at_least=1)  # timed optimizer steps per arm; median and p90 are reported
    arms: tuple[str, ...] = setting(ARMS, choices=arm_overrides(), nonempty=True)
    sampler_steps: tuple[int, ...] = setting((20, 50), at_least=1)  # also measure generation at these (the paper's 20-50)
    steps_per_iteration: int | None = setting(None, at_least=1)  # K_updates; None: the demo config's (20)
    pool_size: int = setting(3, at_least=1)  # sspo arms: checkpoints in the pool (as mid-training; 1 = {theta_0})
    resolution: int | None = setting(None, at_least=8, multiple_of=8)  # training resolution (a multiple of the VAE's 8); None: the model's native one
    threads: int | None = setting(None, at_least=1)  # torch intra-op threads on the CPU; None: torch's default
    clock: str = setting("wall", choices=("wall", "cpu"))  # wall | cpu (process CPU time: with threads=1, robust to other jobs on a shared CPU)
    isolate: bool = True  # one subprocess per arm (clean memory numbers)
    allow_cpu: bool = False  # run sd15 / sdxl / sd35m / flux on the CPU anyway
    realistic: bool = False  # batch >= 8 and K_updates giving >= 64 negatives an iteration, full generation batches per pool checkpoint
    overrides: tuple[str, ...] = ()  # extra TrainConfig overrides, e.g. negatives.guidance_scale=7.5

    def __post_init__(self) -> None:
        self.arms, self.sampler_steps, self.overrides = tuple(self.arms), tuple(self.sampler_steps), tuple(self.overrides)
        validate(self)
        check(self.model in MODELS or Path(self.model).expanduser().is_dir(), "model", f"got {self.model!r}: expected one of {', '.join(MODELS)} or a diffusers pipeline folder")


# --------------------------------------------------------------------------------------------------
# Models: the shapes world's tiny base, or SD-1.5 / SDXL / SD3.5-medium / FLUX.1-dev architectures with random weights.

# A flow-matching pipeline trains as its shipped config says: LoRA targets, flow matching's sigma
# draws and guidance, negatives from the pipeline's own sampler (at its steps and guidance), and
# latents and text embeddings encoded once (data.cache_latents), so T5 runs before the steps.
FLOW_CONFIGS = {"StableDiffusion3Pipeline": "sd35-lora.yaml", "FluxPipeline": "flux-lora.yaml"}
FLOW_KEYS = ("model.lora_targets", "flow", "negatives.scheduler", "negatives.steps", "negatives.guidance_scale", "data.cache_latents")


def bench_pairs(resolution: int, rows: int = 64) -> Path:
    """A small Pick-a-Pic-style parquet of shapes-world pairs rendered at ``resolution``, cached."""
    from filelock import FileLock

    from sspo.paths import cache_root
    from sspo.worlds.shapes.world import WORLD_VERSION, make_split, preference_pairs, write_pickapic_parquet

    path = cache_root() / "bench" / f"shapes-pairs-v{WORLD_VERSION}-r{resolution}-n{rows}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            write_pickapic_parquet(path, preference_pairs(make_split(0).train[:rows], 1, seed=0, size=resolution))
    return path


def _model_overrides(b: BenchConfig) -> list[str]:
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
    """A flow-matching pipeline's settings (:data:`FLOW_KEYS`) from its shipped config; none for the others."""
    index = folder / "model_index.json"
    name = FLOW_CONFIGS.get(json.loads(index.read_text()).get("_class_name")) if index.is_file() else None
    if name is None:
        return []
    from sspo.training.run_state import flatten

    return [f"{key}={json.dumps(value)}" for key, value in flatten(load_yaml(CONFIGS / name)).items()
            if any(key == wanted or key.startswith(wanted + ".") for wanted in FLOW_KEYS)]


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
    overrides += _model_overrides(b) + arm_overrides()[arm]
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


# --------------------------------------------------------------------------------------------------
# Measuring one arm (in this process).


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_bytes() -> int | None:
    """Anonymous resident memory (the kernel's RssAnon): resident minus file-backed and shared pages,
    read from ``/proc/self/statm`` (a few microseconds); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * _PAGE


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _preimport() -> None:
    """Import what the trainer imports lazily, so library code does not count as the arm's memory."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401  (and their denoisers)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    from sspo.training import (
        trainer,  # noqa: F401
    )

    for name in ("pandas", "pyarrow.parquet", "datasets", "diffusers.schedulers", "diffusers.guiders"):  # the data layer's readers
        with contextlib.suppress(ImportError):
            __import__(name)


class AnonPeak:
    """The peak of anonymous resident memory over a region, sampled by a background thread.

    Anonymous pages are what the process allocates (tensors, heap); file-backed pages (mapped
    libraries and weights, page cache) are left out, so the kernel evicting them under memory
    pressure cannot lower the result. The thread reads ``/proc/self/statm`` every ``interval`` s
    (torch releases the GIL in its kernels), and at the region's start and end; an allocation freed
    within one interval can be missed. Its own CPU time is kept in ``cpu_s`` so a CPU clock can
    leave it out.
    """

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self.cpu_s = interval, 0, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop()
        self.peak = _anon_bytes() or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="sspo-bench-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        spent_before = self.cpu_s
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _anon_bytes() or 0)
            self.cpu_s = spent_before + time.thread_time()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, _anon_bytes() or 0)
        return self.peak


class Meter:
    """Peak memory of a region: CUDA allocator peak on a GPU, peak anonymous memory on the CPU (see module doc)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sampler = None if self.cuda or _anon_bytes() is None else AnonPeak()
        if not self.cuda:
            # The same clean-up as reset(): an earlier arm's garbage (in-process runs) freed after the
            # baseline was read would make the peak above it too small, even negative.
            gc.collect()
            _malloc_trim()
        self.baseline = 0 if self.sampler is None else _anon_bytes()
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        elif self.sampler is not None:
            self.method = (f"peak anonymous RSS (RssAnon from /proc/self/statm, sampled every {self.sampler.interval * 1e3:g} ms "
                           "and at the region's ends) - anonymous RSS before the trainer")
        else:
            self.method = "ru_maxrss (process lifetime peak RSS: no /proc/self/statm)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def process_time(self) -> float:
        """This process's CPU time, less what the memory sampler spent."""
        return time.process_time() - (self.sampler.cpu_s if self.sampler is not None else 0.0)

    def reset(self) -> None:
        self.sync()
        gc.collect()
        _malloc_trim()  # freed heap memory back to the OS, so an earlier phase does not count here
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.sampler is not None:
            self.sampler.start()

    def peak_mb(self) -> dict:
        self.sync()
        if self.cuda:
            return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
        if self.sampler is None:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
            return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
        peak = self.sampler.stop()
        return {"peak_mb": (peak - self.baseline) / 2**20, "peak_anon_mb": peak / 2**20}


def _from_rows(build: Callable[[list[int]], list], trainer, prepared: list[tuple[int, object]]) -> list:
    """``build`` (pairs of micro-batch numbers) on rows read before (data preparation is timed apart)."""
    with trainer.pair_builder.rows_from(dict(prepared)):
        return build([m for m, _ in prepared])


class _PhaseTimer:
    """Times the PairBuilder's phases (its ``around_phase`` hook): generating negatives, reference forwards."""

    def __init__(self, builder, meter: Meter, clock: Callable[[], float]):
        self.meter, self.clock, self.seconds = meter, clock, {"generate": 0.0, "reference": 0.0}
        builder.around_phase = self._timed

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        self.meter.sync()
        start = self.clock()
        try:
            yield
        finally:
            self.meter.sync()
            self.seconds[phase] += self.clock() - start

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {"generate": 0.0, "reference": 0.0}
        return seconds


def run_arm(b: BenchConfig, arm: str) -> dict:
    """Build a trainer for ``arm`` and time its optimizer steps (and pregeneration phase)."""
    if b.threads:
        torch.set_num_threads(b.threads)
    with tempfile.TemporaryDirectory(prefix=f"sspo-bench-{arm}-") as out:
        cfg = train_config(b, arm, out)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _preimport()
        from sspo.training.trainer import Trainer

        gc.collect()
        _malloc_trim()
        meter = Meter(device)  # RSS baseline: libraries imported, no model loaded yet

        trainer = Trainer(cfg)
        try:
            return _measure(trainer, cfg, b, arm, meter)
        except torch.OutOfMemoryError as exc:
            return {"arm": arm, "error": f"out of memory: {str(exc).splitlines()[0]}"}
        finally:
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _measure(trainer, cfg, b: BenchConfig, arm: str, meter: Meter) -> dict:
    accum, batch = cfg.optim.gradient_accumulation_steps, cfg.optim.batch_size
    if cfg.generates_negatives:  # a pool as in the middle of training: more checkpoints, smaller groups
        for k in range(1, b.pool_size):
            trainer.pool.add(trainer.reference.policy_state(), step=k * cfg.steps_per_iteration)
    flops = arm_flops(trainer, cfg, _pregenerated(arm))  # before anything is timed
    clock = meter.process_time if b.clock == "cpu" else time.perf_counter
    phases = _PhaseTimer(trainer.pair_builder, meter, clock)
    builder = trainer.pair_builder
    prep_seconds: list[float] = []

    def prepare(first: int, count: int) -> list:
        batches = []
        for m in range(first, first + count):
            meter.sync()
            start = clock()
            batches.append((m, trainer.read_rows(m)))
            meter.sync()
            prep_seconds.append(clock() - start)
        return batches

    result: dict = {"arm": arm, "device": str(trainer.device), "threads": torch.get_num_threads(), "batch_size": batch,
                    "gradient_accumulation_steps": accum, "steps_per_iteration": cfg.steps_per_iteration,
                    "mixed_precision": cfg.mixed_precision, "lora": cfg.model.lora, "memory_method": meter.method, "flops": flops}
    total = b.warmup + b.steps
    if _pregenerated(arm):
        k_updates = cfg.steps_per_iteration
        # Warm the generation / reference code paths on a throwaway micro-batch, then one iteration.
        _from_rows(trainer.iteration_pairs, trainer, prepare(10**6, 1))
        prep_seconds.clear()
        phases.take()
        prepared = prepare(0, k_updates * accum)
        meter.reset()
        start = clock()
        batches = _from_rows(trainer.iteration_pairs, trainer, prepared)
        meter.sync()
        elapsed, seconds = clock() - start, phases.take()
        result["pregeneration"] = {
            "micro_batches": len(batches), "images": len(batches) * batch if cfg.generates_negatives else 0,
            "seconds": elapsed, "generate_s": seconds["generate"], "reference_s": seconds["reference"],
            **meter.peak_mb(),
        }
        groups = [batches[i * accum : (i + 1) * accum] for i in range(k_updates)]
        work = [groups[i % k_updates] for i in range(total)]  # cached reference errors: reuse is exact

        def step(group):
            return trainer.optimizer_step(group)
    else:
        work = [prepare(i * accum, accum) for i in range(total)]
        if not cfg.pregenerate:  # online: the step builds its pairs

            def step(group):
                return trainer.optimizer_step(_from_rows(builder.build, trainer, group))
        else:  # reference errors not cached: computed in the step, as Diffusion-DPO does
            work = [_from_rows(lambda ms: builder.build(ms, with_reference=False), trainer, group) for group in work]

            def step(group):
                return trainer.optimizer_step(builder.complete(group))

    times, walls, cpus, breakdown = [], [], [], []
    for i, group in enumerate(work):
        if i == b.warmup:
            meter.reset()
            phases.take()
        meter.sync()
        wall, cpu = time.perf_counter(), meter.process_time()
        step(group)
        meter.sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(meter.process_time() - cpu)
        times.append(cpus[-1] if b.clock == "cpu" else walls[-1])
        if i >= b.warmup:
            breakdown.append(phases.take())
    result.update(meter.peak_mb())
    result["clock"] = b.clock
    result["step_s"] = times[b.warmup :]  # in the chosen clock; both clocks below
    result["step_wall_s"], result["step_cpu_s"] = walls[b.warmup :], cpus[b.warmup :]
    result["warmup_s"] = times[: b.warmup]
    result["prepare_s_per_step"] = statistics.median(prep_seconds) * accum
    result["in_step_generate_s"] = statistics.median(x["generate"] for x in breakdown)
    result["in_step_reference_s"] = statistics.median(x["reference"] for x in breakdown)
    if arm == "sspo-pregenerated":
        result["generation"] = _generation_rates(trainer, cfg, b, batches, phases)
    return result


def _generation_rates(trainer, cfg, b: BenchConfig, batches: list, phases: _PhaseTimer) -> dict:
    """Images/s of negative generation at the configured and the paper's sampler step counts.

    Measured on one generation chunk (``negatives.batch_size`` images, or the iteration if fewer)
    drawn from the iteration's micro-batches, so every step count sees the same batching.
    """
    per_batch = len(batches[0])
    chunk = batches[: max(1, min(len(batches), math.ceil(cfg.negatives.batch_size / per_batch)))]
    images = sum(len(x) for x in chunk)
    rates = {}
    for steps in sorted({cfg.negatives.steps, *b.sampler_steps}):
        phases.take()
        generate = functools.partial(trainer.pair_builder.build, with_reference=False, sampler_steps=steps)  # generation only
        _from_rows(generate, trainer, [(x.index, x.rows) for x in chunk])
        rates[str(steps)] = images / phases.take()["generate"]
    return {"images": images, "images_per_s": rates, "configured_steps": cfg.negatives.steps, "scheduler": cfg.negatives.scheduler,
            "guidance_scale": cfg.negatives.guidance_scale, "generation_batch_size": cfg.negatives.batch_size}


# --------------------------------------------------------------------------------------------------
# FLOPs: one denoiser call counted on the arm's model, batch and condition; the phases derived.


def flop_counter():
    """torch's FlopCounterMode (matmuls, convolutions, attention), taught the CPU's fused attention kernels."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    cpu_attention = {}
    for cpu_op, same_as in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
                            ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward")):
        if hasattr(aten, cpu_op):  # the registry's formula unwrapped: FlopCounterMode wraps custom ones itself
            formula = flop_registry[getattr(aten, same_as)]
            cpu_attention[getattr(aten, cpu_op)] = getattr(formula, "__wrapped__", formula)
    return FlopCounterMode(display=False, custom_mapping=cpu_attention)


def count_flops(fn: Callable[[], object]) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def arm_flops(trainer, cfg, pregenerated: bool) -> dict:
    """FLOPs of each phase of one optimizer step of this arm, from denoiser calls counted once.

    Counted on micro-batch 0 as the step sees it (winner and loser in one call for preference
    methods): the policy's forward, and forward + backward. Negative generation is counted on the
    real sampler for one image at 1 and 2 sampler steps: the difference is one sampler step
    (classifier-free guidance included), the rest a fixed cost per image. Reference forwards are
    costed as the policy's forward (a LoRA reference differs only in its adapter's few FLOPs).
    Data preparation (VAE and text encoding) is not counted.
    """
    rows, family, device = trainer.read_rows(0), trainer.family, trainer.device
    batch, accum = len(rows.prompts), cfg.optim.gradient_accumulation_steps
    latents, cond = (torch.cat([rows.winners, rows.winners]), rows.cond.repeat(2)) if cfg.uses_reference else (rows.winners, rows.cond)
    generator = torch.Generator().manual_seed(0)
    noise, timesteps = torch.randn(latents.shape, generator=generator), family.draw_timesteps((len(latents),), generator)

    def errors():
        return family.denoising_errors(trainer.denoiser, latents.to(device), noise.to(device), timesteps.to(device), cond)

    with torch.no_grad():
        forward = count_flops(errors)
    forward_backward = count_flops(lambda: errors().mean().backward())
    trainer.optimizer.zero_grad(set_to_none=True)
    per_sample = forward / len(latents)
    # ssr_draws > 1: more no-grad forwards per winner, by the policy in the step and the reference with its errors
    switch = cfg.ssr_draws - 1 if cfg.uses_reference and cfg.effective_ssr != "off" else 0
    out = {"forward": forward, "forward_backward": forward_backward, "samples_per_call": len(latents), "forward_per_sample": per_sample,
           "policy": accum * (forward_backward + batch * switch * per_sample), "reference": 0.0, "generation": 0.0}
    if cfg.uses_reference:
        out["reference"] = accum * batch * (2 + switch) * per_sample
    if cfg.generates_negatives:
        one, two = (_sampling_flops(trainer, cfg, rows, steps) for steps in (1, 2))
        out["generation_per_sampler_step"], out["generation_fixed"] = two - one, 2 * one - two
        out["forward_calls_per_sampler_step"] = (two - one) / per_sample  # 2 with classifier-free guidance
        out["images_per_step"], out["sampler_steps"] = accum * batch, cfg.negatives.steps
        out["generation"] = out["images_per_step"] * generation_flops(out, cfg.negatives.steps)
    out["step"] = out["policy"] + (0.0 if pregenerated else out["reference"] + out["generation"])
    out["all_in"] = out["policy"] + out["reference"] + out["generation"]  # per optimizer step, data preparation left out
    return out


def generation_flops(flops: dict, sampler_steps: int) -> float:
    """FLOPs of generating one negative at ``sampler_steps`` steps."""
    return flops["generation_fixed"] + sampler_steps * flops["generation_per_sampler_step"]


def _sampling_flops(trainer, cfg, rows, steps: int) -> int:
    settings = dataclasses.replace(cfg.negatives, steps=steps)
    with torch.no_grad(), trainer.accelerator.autocast():
        return count_flops(lambda: trainer.pair_builder.sample(trainer.policy, rows.cond[0:1], [0], settings, rows.winners.shape[2:]))


def flop_floor(flops: dict, baseline: dict, sampler_steps: int | None = None) -> float:
    """All-in FLOPs per trained pair of an arm over the baseline's: the all-in ratio if every phase ran at one FLOP/s.

    ``sampler_steps`` re-costs generation at another step count (the arm's flops were counted at its own).
    """
    all_in = flops["all_in"]
    if sampler_steps is not None and flops["generation"]:
        all_in += flops["images_per_step"] * generation_flops(flops, sampler_steps) - flops["generation"]
    return all_in / baseline["all_in"]


# Dense peak FLOP/s by device name (spec sheets, no sparsity), per precision: bf16, fp16, fp32 (no tensor cores / TF32).
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H200|H100.*(SXM|HBM3)", {"bf16": 989e12, "fp16": 989e12, "no": 67e12}),
    (r"H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "no": 51e12}),
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "no": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "no": 91.6e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "no": 30.3e12}),
    (r"A10G?\b", {"bf16": 125e12, "fp16": 125e12, "no": 31.2e12}),
)
# fp32 FLOPs per cycle and core: two FMA units of the widest vector width the CPU reports, 2 FLOPs per FMA lane.
CPU_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16), ("sse2", 8))


def device_peak(precision: str, threads: int | None) -> dict:
    """The peak FLOP/s that "% of peak" divides by, and how it was obtained (``flops_per_s`` None when unknown)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for pattern, peaks in GPU_PEAKS:
            if re.search(pattern, name):
                return {"flops_per_s": peaks[precision], "basis": f"{name}: dense {'fp32' if precision == 'no' else precision} spec-sheet peak"}
        return {"flops_per_s": None, "basis": f"{name}: not in the peak table, so no % of peak"}
    if precision != "no":
        return {"flops_per_s": None, "basis": f"CPU peak estimated for fp32 only, not {precision}"}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split())
        mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M).group(1))
    except (OSError, AttributeError):
        return {"flops_per_s": None, "basis": "CPU: no /proc/cpuinfo clock and flags, so no % of peak"}
    isa, per_cycle = next(((f, n) for f, n in CPU_FLOPS_PER_CYCLE if f in flags), ("scalar", 2))
    cores = threads or torch.get_num_threads()
    return {"flops_per_s": cores * mhz * 1e6 * per_cycle,
            "basis": f"CPU estimate: {cores} core(s) x {mhz / 1e3:.2f} GHz (/proc/cpuinfo) x {per_cycle} fp32 FLOPs/cycle "
                     f"({isa}: two FMA units, an assumption)"}


# --------------------------------------------------------------------------------------------------
# The whole benchmark: arms in subprocesses, summary, table.


def machine_info(device: str | None = None) -> dict:
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def check_device(b: BenchConfig) -> None:
    if b.clock == "cpu" and torch.cuda.is_available():
        raise SSPOError("--clock cpu measures this process's CPU time, which says nothing about GPU work; use the default --clock wall on a GPU")
    if b.model in ARCH_MODELS and not torch.cuda.is_available() and not b.allow_cpu:
        raise SSPOError(
            f"model {b.model!r} is the full {ARCH_TITLES[b.model]} architecture, meant for a GPU, and no CUDA device is available; "
            "use --model tiny on the CPU, or pass --allow-cpu to run it here anyway (slow, many GB of RAM)"
        )


def _run_isolated(b: BenchConfig, arm: str, workdir: Path) -> dict:
    config, out = workdir / f"{arm}.config.json", workdir / f"{arm}.result.json"
    config.write_text(json.dumps(dataclasses.asdict(b)))
    cmd = [sys.executable, "-m", "sspo", "bench", "--worker", arm, "--worker-config", str(config), "--worker-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"arm": arm, "error": f"worker exited with {proc.returncode}:\n{tail}"}
    return json.loads(out.read_text())


def worker(arm: str, config_path: str | Path, out_path: str | Path) -> None:
    """Subprocess entry point: run one arm, write its result as JSON."""
    from sspo.io import atomic_write_json

    b = BenchConfig(**json.loads(Path(config_path).read_text()))
    atomic_write_json(out_path, run_arm(b, arm))


def run_bench(b: BenchConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    check_device(b)
    started = time.perf_counter()
    info = machine_info()
    if b.model in ("tiny", "quick"):  # build the cached base once, not in every worker
        from sspo.training.trainer import resolve_model

        resolve_model(f"shapes-base{':quick' if b.model == 'quick' else ''}")
    else:
        _model_overrides(b)  # builds the architecture folder and the data at the right resolution
    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sspo-bench-") as workdir:
        for arm in b.arms:
            log(f"bench: {arm} ...")
            t0 = time.perf_counter()
            arms[arm] = _run_isolated(b, arm, Path(workdir)) if b.isolate else run_arm(b, arm)
            log(f"bench: {arm} done in {time.perf_counter() - t0:.0f} s" + (f" -- {arms[arm]['error']}" if "error" in arms[arm] else ""))
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    first = next((r for r in arms.values() if "error" not in r), {})
    info.update({k: first[k] for k in ("device", "threads") if k in first})
    info["peak"] = device_peak(b.mixed_precision, first.get("threads", b.threads))
    return {"bench": dataclasses.asdict(b), "machine": info, "model": model_notes(b), "settings": {k: first.get(k) for k in SETTING_KEYS},
            "arms": arms, "summary": summarize_arms(arms, info["peak"]["flops_per_s"]), "wall_s": time.perf_counter() - started}


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rate(flops: float | None, seconds: float | None, peak: float | None) -> dict:
    """Achieved FLOP/s of a phase and its share of the device's peak (None where unknown)."""
    per_s = _ratio(flops, seconds) if flops else None
    return {"flops_per_s": per_s, "peak_fraction": _ratio(per_s, peak)}


def summarize_arms(arms: dict[str, dict], peak: float | None = None) -> dict:
    """Per-arm medians, all-in per-step cost, ratios to dpo, FLOP rates and floors, generation share."""
    rows = {}
    for arm, r in arms.items():
        if "error" in r:
            rows[arm] = {"error": r["error"]}
            continue
        row = {"step_s": statistics.median(r["step_s"]), "p90_s": _p90(r["step_s"]), "peak_mb": r["peak_mb"],
               "prepare_s": r["prepare_s_per_step"], "in_step_generate_s": r["in_step_generate_s"], "in_step_reference_s": r["in_step_reference_s"]}
        row["all_in_s"] = row["prepare_s"] + row["step_s"]
        row["all_in_peak_mb"] = r["peak_mb"]
        flops = r.get("flops")
        if flops:
            row["step_flops"], row["all_in_flops"] = flops["step"], flops["all_in"]
            row["step_rate"] = _rate(flops["step"], row["step_s"], peak)
        if "pregeneration" in r:
            pre, k = r["pregeneration"], r["steps_per_iteration"]
            row["pregeneration_s_per_step"] = pre["seconds"] / k
            row["pregeneration_peak_mb"] = pre["peak_mb"]
            row["all_in_s"] += row["pregeneration_s_per_step"]
            row["all_in_peak_mb"] = max(r["peak_mb"], pre["peak_mb"])
            if flops:
                row["generation_rate"] = _rate(k * flops["generation"], pre["generate_s"], peak)
                row["reference_rate"] = _rate(k * flops["reference"], pre["reference_s"], peak)
        rows[arm] = row
    base = rows.get(BASELINE, {})
    base_flops = arms.get(BASELINE, {}).get("flops")
    for arm, row in rows.items():
        if "error" not in row:
            row["time_ratio"] = _ratio(row["step_s"], base.get("step_s"))
            row["memory_ratio"] = _ratio(row["peak_mb"], base.get("peak_mb"))
            row["all_in_ratio"] = _ratio(row["all_in_s"], base.get("all_in_s"))
            row["all_in_memory_ratio"] = _ratio(row["all_in_peak_mb"], base.get("all_in_peak_mb"))
            if base_flops and arms[arm].get("flops"):
                row["flop_floor"] = flop_floor(arms[arm]["flops"], base_flops)
                row["over_floor"] = _ratio(row["all_in_ratio"], row["flop_floor"])
    summary: dict = {"rows": rows}
    sspo = arms.get("sspo-pregenerated", {})
    if "generation" in sspo:
        summary["generation"] = generation_share(sspo, base_flops)
    return summary


def generation_share(r: dict, baseline_flops: dict | None = None) -> dict:
    """Negative generation's share of training wall time, per sampler step count.

    An iteration = pregeneration (generation + reference errors + data preparation) + K_updates
    policy-only steps. Generation time at other step counts scales the measured iteration's by the
    ratio of throughputs measured on the same chunk. (The share does not depend on K_updates: each
    step consumes batch x accumulation fresh negatives either way.) With the baseline's FLOPs, each
    step count also gets its FLOP floor of the all-in ratio (:func:`flop_floor`).
    """
    gen, pre, k = r["generation"], r["pregeneration"], r["steps_per_iteration"]
    rates = gen["images_per_s"]
    configured = rates[str(gen["configured_steps"])]
    prepare_iteration = r["prepare_s_per_step"] * k
    train_iteration = statistics.median(r["step_s"]) * k
    rows = {}
    for steps, rate in rates.items():
        generate = pre["generate_s"] * configured / rate
        total = generate + pre["reference_s"] + prepare_iteration + train_iteration
        rows[steps] = {"images_per_s": rate, "generate_s_per_iteration": generate, "iteration_s": total, "share": generate / total}
        if baseline_flops and r.get("flops"):
            rows[steps]["flop_floor"] = flop_floor(r["flops"], baseline_flops, int(steps))
    return {"images_per_iteration": pre["images"], "measured_on_images": gen["images"], "steps": rows,
            "scheduler": gen["scheduler"], "guidance_scale": gen["guidance_scale"], "generation_batch_size": gen["generation_batch_size"],
            "configured_steps": gen["configured_steps"]}


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _giga(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e9:,.0f}" if value >= 1e11 else f"{value / 1e9:.3g}"


def _rate_cells(rate: dict | None) -> str:
    """``GFLOP/s | % of peak`` table cells."""
    rate = rate or {}
    fraction = rate.get("peak_fraction")
    return f"{_giga(rate.get('flops_per_s'))} | {'' if fraction is None else f'{fraction:.1%}'}"


def _flop_lines(result: dict) -> list[str]:
    rows = {arm: row for arm, row in result["summary"]["rows"].items() if "step_flops" in row}
    if not rows:
        return []
    peak = result["machine"].get("peak", {})
    known = peak.get("flops_per_s")
    lines = ["", f"FLOPs (torch FlopCounterMode: matmuls, convolutions, attention; one denoiser call counted per arm, phases derived; "
                 f"data preparation not counted). Peak: {peak.get('basis', 'unknown')}" + (f" = {_giga(known)} GFLOP/s." if known else "."), "",
             "| arm | step GFLOP | step GFLOP/s | % of peak | all-in GFLOP/step | all-in / dpo (measured) | FLOP floor / dpo | measured / floor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, row in rows.items():
        lines.append(f"| {arm} | {_giga(row['step_flops'])} | {_rate_cells(row['step_rate'])} | {_giga(row['all_in_flops'])} | "
                     f"{_f(row['all_in_ratio'], 2)} | {_f(row.get('flop_floor'), 2)} | {_f(row.get('over_floor'), 2)} |")
    return lines


def format_table(result: dict) -> str:
    b, info, s = result["bench"], result["machine"], result["settings"]
    rows, lines = result["summary"]["rows"], []
    device = info.get("gpu") or f"{info['cpu']}, {info.get('threads', '?')} thread(s)"
    lines.append(f"sspo bench: model {b['model']}, batch {s.get('batch_size')} x accum {s.get('gradient_accumulation_steps')}, "
                 f"precision {s.get('mixed_precision')}, {'LoRA' if s.get('lora') else 'full fine-tuning'}, "
                 f"K_updates {s.get('steps_per_iteration')}, pool {b['pool_size']}; {device}; median of {b['steps']} steps after {b['warmup']} warm-up; "
                 f"{'process CPU time' if b.get('clock') == 'cpu' else 'wall-clock time'}")
    load = info.get("load_average_at_start")
    if load and b.get("clock") != "cpu" and not info.get("gpu") and load[0] > 1.0:
        lines.append(f"Warning: the CPU was busy with other work (load average {load[0]} at start); wall-clock times are noisy, "
                     "rerun with --threads 1 --clock cpu for comparable numbers.")
    lines.append("")
    lines.append("| arm | step s (median) | p90 s | peak MB | time / dpo | memory / dpo | all-in s/step | all-in / dpo |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm, row in rows.items():
        if "error" in row:
            lines.append(f"| {arm} | {row['error'].splitlines()[0]} | | | | | | |")
            continue
        lines.append(f"| {arm} | {_f(row['step_s'])} | {_f(row['p90_s'])} | {_f(row['peak_mb'], 0)} | {_f(row['time_ratio'], 2)} | "
                     f"{_f(row['memory_ratio'], 2)} | {_f(row['all_in_s'])} | {_f(row['all_in_ratio'], 2)} |")
    lines.append("")
    lines.append("All-in = data preparation (VAE + text encoding, the same work for every method) + step + pregeneration phase / K_updates.")
    lines += _flop_lines(result)
    pre_rows = [(arm, row) for arm, row in rows.items() if "pregeneration_s_per_step" in row]
    if pre_rows:
        lines.append("")
        lines.append("| pregeneration phase | s / iteration | s / step (amortised) | generation s | generation GFLOP/s | % of peak | "
                     "reference s | reference GFLOP/s | % of peak | peak MB | memory / dpo |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for arm, row in pre_rows:
            pre = result["arms"][arm]["pregeneration"]
            generation = _rate_cells(row.get("generation_rate")) if pre["generate_s"] else " | "
            lines.append(f"| {arm} | {_f(pre['seconds'], 2)} | {_f(row['pregeneration_s_per_step'])} | {_f(pre['generate_s'], 2)} | {generation} | "
                         f"{_f(pre['reference_s'], 2)} | {_rate_cells(row.get('reference_rate'))} | {_f(pre['peak_mb'], 0)} | "
                         f"{_f(_ratio(pre['peak_mb'], rows.get(BASELINE, {}).get('peak_mb')), 2)} |")
    online = rows.get("sspo-online", {})
    if "step_s" in online:
        lines.append("")
        lines.append(f"sspo-online step = generation {_f(online['in_step_generate_s'])} s + reference {_f(online['in_step_reference_s'])} s "
                     f"+ policy {_f(online['step_s'] - online['in_step_generate_s'] - online['in_step_reference_s'])} s (medians).")
    gen = result["summary"].get("generation")
    if gen:
        lines.append("")
        lines.append(f"Negative generation ({gen['scheduler']}, guidance {gen['guidance_scale']}, generation batch {gen['generation_batch_size']}; "
                     f"{gen['images_per_iteration']} negatives per iteration; rates measured on {gen['measured_on_images']} images):")
        lines.append("")
        lines.append("| sampler steps | images/s | generation s / iteration | share of training wall time | all-in FLOP floor / dpo |")
        lines.append("| ---: | ---: | ---: | ---: | ---: |")
        for steps, row in sorted(gen["steps"].items(), key=lambda kv: int(kv[0])):
            mark = " (configured)" if int(steps) == gen["configured_steps"] else ""
            lines.append(f"| {steps}{mark} | {_f(row['images_per_s'], 1)} | {_f(row['generate_s_per_iteration'], 2)} | {row['share']:.0%} | "
                         f"{_f(row.get('flop_floor'), 2)} |")
    return "\n".join(lines)


NOTES = """\
- **Arms** (same model, batch, precision; each in a fresh process): `sft` = policy forward + backward on
  winners; `dpo` = Diffusion-DPO as published, reference forward on (x_w, x_l) inside the step;
  `dpo-cached` = sspo's trainer default for dpo (reference errors computed once per iteration);
  `sspo-online` = the checkpoint samples x_l, reference forward and policy step, all inside the step;
  `sspo-pregenerated` = the default: an iteration's negatives and reference errors are built up front,
  grouped by checkpoint (the *pregeneration phase*), so the step is policy-only.
- **step s**: one optimizer step, median (p90: nearest rank) of the timed steps after warm-up.
  **all-in s/step**: data preparation (VAE + text encoding, which every method does) + step +
  pregeneration phase / K_updates: the time training actually spends per step.
- **peak MB**: GPU: `torch.cuda.max_memory_allocated` over the timed steps. CPU: peak anonymous RSS
  over the timed steps (RssAnon, sampled every 1 ms and at both ends) minus the same before the trainer
  was built (libraries imported, no model loaded): weights, optimizer state, data and activations;
  file-backed pages, which the kernel may evict under memory pressure, are left out. The pregeneration
  table gives that phase's own peak.
- **FLOPs**: one denoiser call per arm counted with torch's `FlopCounterMode` (forward, forward +
  backward, one sampler step with guidance), each phase's FLOPs derived from it; data preparation is
  not counted. **GFLOP/s** = FLOPs / measured seconds; **% of peak** divides by the stated peak.
  **FLOP floor / dpo** = the arm's FLOPs per trained pair over dpo's: the all-in ratio if every phase
  ran at the same FLOP/s, about (6 + 2S) / 6 for sspo with LoRA, S sampler steps and guidance.
  **measured / floor** = measured all-in ratio / floor: what the implementation adds.
- **Generation share**: generation time / (generation + reference errors + data preparation +
  K_updates steps) per iteration; other sampler step counts scale the measured iteration by the
  throughput ratio measured on the same generation chunk. It does not depend on K_updates: every step
  consumes batch x accumulation fresh negatives.
- **Clock**: `--clock cpu` reports process CPU time; with `--threads 1` that is the uncontended wall time
  of one core, and it stays comparable when other jobs share the CPU (wall-clock times do not).
"""


def write_results(result: dict, stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.json`` (everything, with the machine) and ``<stem>.md`` (the table and the machine)."""
    from sspo.io import atomic_write_json, atomic_write_text

    stem = Path(stem)
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    atomic_write_json(stem.with_suffix(".json"), result)
    info = result["machine"]
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    b = result["bench"]
    command = " ".join(["sspo bench", *_cli_args(b)])
    report = f"# `{command}`\n\n{format_table(result)}\n\n## How to read it\n\n{NOTES}\n## Machine\n\n{machine}\n\n"
    atomic_write_text(stem.with_suffix(".md"), report + f"Benchmark wall time: {result['wall_s']:.0f} s.\n")
    for path in (stem.with_suffix(".json"), stem.with_suffix(".md")):
        path.chmod(0o644)  # meant to be committed; atomic writes create 0600 files
    return stem.with_suffix(".json"), stem.with_suffix(".md")


# Flags are the config's fields (``--batch-size`` sets ``batch_size``); help says what the field does.
FLAG_HELP = {
    "model": "tiny | quick | sd15 | sdxl | sd35m | flux (random-weight architectures, GPU) | a diffusers folder",
    "batch_size": "per micro-batch (default: the demo config's 16)",
    "gradient_accumulation_steps": "micro-batches per optimizer step (default 1)",
    "mixed_precision": "the trainer's mixed_precision: no | fp16 | bf16",
    "lora": "LoRA (--no-lora: full fine-tuning)",
    "gradient_checkpointing": "recompute activations in the backward pass",
    "warmup": "optimizer steps before timing",
    "steps": "timed optimizer steps per arm",
    "arms": f"comma-separated, some of {','.join(arm_overrides())}",
    "sampler_steps": "also measure negative generation at these sampler steps (comma-separated)",
    "steps_per_iteration": "K_updates (default: the demo config's 20)",
    "pool_size": "checkpoints in the pool for the sspo arms",
    "resolution": "training resolution (default: the model's native)",
    "threads": "torch CPU threads (default: torch's)",
    "clock": "wall | cpu (process CPU time: with --threads 1, robust on a shared CPU)",
    "isolate": "each arm in a fresh subprocess (--no-isolate: in this process, CPU memory numbers less clean)",
    "allow_cpu": "run --model sd15/sdxl/sd35m/flux without a GPU",
    "realistic": f"training scale: batch >= {REALISTIC_BATCH}, and the smallest K_updates that generates >= {REALISTIC_NEGATIVES} negatives "
                 "an iteration and fills the generation batch (negatives.batch_size) of every pool checkpoint; explicit flags win",
}


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def add_arguments(parser) -> None:
    """``sspo bench``'s flags, one per :class:`BenchConfig` field; key=value TrainConfig overrides last."""
    import argparse

    for field in dataclasses.fields(BenchConfig):
        if field.name == "overrides":
            continue
        kind, default = str(field.type), field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind == "bool":
            parser.add_argument(_flag(field), action=argparse.BooleanOptionalAction, default=default, help=FLAG_HELP[field.name])
        elif kind.startswith("tuple"):
            parser.add_argument(_flag(field), default=",".join(map(str, default)), help=FLAG_HELP[field.name])
        else:
            parser.add_argument(_flag(field), type=int if "int" in kind else str, default=default, help=FLAG_HELP[field.name])
    parser.add_argument("--out", help="write <out>.json and <out>.md, e.g. docs/bench/tiny-cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="TrainConfig overrides for every arm, e.g. negatives.guidance_scale=7.5")


def config_from_args(args) -> BenchConfig:
    values = {}
    for field in dataclasses.fields(BenchConfig):
        value = getattr(args, field.name)
        if str(field.type).startswith("tuple") and isinstance(value, str):
            value = tuple((int(x) if "int" in str(field.type) else x) for x in value.split(",") if x)
        values[field.name] = tuple(value) if field.name == "overrides" else value
    return BenchConfig(**values)


def _cli_args(b: dict) -> list[str]:
    """The flags that reproduce ``b`` (a :class:`BenchConfig` as a dict), defaults left out."""
    default = dataclasses.asdict(BenchConfig())
    args = []
    for field in dataclasses.fields(BenchConfig):
        value = b[field.name]
        if isinstance(value, list):  # after a JSON round trip
            value = tuple(value)
        if value == default[field.name] or field.name == "overrides":
            continue
        if isinstance(value, bool):
            args.append(_flag(field) if value else "--no-" + _flag(field)[2:])
        elif isinstance(value, tuple):
            args.append(f"{_flag(field)} {','.join(map(str, value))}")
        else:
            args.append(f"{_flag(field)} {value}")
    return args + list(b.get("overrides", ()))


def cli(args) -> None:
    """``sspo bench`` (flags: :func:`add_arguments`)."""
    if args.worker:
        worker(args.worker, args.worker_config, args.worker_out)
        return
    result = run_bench(config_from_args(args))
    print(format_table(result))
    if args.out:
        for path in write_results(result, args.out):
            print(path)
