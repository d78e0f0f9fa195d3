"""Flow matching (rectified flow), the training objective of SD3 / SD3.5 and FLUX.1.

A noisy latent is ``x_t = (1 - sigma) x0 + sigma eps`` and the denoiser predicts the velocity
``eps - x0``; sigma is drawn from a density and each sample's squared error may be weighted, by the
names and formulas of diffusers' SD3 and FLUX training scripts (``diffusers.training_utils``). The
denoiser is told ``t = 1000 sigma``, its scheduler's timesteps. Negatives come from the pipeline's
own flow-matching Euler sampler.

Diffusion-DPO's errors become velocity errors here (Flow-DPO); the losses of
``sspo/training/losses.py`` take them unchanged (docs/method.md, "Flow matching").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from sspo.config import setting, validate
from sspo.errors import ModelError
from sspo.models.condition import TextCondition
from sspo.models.families.base import ModelFamily, Sampler

# diffusers' --weighting_scheme: the density sigma is drawn from (logit_normal, mode; the others
# draw uniformly) and the weight of each sample's error (sigma_sqrt: sigma^-2; cosmap; the others 1)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")


@dataclasses.dataclass
class FlowConfig:
    """How a flow-matching family (SD3, FLUX) draws sigma and weights errors in training; ignored by the others."""

    weighting_scheme: str = setting("logit_normal", choices=WEIGHTING_SCHEMES)  # logit_normal (diffusers' SD3 default) | mode | none (its FLUX default) | sigma_sqrt | cosmap
    # logit_normal: u = sigmoid(N(logit_mean, logit_std^2)) and sigma ~ shift(1 - u), so a positive
    # mean draws less noise (as in diffusers' scripts); past +-10 every sigma is ~0 or ~1.
    logit_mean: float = setting(0.0, at_least=-10, at_most=10)
    logit_std: float = setting(1.0, above=0)  # logit_normal: the spread of sigma's logit
    mode_scale: float = setting(1.29, at_least=0)  # mode: how much mass moves to mid sigmas (0: uniform)
    # FLUX-dev's guidance embedding in training (diffusers' FLUX scripts' --guidance_scale); ignored by a
    # model without one (FLUX-schnell, SD3). Sampling negatives uses negatives.guidance_scale instead.
    guidance_scale: float = setting(3.5, at_least=0)

    def __post_init__(self) -> None:
        validate(self, "flow.")


class FlowMatchingFamily(ModelFamily):
    """The flow-matching objective and sampler; SD3 and FLUX add their denoiser's call and text encoders."""

    denoiser_component = "transformer"
    default_sampler = "pipeline"  # the pipeline's flow-matching Euler sampler; diffusion samplers do not apply
    denoiser_label = "transformer"

    def __init__(self, pipe, flow: FlowConfig | None = None):
        super().__init__(pipe)
        self.flow = flow or FlowConfig()

    @functools.cached_property
    def noise_schedule(self):
        """The training schedule: the pipeline's FlowMatchEulerDiscreteScheduler (its shift included)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.component("scheduler").config)

    def draw_timesteps(self, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Timesteps ``1000 sigma`` of the schedule, at points drawn from ``flow.weighting_scheme``'s density."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        f, schedule = self.flow, self.noise_schedule
        u = compute_density_for_timestep_sampling(f.weighting_scheme, math.prod(size), f.logit_mean, f.logit_std, f.mode_scale, generator=generator)
        indices = (u * schedule.config.num_train_timesteps).long().clamp(max=schedule.config.num_train_timesteps - 1)
        return schedule.timesteps[indices].reshape(tuple(size)).float()

    def sigmas(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        """``sigma = t / 1000`` shaped to broadcast over latents of ``ndim`` dimensions."""
        sigmas = timesteps.float() / self.noise_schedule.config.num_train_timesteps
        return sigmas.reshape(-1, *[1] * (ndim - 1))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(timesteps, latents.ndim).to(latents.device)
        return ((1 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ``eps - x0``."""
        return noise.float() - latents.float()

    def denoising_errors(self, denoiser, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Per-sample velocity error, times ``flow.weighting_scheme``'s weight of its sigma (1 unless sigma_sqrt or cosmap)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        errors = super().denoising_errors(denoiser, latents, noise, timesteps, cond)
        weights = compute_loss_weighting_for_sd3(self.flow.weighting_scheme, self.sigmas(timesteps, 1).to(errors.device))
        return errors * weights.reshape(-1).float()

    def check_sampler(self, kind: str) -> None:
        if kind not in ("pipeline", "euler"):
            raise ModelError(f"negatives.scheduler {kind!r} is a diffusion sampler; {self.name} samples by flow matching: set negatives.scheduler: pipeline")

    def sampler(self, kind: str, eta: float) -> Sampler:
        """The flow-matching Euler sampler the pipeline ships (``negatives.scheduler``: pipeline or euler)."""
        self.check_sampler(kind)
        scheduler = self.component("scheduler")
        return Sampler(scheduler.__class__.from_config(scheduler.config))
