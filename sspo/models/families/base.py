"""A model family: everything the trainer does that depends on which diffusion model it trains.

The trainer, the pairs, the reference model, the checkpoint pool and the latent cache talk to
"the denoiser" through a :class:`ModelFamily` bound to the loaded pipeline, and never name its
architecture: how training timesteps are drawn and noise is added, what the denoiser is trained
to predict, how it is called with its text condition, how prompts are encoded, how negatives are
sampled, which modules LoRA wraps and which train, and how LoRA and full weights are saved in the
format the family's diffusers pipeline loads. A family is one subclass, registered with
:func:`register` and chosen by ``model.family`` (``auto``: the one :meth:`ModelFamily.detects`
the pipeline).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from sspo.errors import ModelError
from sspo.logs import muted
from sspo.models.condition import TextCondition
from sspo.models.lora_targets import check_lora_targets

LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights looks for
ADAPTER_CONFIG = "adapter_config.json"  # peft's name for a LoraConfig saved beside adapter weights (a LoRA run's pool/)

# model.train_modules: "unet" is every layer of the denoiser, "motion" a video denoiser's motion
# modules only, "auto" what the family trains by default.
TRAIN_MODULES = ("auto", "unet", "motion")
EVERY_LAYER, MOTION = "unet", "motion"


def resolve_train_modules(train_modules: str, video: bool) -> str:
    """``model.train_modules`` for a video or an image model: "auto" is "motion" for video, else "unet"."""
    return (MOTION if video else EVERY_LAYER) if train_modules == "auto" else train_modules


# The multistep solvers as few-step sampling wants them, pinned rather than left to diffusers' defaults:
# second order, dropping to first order over the last steps (diffusers does below 15 steps), where a
# second-order step on the coarse final interval is unstable.
MULTISTEP_SOLVERS = {
    "dpm++": {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True},  # DPM-Solver++(2M)
    "unipc": {"solver_order": 2, "lower_order_final": True},  # UniPC-2M, its bh2 predictor-corrector
}


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How negatives are sampled: the inference scheduler and what its pipeline call needs besides."""

    scheduler: Any
    call_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. DDIM's eta


