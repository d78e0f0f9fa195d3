"""Diffusers pipelines as the trainer sees them: load, encode prompts once, denoising errors, sampling.

One code path serves SD-1.5, SDXL and AnimateDiff (and the tiny shapes-world pipelines, which are
the same classes with small sizes): :class:`TextCondition` carries whatever the UNet needs besides
the noisy latents (SDXL adds pooled embeddings and ``add_time_ids``); video latents are
``(B, C, F, H, W)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sspo.errors import ModelError


@dataclasses.dataclass
class TextCondition:
    """Text conditioning of a batch, computed once and shared by policy, reference and sampler."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL only
    time_ids: torch.Tensor | None = None  # SDXL only

    def _map(self, fn) -> "TextCondition":
        return TextCondition(*(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.time_ids)))

    def to(self, device, dtype=None) -> "TextCondition":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype))

    def __getitem__(self, index) -> "TextCondition":
        return self._map(lambda t: t[index])

    def repeat(self, times: int) -> "TextCondition":
        return self._map(lambda t: torch.cat([t] * times))

    def repeat_each(self, times: int) -> "TextCondition":
        return self._map(lambda t: t.repeat_interleave(times, dim=0))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(conditions: Sequence["TextCondition"]) -> "TextCondition":
        first = conditions[0]
        fields = [f.name for f in dataclasses.fields(first)]
        return TextCondition(
            **{name: None if getattr(first, name) is None else torch.cat([getattr(c, name) for c in conditions]) for name in fields}
        )

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def pipeline_kwargs(self, negative: "TextCondition | None") -> dict:
        """Arguments that make a diffusers pipeline skip its own text encoding."""
        kwargs = {"prompt_embeds": self.embeds}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative.embeds
        if self.pooled is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled
            if negative is not None:
                kwargs["negative_pooled_prompt_embeds"] = negative.pooled
        return kwargs


def is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def is_video(pipe) -> bool:
    """An AnimateDiff-style pipeline: an SD UNet with motion modules (``UNetMotionModel``)."""
    return hasattr(pipe, "motion_adapter")


def trained_modules(pipe, train_modules: str) -> str:
    """``model.train_modules`` resolved for ``pipe``: "motion" or "unet"."""
    from sspo.training.config import resolve_train_modules

    if train_modules == "motion" and not is_video(pipe):
        raise ModelError(f"model.train_modules: motion trains a video UNet's motion modules, but {type(pipe).__name__} has none; use unet or auto")
    return resolve_train_modules(train_modules, is_video(pipe))


def motion_adapter_of(adapter, unet):
    """A ``MotionAdapter`` like ``adapter`` holding ``unet``'s motion modules as they are now (a
    pipeline's ``motion_adapter`` keeps the weights it was loaded with: training changes the UNet's)."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter.from_config(adapter.config)
    state = {key: value for key, value in unet.state_dict().items() if "motion_modules." in key}
    adapter.load_state_dict(state)
    return adapter.to(next(unet.parameters()).dtype)


def _locate(model: str | Path) -> str:
    """A hub id as given, or a local folder that must hold a diffusers pipeline."""
    model = str(model)
    if not (model.startswith((".", "/", "~")) or Path(model).exists()):
        return model
    if not (Path(model).expanduser() / "model_index.json").is_file():
        raise ModelError(
            f"model path {model} is not a diffusers pipeline folder (no model_index.json there); "
            "build the shapes-world base with `sspo base` or pass a hub id / a save_pretrained folder"
        )
    return str(Path(model).expanduser())


def _load_error(model: str | Path, exc: Exception) -> ModelError:
    hint = "" if Path(str(model)).expanduser().exists() else " (a hub id needs the hub or its local cache; offline, download the model and pass its folder)"
    return ModelError(f"cannot load diffusion model {str(model)!r}: {exc}{hint}")


def load_pipeline_config(model: str | Path, revision: str | None = None) -> dict:
    """A pipeline's ``model_index.json`` (class and components), without loading any weights."""
    from diffusers import DiffusionPipeline

    try:
        config = dict(DiffusionPipeline.load_config(_locate(model), revision=revision))
    except (OSError, ValueError) as exc:
        raise _load_error(model, exc) from None
    if "unet" not in config:
        raise ModelError(f"model {model} ({config.get('_class_name')}) has no UNet; sspo trains UNet pipelines such as SD-1.5, SDXL and AnimateDiff")
    if "motion_adapter" not in config and "MotionModel" in str(config["unet"]):
        raise ModelError(f"model {model}: its UNet ({config['unet'][1]}) is a video UNet, but {config.get('_class_name')} is not an AnimateDiff pipeline (no motion_adapter)")
    return config


