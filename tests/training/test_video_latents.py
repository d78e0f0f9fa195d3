"""Latents of any rank: (B, C, H, W) images and (B, C, F, H, W) videos go through the same pair code."""

import contextlib
import types

import pytest
import torch
from diffusers import DDPMScheduler

from sspo.models.condition import TextCondition
from sspo.models.families.animatediff import AnimateDiff
from sspo.models.families.sd import StableDiffusion
from sspo.training.config import TrainConfig
from sspo.training.pairs import PairBatch, PairBuilder, Rows, draw, mean_over_draws

SHAPES = {"image": (3, 4, 8, 8), "video": (3, 4, 5, 8, 8)}
FAMILIES = {"image": StableDiffusion, "video": AnimateDiff}


def family(kind, scheduler):
    """The family of latents of ``kind``, bound to the only component training needs: the scheduler."""
    return FAMILIES[kind]({"scheduler": scheduler})


class HalfDenoiser(torch.nn.Module):
    """Predicts half its input, whatever its rank; checks that the text condition is one per sample
    (images) or per frame (videos, as AnimateDiff's video denoiser takes it)."""

    def forward(self, noisy, timesteps, encoder_hidden_states):
        frames = noisy.shape[2] if noisy.ndim == 5 else 1
        assert noisy.shape[0] == timesteps.shape[0] and encoder_hidden_states.shape[0] == noisy.shape[0] * frames
        return types.SimpleNamespace(sample=0.5 * noisy)


def expected_errors(scheduler, latents, noise, t):
    noisy = scheduler.add_noise(latents, noise, t)
    return (0.5 * noisy - noise).pow(2).flatten(1).mean(dim=1)  # every non-batch dim


@pytest.mark.parametrize("kind", SHAPES)
def test_denoising_errors_reduce_every_non_batch_dim(kind):
    scheduler = DDPMScheduler()
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(SHAPES[kind], generator=gen), torch.randn(SHAPES[kind], generator=gen)
    t = torch.tensor([10, 500, 990])
    errors = family(kind, scheduler).denoising_errors(HalfDenoiser(), latents, noise, t, TextCondition(torch.zeros(3, 7, 16)))
    assert errors.shape == (3,)
    torch.testing.assert_close(errors, expected_errors(scheduler, latents, noise, t))


class OneCheckpointPool:
    def draw(self, erd, rng):
        return 0


@pytest.mark.parametrize("kind", SHAPES)
def test_pairs_and_reference_errors_take_any_rank(kind):
    shape = SHAPES[kind]
    denoiser, scheduler = HalfDenoiser(), DDPMScheduler()
    pairs_family = family(kind, scheduler)
    draws = draw(torch.Generator().manual_seed(0), shape, OneCheckpointPool(), "uniform", "batch", pairs_family, ssr_draws=3)
    assert draws.noise.shape == shape and draws.switch_noise.shape == (3, 2, *shape[1:])

    reference = types.SimpleNamespace(pool=OneCheckpointPool(), activate=lambda checkpoint: contextlib.nullcontext(denoiser))
    cfg = TrainConfig(ssr_draws=3)
    builder = PairBuilder(cfg, pairs_family, reference, None, read_rows=None, stream=None, device="cpu", autocast=contextlib.nullcontext)  # no sampling here
    cond = TextCondition(torch.zeros(3, 7, 16))
    winners, losers = torch.randn(shape), torch.randn(shape)
    batch = PairBatch(0, Rows(["a", "b", "c"], cond, winners, None), draws, losers)
    [done] = builder.complete([batch])

    torch.testing.assert_close(done.reference.winners, expected_errors(scheduler, winners, draws.noise, draws.timesteps))
    torch.testing.assert_close(done.reference.losers, expected_errors(scheduler, losers, draws.noise, draws.timesteps))
    own = expected_errors(scheduler, winners, draws.noise, draws.timesteps)
    extra = [expected_errors(scheduler, winners, draws.switch_noise[:, d], draws.switch_timesteps[:, d]) for d in range(2)]
    torch.testing.assert_close(done.reference.switch, (own + extra[0] + extra[1]) / 3)
    mean = mean_over_draws(pairs_family, denoiser, own, winners, draws.switch_timesteps, draws.switch_noise, cond, "cpu")
    torch.testing.assert_close(mean, done.reference.switch)
