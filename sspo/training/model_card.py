"""What a run is, in words: the model card (``README.md`` beside the final weights) and the dry run's summary."""

from __future__ import annotations

import json
from pathlib import Path

from sspo.models.families import ModelFamily, resolve_train_modules
from sspo.training.config import TrainConfig
from sspo.worlds import base_world


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


def _loading(cfg: TrainConfig, base: str, folder: str, absent: tuple[str, ...], family: type[ModelFamily]) -> list[str]:
    """Lines of Python that load the trained model into ``pipe``: DiffusionPipeline picks the
    pipeline class from the folder's model_index.json; the ``absent`` components (null there, as the
    tiny flow base's T5) are passed as None, which from_pretrained otherwise refuses; a LoRA is
    loaded as ``family`` loads one."""
    base_options = "".join(f", {key}={_literal(value)}" for key, value in (("revision", cfg.model.revision), ("variant", cfg.model.variant)) if value)
    options = "".join(f", {name}=None" for name in absent) + (base_options if cfg.model.lora else "")
    lines = []
    if world := base_world(cfg.model.pretrained):
        lines.append(f"# {cfg.model.pretrained}: the {world.name} world's base on this machine; elsewhere, the folder "
                     f"`{world.base_command(cfg.model.pretrained)}` prints")
    if cfg.model.lora and cfg.model.motion_adapter:  # an image model joined to motion modules at load
        adapter = Path(cfg.model.motion_adapter).expanduser()
        adapter = str(adapter.resolve()) if adapter.exists() else cfg.model.motion_adapter  # a folder, wherever the code runs from; or a hub id
        lines += [f"adapter = MotionAdapter.from_pretrained({_literal(adapter)}, dtype=dtype)",
                  f"pipe = AnimateDiffPipeline.from_pretrained({_literal(base)}, motion_adapter=adapter{options}, dtype=dtype)"]
    else:
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({_literal(base if cfg.model.lora else folder)}{options}, dtype=dtype)")
    if cfg.model.lora:
        lines += family.lora_loading_code(folder)
    return lines


def _literal(text: str) -> str:
    """``text`` as a Python string literal (a JSON string is one): quotes, backslashes and line breaks escaped."""
    return json.dumps(text, ensure_ascii=False)


def model_card(cfg: TrainConfig, *, base: str, video: bool, folder: str, processes: int, grid: str | None, prompt: str | None = None,
               absent: tuple[str, ...] = (), family: type[ModelFamily] = ModelFamily) -> str:
    """Markdown with a Hugging Face metadata header: what was trained, how, and how to load and
    sample it as the run's validation did (``prompt``: one of the run's own, if it has no validation
    prompt; ``absent``: the pipeline's components the model does not have; ``family``: the model's,
    which says how its LoRA loads)."""
    table = "\n".join(f"| {key} | {value} |" for key, value in run_settings(cfg, processes, video).items())
    prompt = cfg.validation.prompts[0] if cfg.validation.prompts else prompt or "a photo of a cat"
    imports = "AnimateDiffPipeline, MotionAdapter" if cfg.model.lora and cfg.model.motion_adapter else "DiffusionPipeline"
    guidance = "" if cfg.negatives.guidance_scale is None else f", guidance_scale={cfg.negatives.guidance_scale:g}"  # None: not yet resolved from the model
    size = f", height={cfg.data.resolution}, width={cfg.data.resolution}"  # the validation's size (SD3 and FLUX would take their native 1024)
    options = "".join(f", {key}={value!r}" for key, value in family.pipeline_call_kwargs().items())
    sampling = f"{_literal(prompt)}, num_inference_steps={cfg.negatives.steps}{guidance}{size}{options}, generator=torch.manual_seed(0)"
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
        "Model Alignment with Self-Sampling Preference Optimization*. The full training config is `sspo_config.yaml` here; "
        "its `output_dir` is this run's, so train it again into another folder: "
        "`sspo train sspo_config.yaml output_dir=runs/again`.",
        "",
        "| setting | value |",
        "| --- | --- |",
        table,
        "",
        "## Use with diffusers",
        "",
        "With the steps and guidance of the run's samples and the pipeline's own scheduler, as its validation sampled"
        + (f" (its negatives: `negatives.scheduler: {cfg.negatives.scheduler}`)" if cfg.generates_negatives else "") + ", seed 0:",
        "",
        "```python",
        "import torch",
        f"from diffusers import {imports}",
        "",
        'device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)',
        *_loading(cfg, base, folder, absent, family),
        "pipe.to(device)",
        f"frames = pipe({sampling}, num_frames={cfg.data.frames}).frames[0]" if video else f"pipe({sampling}).images[0].save(\"sample.png\")",
        "```",
    ]
    if video and not cfg.model.lora:
        sections += ["", f"The trained motion modules alone: `MotionAdapter.from_pretrained({_literal(str(Path(folder) / 'motion_adapter'))})`."]
    if grid:
        sections += ["", "## Validation", "", f"Fixed prompts and seed {cfg.validation.seed} at the end of training:", "", f"![validation grid]({grid})"]
    return "\n".join(sections) + "\n"
