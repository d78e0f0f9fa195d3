"""The benchmark's result as numbers and as a table: medians, all-in cost, ratios to Diffusion-DPO,
FLOP rates and floors, generation's share of training time; the machine it ran on."""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from sspo.benchmark.config import BASELINE
from sspo.benchmark.flops import flop_floor


def machine_info() -> dict:
    """This machine and its libraries; ``device`` is where a run lands by default (a bench overwrites
    it with where its arms ran)."""
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
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


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


def write_results(result: dict, stem: str | Path, command: str) -> tuple[Path, Path]:
    """``<stem>.json`` (everything, with the machine) and ``<stem>.md`` (the table under ``command``, the
    line that reproduces it, and the machine)."""
    from sspo.io import atomic_write_json, atomic_write_text

    json_file, md_file = result_files(stem)
    atomic_write_json(json_file, result)
    info = result["machine"]
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    report = f"# `{command}`\n\n{format_table(result)}\n\n## How to read it\n\n{NOTES}\n## Machine\n\n{machine}\n\n"
    atomic_write_text(md_file, report + f"Benchmark wall time: {result['wall_s']:.0f} s.\n")
    for path in (json_file, md_file):
        path.chmod(0o644)  # meant to be committed; atomic writes create 0600 files
    return json_file, md_file


def result_files(stem: str | Path) -> tuple[Path, Path]:
    """The ``.json`` and ``.md`` files ``--out stem`` names (``stem.json`` or ``stem.md`` name the same two)."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".md") else stem
    return stem.with_suffix(".json"), stem.with_suffix(".md")
