"""FLOPs of each phase of an arm, their achieved rate against the device's peak, and the FLOP floor.

Per arm, outside the timed region, :func:`arm_flops` counts with torch's ``FlopCounterMode``
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

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch


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
