"""What a run is, in words: the model card (``README.md`` beside the final weights) and the dry run's summary."""

from __future__ import annotations

from pathlib import Path

from sspo.models.families import resolve_train_modules
from sspo.training.config import TrainConfig


def _fine_tuning(cfg: TrainConfig, video: bool) -> str:
    motion = resolve_train_modules(cfg.model.train_modules, video) == "motion"
    if cfg.model.lora:
        return f"LoRA rank {cfg.model.lora_rank} (alpha {cfg.model.lora_alpha}) on {', '.join(cfg.model.lora_targets)}" + (" of the motion modules" if motion else "")
    return "full motion modules" if motion else "full denoiser (every layer)"


def run_settings(cfg: TrainConfig, processes: int, video: bool = False) -> dict[str, str]:
    """The settings that define a run, one line each (model card and ``sspo train --dry-run``)."""
    o = cfg.optim
    rows = {
        "method": f"{cfg.method}: {cfg.spec.description}",
        "fine-tuning": _fine_tuning(cfg, video),
        "data": f"{cfg.data.source} {cfg.data.path or f'(the {cfg.data.source} world)'}, {cfg.data.resolution} px"
        + (f", clips of {cfg.data.frames} frames every {cfg.data.frame_stride}" if cfg.data.frames else "") + f", mode {cfg.data.mode}",
        "steps": f"{cfg.iterations} iteration{'s' if cfg.iterations > 1 else ''} x {cfg.steps_per_iteration} = {cfg.iterations * cfg.steps_per_iteration} "
                 f"optimizer step{'s' if cfg.iterations * cfg.steps_per_iteration > 1 else ''}",
        "batch": f"{o.batch_size} per process x {o.gradient_accumulation_steps} accumulation x {processes} process{'es' if processes > 1 else ''} "
        f"= {effective_batch(cfg, processes)} effective",
        "optimizer": f"AdamW, learning rate {o.learning_rate:g} ({o.lr_scheduler}, {o.lr_warmup_steps} warm-up steps), weight decay {o.weight_decay:g}, "
                     f"{cfg.mixed_precision} mixed precision, seed {cfg.seed}",
    }
    if o.ema:
        rows["weights"] = (f"the exponential moving average of the trained weights (diffusers' EMAModel, decay {o.ema_decay:g}), "
                           "as are the validation samples; the pool's checkpoints are the raw policy")
    if cfg.generates_negatives:
        rows["reference"] = (
            f"pool checkpoint drawn '{cfg.effective_erd}' per {cfg.erd_per}, one added every {cfg.steps_per_iteration} steps; "
            f"ssr {cfg.effective_ssr}; negatives: {cfg.negatives.scheduler}, {cfg.negatives.steps} steps, guidance {cfg.negatives.guidance_scale:g}"
        )
    elif cfg.uses_reference:
        rows["reference"] = "the frozen initial model"
    if cfg.uses_reference:
        rows["beta"] = f"{cfg.beta:g}"
    return rows


def effective_batch(cfg: TrainConfig, processes: int) -> int:
    return cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps * processes


def model_card(cfg: TrainConfig, *, base: str, pipeline_class: str, video: bool, folder: str, processes: int, grid: str | None) -> str:
    """Markdown with a Hugging Face metadata header: what was trained, how, and how to load it."""
    table = "\n".join(f"| {key} | {value} |" for key, value in run_settings(cfg, processes, video).items())
    if cfg.model.lora:
        load = f'pipe = {pipeline_class}.from_pretrained("{base}", torch_dtype=torch.bfloat16)\npipe.load_lora_weights("{folder}")'
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{folder}", torch_dtype=torch.bfloat16)'
    prompt = cfg.validation.prompts[0] if cfg.validation.prompts else "a photo of a cat"
    tags = dict.fromkeys(["diffusers", "text-to-video" if video else "text-to-image", "sspo", cfg.method] + (["lora"] if cfg.model.lora else []))
    sections = [
        "---",
        "library_name: diffusers",
        *([] if Path(base).expanduser().exists() else [f"base_model: {base}"]),  # the hub's field names a hub model, never a local folder
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
        f"# {cfg.method.upper()} fine-tune of {cfg.model.pretrained}",
        "",
        f"Fine-tuned by {cfg.spec.description} with sspo, an implementation of *Bridging SFT and DPO for Diffusion "
        "Model Alignment with Self-Sampling Preference Optimization*. The full training config is `sspo_config.yaml` here.",
        "",
        "| setting | value |",
        "| --- | --- |",
        table,
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline_class}",
        "",
        load,
        'pipe.to("cuda")',
        f'frames = pipe("{prompt}", num_frames={cfg.data.frames}).frames[0]' if video else f'image = pipe("{prompt}").images[0]',
        "```",
    ]
    if video and not cfg.model.lora:
        sections += ["", f"The trained motion modules alone: `MotionAdapter.from_pretrained(\"{folder}/motion_adapter\")`."]
    if grid:
        sections += ["", "## Validation", "", f"Fixed prompts and seed {cfg.validation.seed} at the end of training:", "", f"![validation grid]({grid})"]
    return "\n".join(sections) + "\n"