def load_pipeline(model: str | Path, *, lora: str | Path | None = None, dtype: torch.dtype = torch.float32, revision: str | None = None,
                  variant: str | None = None, motion_adapter: str | Path | None = None):
    """Load an SD-1.5, SDXL or AnimateDiff pipeline from a hub id or a local folder, with an optional
    LoRA; ``motion_adapter`` makes an image pipeline (SD-1.5) an AnimateDiff one."""
    from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter

    config = load_pipeline_config(model, revision)  # a model without a UNet is named here, before any weights load
    extra = {"safety_checker": None} if "safety_checker" in config else {}
    loader = DiffusionPipeline
    if motion_adapter:
        local = Path(str(motion_adapter)).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise ModelError(f"model.motion_adapter {motion_adapter} is not a MotionAdapter folder (no config.json there)")
        try:
            extra = {"motion_adapter": MotionAdapter.from_pretrained(str(local) if local.exists() else str(motion_adapter), torch_dtype=dtype)}
        except (OSError, ValueError) as exc:
            raise _load_error(motion_adapter, exc) from None
        _check_motion_adapter(model, motion_adapter, extra["motion_adapter"].config, revision)
        loader = AnimateDiffPipeline
    try:
        pipe = loader.from_pretrained(_locate(model), torch_dtype=dtype, revision=revision, variant=variant, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error(model, exc) from None
    if lora:
        lora_path = Path(lora).expanduser()
        check_lora_path(lora_path)
        try:
            pipe.load_lora_weights(str(lora_path))
        except OSError as exc:
            raise ModelError(f"cannot read LoRA {lora}: {str(exc).splitlines()[0].strip()}; pass a LoRA folder ({LORA_FILE}) or weights file") from None
        except (RuntimeError, ValueError, KeyError) as exc:  # e.g. torch's size mismatch, many lines long
            raise ModelError(f"LoRA {lora} does not fit model {model}: {str(exc).splitlines()[-1].strip().rstrip('.')}; pass the base model the LoRA was trained on") from None
        _check_lora_loaded(pipe, lora_path, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights looks for


def check_lora_path(lora: Path) -> None:
    """A LoRA path is a LoRA folder or file; sspo's other folders and files are named with what to pass instead."""
    if not lora.exists():
        raise ModelError(f"LoRA path {lora} does not exist")
    folder = lora if lora.is_dir() else lora.parent
    if (folder / "pool.json").is_file():
        raise ModelError(f"LoRA path {lora} is in a training run's checkpoint pool (sspo's own format, not a LoRA diffusers loads); {_final_of(folder.parent)}")
    if (folder / "trainer_state.json").is_file() or folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        run = folder.parent if folder.name == "checkpoints" else folder.parent.parent
        raise ModelError(f"LoRA path {lora} is in a training run's resumable states, not a LoRA; {_final_of(run)}")
    if lora.is_dir():
        if (lora / "model_index.json").is_file():
            raise ModelError(f"LoRA path {lora} is a whole diffusers pipeline, not a LoRA; pass it as the model (--model {lora}) without a LoRA")
        if not (lora / LORA_FILE).is_file() and ((lora / "config.yaml").is_file() or (lora / "final").is_dir()):
            raise ModelError(f"LoRA path {lora} is a training run's folder; {_final_of(lora)}")
        if not any(lora.glob("*.safetensors")) and not any(lora.glob("*.bin")):
            raise ModelError(f"LoRA folder {lora} holds no LoRA weights ({LORA_FILE}); pass the folder save_lora_weights wrote (a run's final/) or the weights file")
    file = lora / LORA_FILE if lora.is_dir() else lora
    if file.suffix == ".safetensors" and file.is_file():
        from sspo.io import open_tensors

        open_tensors(file, what="LoRA weights", fix="pass an intact copy, or train the run again")


def _final_of(run: Path) -> str:
    """What to pass instead of a training run's folder ``run`` or a file in it."""
    final = run / "final"
    if (final / "model_index.json").is_file():
        return f"the run trained the whole model: pass --model {final} without a LoRA"
    if (final / LORA_FILE).is_file():
        return f"pass its final LoRA: {final}"
    return f"pass its final LoRA, {final}, once the run has finished (sspo train CONFIG --resume finishes it)"


def _check_motion_adapter(model, adapter_name, adapter: dict, revision: str | None) -> None:
    """What ``UNetMotionModel.from_unet2d`` does not check: channels (a mismatch fails deep in the
    first forward) and the image UNet's extra conditioning (all but SDXL's is dropped silently)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(_locate(model), subfolder="unet", revision=revision)
    if list(unet["block_out_channels"]) != list(adapter["block_out_channels"]):
        raise ModelError(f"motion adapter {adapter_name} is for UNet channels {list(adapter['block_out_channels'])}, but {model}'s UNet has {list(unet['block_out_channels'])}; pass an adapter made for this base")
    if unet.get("addition_embed_type") not in (None, "text_time"):
        raise ModelError(f"{model}'s UNet has addition_embed_type {unet['addition_embed_type']!r}, which AnimateDiff's UNetMotionModel ignores; use an image model without it (e.g. SD-1.5)")


def _check_lora_loaded(pipe, lora: Path, model: str | Path) -> None:
    """A LoRA of another base loads without an error (diffusers only logs the keys it dropped):
    every UNet tensor of a diffusers-format LoRA file must be in the UNet's adapter now, as saved."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    file = lora / LORA_FILE if lora.is_dir() else lora
    if not file.is_file() or file.suffix != ".safetensors":
        return  # another layout: diffusers' own checks are all there is
    saved = convert_unet_state_dict_to_peft({key.removeprefix("unet."): value for key, value in load_file(str(file)).items() if key.startswith("unet.")})
    adapters = pipe.get_list_adapters().get("unet")
    if not adapters:
        raise ModelError(f"LoRA {lora} holds no UNet LoRA weights that diffusers recognizes; pass a LoRA saved with save_lora_weights (a run's final/)")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapters[-1])
    # Compared in the pipeline's dtype: a LoRA saved in fp32 is loaded rounded into an fp16 pipeline.
    misfits = [key for key, value in saved.items() if key not in loaded or not torch.equal(loaded[key].cpu(), value.to(loaded[key].dtype))]
    if misfits:
        raise ModelError(f"LoRA {lora} does not fit model {model}: {len(misfits)} of its {len(saved)} UNet tensors (e.g. {misfits[0]}) have no place in its UNet; pass the base model the LoRA was trained on")


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device, size: int | None = None) -> TextCondition:
    """Encode prompts with the pipeline's own text encoder(s), as the pipeline itself would.

    SDXL's ``add_time_ids`` say "an uncropped ``size`` x ``size`` image rendered at that size":
    for training, ``size`` is the data resolution (images are resized, then cropped square), as
    the pipeline's own sampling at that resolution says. Default: the model's native resolution.
    """
    prompts = list(prompts)
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        side = (size or pipe.default_sample_size * pipe.vae_scale_factor,) * 2
        projection_dim = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(side, (0, 0), side, dtype=embeds.dtype, text_encoder_projection_dim=projection_dim)
        return TextCondition(embeds, pooled, time_ids.to(device).repeat(len(prompts), 1))
    embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return TextCondition(embeds)


