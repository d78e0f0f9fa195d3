"""Flow matching (sspo/models/families/flow.py) on values computed by hand: the noisy latent, the
velocity target, the per-sample error weights of diffusers' weighting schemes, and where sigma is drawn."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sspo.errors import ModelError
from sspo.models.condition import TextCondition
from sspo.models.families import family_of
from sspo.models.families.flow import FlowConfig

SHIFT = 3.0


def sd3(scheme: str = "logit_normal"):
    """The SD3 family bound to the components training needs (no weights: a denoiser is passed in)."""
    components = {"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_3": None, "scheduler": FlowMatchEulerDiscreteScheduler(shift=SHIFT)}
    return family_of(components, flow=FlowConfig(weighting_scheme=scheme))


def predicts_zero(hidden_states, timestep, encoder_hidden_states, pooled_projections):
    return SimpleNamespace(sample=torch.zeros_like(hidden_states))


X0, EPS = 2.0, -1.0  # latents all 2, noise all -1: the velocity is -3 everywhere, its squared error 9


def latents_and_noise(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 4, 2, 2), X0), torch.full((n, 4, 2, 2), EPS)


def test_sd3_is_detected_by_its_transformer():
    assert sd3().name == "sd3" and sd3().denoiser_label == "transformer"


def test_add_noise_interpolates_from_the_latents_to_the_noise_by_sigma():
    latents, noise = latents_and_noise(3)
    noisy = sd3().add_noise(latents, noise, torch.tensor([0.0, 250.0, 1000.0]))  # sigma 0, 1/4, 1
    assert noisy[:, 0, 0, 0].tolist() == [2.0, 0.75 * 2.0 + 0.25 * -1.0, -1.0]


def test_the_target_is_the_velocity_noise_minus_latents():
    latents, noise = latents_and_noise(2)
    assert sd3().target(latents, noise, torch.tensor([100.0, 900.0])).unique().tolist() == [EPS - X0]


# Each scheme's weight at sigma = 1/4 and 1/2, by diffusers' formulas: sigma_sqrt 1/sigma^2;
# cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)); the others 1.
WEIGHTS = {
    "logit_normal": [1.0, 1.0],
    "mode": [1.0, 1.0],
    "none": [1.0, 1.0],
    "sigma_sqrt": [16.0, 4.0],
    "cosmap": [2 / (math.pi * 0.625), 2 / (math.pi * 0.5)],
}


@pytest.mark.parametrize("scheme", list(WEIGHTS))
def test_each_sample_error_is_weighted_by_the_scheme_weight_of_its_sigma(scheme):
    latents, noise = latents_and_noise(2)
    cond = TextCondition(torch.zeros(2, 3, 8), torch.zeros(2, 8))
    errors = sd3(scheme).denoising_errors(predicts_zero, latents, noise, torch.tensor([250.0, 500.0]), cond)
    expected = torch.tensor([9.0 * w for w in WEIGHTS[scheme]])
    torch.testing.assert_close(errors, expected)


def shifted_timestep(u: torch.Tensor) -> torch.Tensor:
    """The schedule's timestep at the point ``u`` in [0, 1): entry ``floor(1000 u)`` of 1000 sigmas
    falling from 1 to 1/1000, shifted as ``shift s / (1 + (shift - 1) s)``, times 1000."""
    s = 1 - torch.floor(1000 * u) / 1000
    return 1000 * SHIFT * s / (1 + (SHIFT - 1) * s)


@pytest.mark.parametrize("scheme,draw", [
    ("none", lambda g: torch.rand(6, generator=g)),
    ("logit_normal", lambda g: torch.sigmoid(torch.normal(0.0, 1.0, (6,), generator=g))),
])
def test_timesteps_are_the_schedule_at_points_of_the_scheme_density(scheme, draw):
    drawn = sd3(scheme).draw_timesteps((2, 3), torch.Generator().manual_seed(7))
    expected = shifted_timestep(draw(torch.Generator().manual_seed(7))).reshape(2, 3)
    torch.testing.assert_close(drawn, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_timesteps_are_deterministic_per_generator_and_within_the_schedule(scheme):
    family = sd3(scheme)
    first = family.draw_timesteps((64,), torch.Generator().manual_seed(0))
    assert torch.equal(first, family.draw_timesteps((64,), torch.Generator().manual_seed(0)))
    assert not torch.equal(first, family.draw_timesteps((64,), torch.Generator().manual_seed(1)))
    assert set(first.tolist()) <= set(family.noise_schedule.timesteps.tolist())
    assert bool((first > 0).all()) and bool((first <= 1000).all())


def test_a_diffusion_sampler_is_refused():
    assert type(sd3().sampler("pipeline", 0.0).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sd3().sampler("euler", 0.0).call_kwargs == {}
    with pytest.raises(ModelError, match="set negatives.scheduler: pipeline"):
        sd3().sampler("ddim", 0.0)
