"""Measuring one arm in this process: build its trainer, time its steps and its pregeneration phase.

Data preparation (VAE-encoding winners and dataset losers, text encoding) is common to every
method and timed separately per step. "All-in" per-step cost = data preparation + step + the
pregeneration phase divided by the optimizer steps of an iteration.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from sspo.benchmark.config import BenchConfig, pregenerated, train_config
from sspo.benchmark.flops import arm_flops
from sspo.benchmark.memory import Meter, malloc_trim


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
        malloc_trim()
        meter = Meter(device)  # RSS baseline: libraries imported, no model loaded yet

        trainer = Trainer(cfg)
        try:
            return _measure(trainer, trainer.cfg, b, arm, meter)  # as the trainer resolved it (the model's usual guidance, say)
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
    flops = arm_flops(trainer, cfg, pregenerated(arm))  # before anything is timed
    clock = meter.process_time if b.clock == "cpu" else time.perf_counter
    phases = _PhaseTimer(trainer.pair_builder, meter, clock)
    builder = trainer.pair_builder
    builder.progress = False  # the bench's output is its table: no bar per timed generation
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
    if pregenerated(arm):
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