@torch.no_grad()
def encode_unconditional(pipe, device, size: int | None = None) -> TextCondition:
    """The empty prompt as the pipeline's classifier-free guidance uses it (SDXL: zeros by default)."""
    cond = encode_prompts(pipe, [""], device, size)
    if is_sdxl(pipe) and pipe.config.force_zeros_for_empty_prompt:
        return TextCondition(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled), cond.time_ids)
    return cond


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] to scaled latents ``[B, C, h, w]`` (the posterior mean, so
    the same image gives the same x0). Clips ``[B, F, 3, H, W]`` go through the image VAE as B * F
    images and come back as ``[B, C, F, h, w]``, the layout of diffusers' video UNets (AnimateDiff)."""
    if images.ndim == 5:
        latents = encode_images(vae, images.flatten(0, 1))
        return latents.unflatten(0, images.shape[:2]).transpose(1, 2).contiguous()
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled image latents to ``uint8`` RGB arrays ``[B, H, W, 3]``, rounded as diffusers' pipelines
    do; clip latents ``[B, C, F, h, w]`` to clips ``[B, F, H, W, 3]``, frame by frame."""
    if latents.ndim == 5:
        frames = decode_images(vae, latents.transpose(1, 2).flatten(0, 1))
        return frames.reshape(latents.shape[0], latents.shape[2], *frames.shape[1:])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")


def denoising_errors(unet, scheduler, latents, noise, timesteps, cond: TextCondition) -> torch.Tensor:
    """Per-sample denoising error ``L_m(x0)``: mean over all non-batch dims of (m(x_t,t,c) - target)^2.

    Latents of any rank: ``(B, C, H, W)`` images, ``(B, C, F, H, W)`` videos. ``cond`` holds one text
    condition per sample; a video UNet (``UNetMotionModel``) takes one per frame, as
    ``AnimateDiffPipeline`` passes it, so it is repeated here and no caller branches on rank.
    Inputs stay in the latents' dtype: under mixed precision, autocast picks the compute dtype.
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    cond = cond.to(latents.device)
    if latents.ndim == 5:
        cond = cond.repeat_each(latents.shape[2])
    pred = unet(noisy, timesteps, **cond.unet_kwargs()).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