# The components diffusers' save_lora_weights names the tensors of a LoRA file by.
DIFFUSERS_LORA_PREFIXES = {"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}


class ModelFamily:
    """The SD-1.5 way of doing each step; a family that differs overrides only where it does.

    Bound to ``pipe``, a diffusers pipeline of the family, or the components (a dict) of one being
    built, which is all that :meth:`draw_timesteps` and :meth:`denoising_errors` need.
    """

    name: ClassVar[str]
    title: ClassVar[str | None] = None  # what users call its models, e.g. "SD-1.5" (None: its name)
    denoiser_component: ClassVar[str] = "unet"  # the pipeline component that is trained
    denoiser_label: ClassVar[str] = "UNet"  # what messages call it
    frozen_components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")  # encoders, frozen in training
    video: ClassVar[bool] = False  # latents (B, C, F, H, W), sampled clips
    default_guidance_scale: ClassVar[float] = 7.5  # the classifier-free guidance its models are usually sampled with
    # beta's default: Diffusion-DPO's 5000 for SD-1.5's noise-prediction errors (flow families: docs/method.md, "What beta folds")
    default_beta: ClassVar[float] = 5000.0
    default_sampler: ClassVar[str] = "ddim"  # negatives.scheduler's default
    samples_with_negative_prompt: ClassVar[bool] = True  # sampling passes the empty prompt to the pipeline as its negative
    # The shipped config (sspo/configs/) whose LoRA targets and sampling `sspo bench` trains a pipeline
    # folder of this family with; None: the demo config's (UNet layers).
    bench_config: ClassVar[str | None] = None

    def __init__(self, pipe, flow=None):
        """``flow``: a flow-matching family's training options (:class:`~sspo.models.families.flow.FlowConfig`); the others have none."""
        self.pipe = pipe

    @classmethod
    def detects(cls, components: Mapping[str, Any]) -> bool:
        """Whether a pipeline with ``components`` is of this family (``model.family: auto``)."""
        return False

    @classmethod
    def takes_guidance_embedding(cls, denoiser_config: Mapping[str, Any]) -> bool:
        """Whether the denoiser has a guidance embedding, whose input ``flow.guidance_scale`` is in training
        (FLUX.1-dev's); a model without one ignores that setting."""
        return False

    @classmethod
    def image_sides(cls, denoiser_config: Mapping[str, Any], vae_scale: int) -> tuple[int, int | None]:
        """(the multiple every image side must be, the largest side or None) in pixels, from the
        denoiser's config and the VAE's scale factor: a UNet pipeline takes multiples of 8 (diffusers'
        SD pipelines ask for them) that are multiples of the VAE's factor too."""
        return max(vae_scale, 8), None

    def check_image_sizes(self, denoiser_config: Mapping[str, Any], vae_scale: int, sizes: Sequence[tuple[int, int]], key: str) -> None:
        """Refuse (width, height) ``sizes`` the denoiser cannot take: a ModelError naming ``key``."""
        multiple, largest = self.image_sides(denoiser_config, vae_scale)
        for width, height in sizes:
            if width % multiple or height % multiple:
                raise ModelError(f"{key}: {self.name} takes image sides that are multiples of {multiple} px (its latents' patches), "
                                 f"not {width}x{height}; set {key} to a multiple of {multiple}")
            if largest is not None and max(width, height) > largest:
                raise ModelError(f"{key}: {self.name}'s position embedding covers image sides up to {largest} px, not {width}x{height}; "
                                 f"set {key} so that no side is above {largest}")

    def component(self, name: str):
        return self.pipe[name] if isinstance(self.pipe, Mapping) else getattr(self.pipe, name)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's own denoiser (the trainer wraps and trains this module)."""
        return self.component(self.denoiser_component)

    @property
    def vae(self) -> torch.nn.Module:
        return self.component("vae")

    @property
    def longest_clip(self) -> int | None:
        """The most frames a clip of this model may have (None: no limit, or images)."""
        return None

    # ----------------------------------------------------------------------------------------------
    # The training objective

    @functools.cached_property
    def noise_schedule(self):
        """The noise schedule training draws from: DDPM's, with the pipeline scheduler's betas and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.component("scheduler").config)

    def draw_timesteps(self, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Training timesteps of shape ``size``: integers uniform over the schedule. The draws of a
        micro-batch come from one generator in a fixed order, so this is one draw from it."""
        return torch.randint(0, self.noise_schedule.config.num_train_timesteps, tuple(size), generator=generator)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_schedule.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
        kind = self.noise_schedule.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_schedule.get_velocity(latents, noise, timesteps)
        raise ModelError(f"prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")

    def condition_kwargs(self, cond: TextCondition) -> dict:
        """The denoiser's keyword arguments for text condition ``cond``."""
        return {"encoder_hidden_states": cond.embeds}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return denoiser(noisy, timesteps, **self.condition_kwargs(cond)).sample

    def denoising_errors(self, denoiser, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Per-sample denoising error ``L_m(x0)``: mean over all non-batch dims of (m(x_t,t,c) - target)^2.

        ``cond`` holds one text condition per sample. Inputs stay in the latents' dtype: under
        mixed precision, autocast picks the compute dtype.
        """
        noisy = self.add_noise(latents, noise, timesteps)
        pred = self.predict(denoiser, noisy, timesteps, cond.to(latents.device))
        target = self.target(latents, noise, timesteps)
        if pred.shape != target.shape:  # a broadcast would train on a wrong error without a word
            raise ModelError(f"{type(self).__name__}.predict gave {tuple(pred.shape)} for a target of {tuple(target.shape)}; a denoiser that "
                             "also predicts variance (learned sigma) has its extra channels split off in predict")
        return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))

    # ----------------------------------------------------------------------------------------------
    # Prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, size: int | None = None,
                       sizes_and_crops: Sequence[Sequence[int]] | None = None) -> TextCondition:
        """Encode prompts with the pipeline's own text encoder, as the pipeline itself would
        (``size``: the pixel size they condition, where the family conditions on one;
        ``sizes_and_crops``: per prompt, its training image's original height and width, crop top and
        left, and target height and width, where the family conditions on them)."""
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return TextCondition(embeds)

    @torch.no_grad()
    def encode_unconditional(self, device, size: int | None = None) -> TextCondition:
        """The empty prompt as the pipeline's classifier-free guidance uses it."""
        return self.encode_prompts([""], device, size)

    # ----------------------------------------------------------------------------------------------
    # Sampling negatives

    def check_sampler(self, kind: str) -> None:
        """Refuse a ``negatives.scheduler`` this family cannot sample with (a ModelError); from its config alone."""

    def sampler(self, kind: str, eta: float) -> Sampler:
        """The inference scheduler ``kind`` (``negatives.scheduler``) on the pipeline's noise schedule."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

        config = self.component("scheduler").config
        if kind == "pipeline":
            return Sampler(self.component("scheduler").__class__.from_config(config))
        kinds = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "unipc": UniPCMultistepScheduler}
        return Sampler(kinds[kind].from_config(config, **MULTISTEP_SOLVERS.get(kind, {})), {"eta": eta} if kind == "ddim" else {})

    @torch.no_grad()
    def sample(self, denoiser, sampler: Sampler, cond: TextCondition, uncond: TextCondition, seeds: Sequence[int], *, steps: int,
               guidance_scale: float, latent_size: Sequence[int], device) -> torch.Tensor:
        """Latents of ``latent_size`` (``(H, W)``, or ``(F, H, W)`` for clips) that ``denoiser`` generates for ``cond``.

        Latents are returned directly (``output_type="latent"``): decoding to pixels and re-encoding
        would only add the VAE's round-trip error to the negatives. They are sampled at the size
        asked, which need not be the model's native resolution.
        """
        pipe = self.pipe
        pipeline = pipe.__class__(**{**pipe.components, self.denoiser_component: denoiser, "scheduler": sampler.scheduler})
        pipeline.set_progress_bar_config(disable=True)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        cond = cond.to(device)
        out = pipeline(
            **cond.pipeline_kwargs(uncond.repeat(len(cond)).to(device) if self.samples_with_negative_prompt else None),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=latent_size[-2] * pipe.vae_scale_factor,
            width=latent_size[-1] * pipe.vae_scale_factor,
            output_type="latent",
            **sampler.call_kwargs,
            **self._sample_kwargs(latent_size),
        )
        return self._sampled_latents(out, latent_size).float().cpu()

    def _sample_kwargs(self, latent_size: Sequence[int]) -> dict:
        return {}

    @classmethod
    def pipeline_call_kwargs(cls) -> dict:
        """What a call of the pipeline with prompts (``sspo sample``, ``sspo eval``, validation, a model
        card's code) needs besides them."""
        return {}

    def _sampled_latents(self, out, latent_size: Sequence[int]) -> torch.Tensor:
        """The latents of ``latent_size`` in the pipeline's output."""
        return out.images

    # ----------------------------------------------------------------------------------------------
    # What trains

    def trained_modules(self, train_modules: str) -> str:
        """``model.train_modules`` resolved for this family: "motion" or "unet" (every layer)."""
        if train_modules == MOTION and not self.video:
            raise ModelError(f"model.train_modules: motion trains a video model's motion modules, but {self.name} ({_pipeline_name(self.pipe)}) has none; use unet or auto")
        return resolve_train_modules(train_modules, self.video)

    def lora_targets(self, denoiser, targets: Sequence[str], trained: str) -> list[str] | str:
        """peft's ``target_modules`` for the layer names ``targets`` in the ``trained`` modules
        (:meth:`trained_modules`), refused where they name no layer there."""
        check_lora_targets(denoiser, targets, motion_only=False, label=self.denoiser_label)
        return list(targets)

    def freeze_untrained(self, denoiser, trained: str) -> None:
        """Full fine-tuning: freeze the layers outside the ``trained`` modules (:meth:`trained_modules`)."""

    # ----------------------------------------------------------------------------------------------
    # Saving and loading

    def save_lora(self, denoiser, adapter_name: str, folder: Path) -> None:
        """Save ``denoiser``'s peft adapter ``adapter_name`` as the pipeline's ``load_lora_weights`` reads it."""
        from peft import get_peft_model_state_dict

        write_lora(self.lora_writer(type(self.pipe)), self.denoiser_component, get_peft_model_state_dict(denoiser, adapter_name=adapter_name),
                   adapter_config(denoiser, adapter_name), folder)

    @classmethod
    def lora_writer(cls, pipeline_class: type) -> type:
        """What writes this family's LoRA file (its ``save_lora_weights``): the pipeline class's LoRA loader."""
        return pipeline_class

    @classmethod
    def lora_loading_code(cls, folder: str) -> list[str]:
        """Lines of Python that load the LoRA saved in ``folder`` into ``pipe``, as a model card shows them."""
        return [f"pipe.load_lora_weights({json.dumps(folder, ensure_ascii=False)})"]

    def full_components(self, denoiser) -> dict:
        """The pipeline's components with ``denoiser`` as trained."""
        return {**self.pipe.components, self.denoiser_component: denoiser}

    def save_full(self, denoiser, folder: Path) -> None:
        """Save the whole pipeline with ``denoiser`` as trained: a folder ``from_pretrained`` loads."""
        self.pipe.__class__(**self.full_components(denoiser)).save_pretrained(str(folder), safe_serialization=True)

    def load_lora(self, lora: Path, model: str | Path) -> None:
        """Load LoRA ``lora`` into the pipeline, refusing one that does not fit base ``model``."""
        try:
            with muted("diffusers"):  # it logs a failed load in full (every mismatched tensor) and raises it
                self.pipe.load_lora_weights(str(lora))
        except OSError as exc:
            raise ModelError(f"cannot read LoRA {lora}: {str(exc).splitlines()[0].strip()}; pass a LoRA folder ({LORA_FILE}) or weights file") from None
        except (RuntimeError, ValueError, KeyError) as exc:  # e.g. torch's size mismatch, many lines long
            raise ModelError(f"LoRA {lora} does not fit model {model}: {str(exc).splitlines()[-1].strip().rstrip('.')}; pass the base model the LoRA was trained on") from None
        self._check_lora_loaded(lora, model)

    def _check_lora_loaded(self, lora: Path, model: str | Path) -> None:
        """A LoRA of another base loads without an error (diffusers only logs the keys it dropped):
        every denoiser tensor of a diffusers-format LoRA file (keys named by pipeline component) must be
        in the denoiser's adapter now, as saved; files of other layouts have diffusers' checks alone."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        file = lora / LORA_FILE if lora.is_dir() else lora
        if not file.is_file() or file.suffix != ".safetensors":
            return  # another layout: diffusers' own checks are all there is
        prefix = f"{self.denoiser_component}."
        tensors = load_file(str(file))
        if not {key.split(".")[0] for key in tensors} <= DIFFUSERS_LORA_PREFIXES:  # kohya's layout (lora_unet_...) and others
            return
        saved = convert_unet_state_dict_to_peft({key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)})
        adapters = self.pipe.get_list_adapters().get(self.denoiser_component)
        others = sorted({key.split(".")[0] for key in tensors} - {self.denoiser_component})
        if not saved and others:
            raise ModelError(f"LoRA {lora} holds {', '.join(others)} weights, but the denoiser of model {model} is its {self.denoiser_component}; "
                             "pass the base model the LoRA was trained on")
        if not adapters:
            raise ModelError(f"LoRA {lora} holds no {self.denoiser_label} LoRA weights that diffusers recognizes; pass a LoRA saved with save_lora_weights (a run's final/)")
        loaded = get_peft_model_state_dict(self.denoiser, adapter_name=adapters[-1])
        # Compared in the pipeline's dtype: a LoRA saved in fp32 is loaded rounded into an fp16 pipeline.
        misfits = [key for key, value in saved.items() if key not in loaded or not torch.equal(loaded[key].cpu(), value.to(loaded[key].dtype))]
        if misfits:
            raise ModelError(
                f"LoRA {lora} does not fit model {model}: {len(misfits)} of its {len(saved)} {self.denoiser_label} tensors "
                f"(e.g. {misfits[0]}) have no place in its {self.denoiser_label}; pass the base model the LoRA was trained on"
            )


def adapter_config(denoiser, adapter_name: str) -> dict:
    """The peft ``LoraConfig`` of ``denoiser``'s adapter ``adapter_name`` as JSON values, the same in every process."""
    config = denoiser.peft_config[adapter_name].to_dict()
    # A set lists in another order in another process (string hashing): sorted, the file is the same.
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def write_lora(loader, component: str, layers: dict[str, torch.Tensor], config: dict, folder: Path) -> None:
    """Write the peft state dict ``layers`` of the pipeline's ``component`` to ``folder``/LORA_FILE as
    ``load_lora_weights`` reads it, by ``loader`` (a pipeline class, or its LoRA loader mixin)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from sspo.io import sort_safetensors_metadata

    # A UNet's loader reads diffusers' layout; a transformer's (SD3, FLUX) reads peft's keys, and
    # given diffusers' renaming of the attention projections alone, mixed with peft's keys of every
    # other layer, it drops those projections.
    if component == "unet":
        layers = convert_state_dict_to_diffusers(layers)
    # The adapter's config travels with the weights: without it load_lora_weights assumes
    # lora_alpha = rank, and a LoRA trained with alpha != rank reloads at the wrong scale.
    loader.save_lora_weights(
        save_directory=str(folder), safe_serialization=True,
        **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": config},
    )
    # Its two metadata keys come out in a per-process order: sorted, a resumed run's file is the same bytes.
    sort_safetensors_metadata(folder / LORA_FILE)


FAMILIES: dict[str, type[ModelFamily]] = {}


def usual_by_family(attribute: str) -> str:
    """Each registered family's ``attribute`` (a number) as help text gives it: "SD-1.5 7.5, SDXL 5, ..."."""
    return ", ".join(f"{family.title or family.name} {getattr(family, attribute):g}" for family in FAMILIES.values())


def register(family: type[ModelFamily]) -> type[ModelFamily]:
    """Make ``family`` a choice of ``model.family`` (and, if it :meth:`~ModelFamily.detects` pipelines, of ``auto``)."""
    FAMILIES[family.name] = family
    return family


def family_of(pipe, name: str = "auto", flow=None) -> ModelFamily:
    """The family ``name`` bound to ``pipe``; ``auto``: the registered family that detects it.
    ``flow``: the training options of a flow-matching family (``TrainConfig.flow``)."""
    components = pipe if isinstance(pipe, Mapping) else pipe.components
    if name != "auto":
        if name not in FAMILIES:
            raise ModelError(f"model family {name!r} is not registered; use one of auto, {', '.join(FAMILIES)}")
        family = FAMILIES[name]
        missing = [c for c in (family.denoiser_component, *family.frozen_components) if c not in components]
        if missing:
            kind = _pipeline_name(pipe)
            raise ModelError(f"model.family {name!r} does not fit this {kind}: it has no {', '.join(missing)}; set model.family to auto")
        # Naming a family is for a pipeline none detects, or for a specialisation (a subclass) of the one
        # that does; another family's pipeline would run as the wrong model.
        detected = next((other for other in FAMILIES.values() if other.detects(components)), family)
        if not issubclass(family, detected):
            raise ModelError(f"model.family {name!r} does not fit this {_pipeline_name(pipe)}, which is {detected.name}'s; set model.family to auto (or {detected.name})")
        return family(pipe, flow)
    for family in FAMILIES.values():
        if family.detects(components):
            return family(pipe, flow)
    raise ModelError(f"{_pipeline_name(pipe)} is of no known model family; sspo trains {', '.join(FAMILIES)} pipelines (set model.family to name one)")


def component_class(components: Mapping[str, Any], name: str) -> str | None:
    """The class name of the pipeline's component ``name``: a model_index.json entry's [library, class]
    or a loaded component's type; None where it is absent or empty. Families detect by these names,
    so a pipeline of the same layout with other models (Kolors' GLM encoder, HiDream's transformer)
    is no family's rather than a wrong one's."""
    entry = components.get(name)
    if isinstance(entry, (list, tuple)):
        return entry[1] if len(entry) == 2 and isinstance(entry[1], str) else None
    entry = getattr(entry, "_orig_mod", entry)  # torch.compile's wrapper
    entry = entry.get_base_model() if hasattr(entry, "get_base_model") else entry  # peft's
    return None if entry is None else type(entry).__name__


def _pipeline_name(pipe) -> str:
    """The pipeline's class name, from a loaded pipeline or its model_index.json."""
    return str(pipe.get("_class_name", "pipeline")) if isinstance(pipe, Mapping) else type(pipe).__name__
