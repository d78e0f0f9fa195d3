"""Pairs for one micro-batch: winners, negatives from a pool checkpoint, noise and reference errors.

Every random choice of micro-batch ``m`` (which checkpoint, the sampler's seeds, ``t`` and
``eps``) comes from a generator seeded by ``(seed, m)``, never from global RNG state. So the same
pairs come out whether they are built one micro-batch at a time just before the step (online) or
for a whole iteration up front, grouped by checkpoint (pregenerated, SPEC.md §3) — and a resumed
run rebuilds exactly the pairs it would have had.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from typing import Callable, Sequence

import torch

from .models.pipeline import TextCondition, denoising_errors
from .pool import CheckpointPool
from .reference import ReferenceModel
from .train_config import SamplerConfig


@dataclasses.dataclass
class PairBatch:
    """Everything the policy step of one micro-batch needs; tensors live on the CPU until used."""

    index: int  # global micro-batch number
    prompts: list[str]
    cond: TextCondition
    winners: torch.Tensor  # x_w latents
    noise: torch.Tensor  # eps, shared by x_w and x_l (as in Diffusion-DPO)
    timesteps: torch.Tensor  # t, shared by x_w and x_l
    losers: torch.Tensor | None = None  # x_l latents (dataset loser or generated)
    checkpoints: list[int] = dataclasses.field(default_factory=list)  # reference per sample
    sample_seeds: list[int] = dataclasses.field(default_factory=list)  # the sampler's noise
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None
    # ssr_draws > 1: extra (t, eps) per winner ([B, d], [B, d, ...]) for a less noisy SSR switch.
    switch_timesteps: torch.Tensor | None = None
    switch_noise: torch.Tensor | None = None
    ref_switch: torch.Tensor | None = None  # reference error on x_w, mean over all ssr_draws draws

    def __len__(self) -> int:
        return len(self.prompts)


def batch_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def draw_randomness(batch: PairBatch, generator: torch.Generator, pool: CheckpointPool | None, erd: str, erd_per: str, num_train_timesteps: int, ssr_draws: int = 1) -> None:
    """Draw ``t``, ``eps``, the reference checkpoint(s), the sampler seeds and the switch's extra draws."""
    n = len(batch)
    batch.timesteps = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    batch.noise = torch.randn(batch.winners.shape, generator=generator)
    if pool is not None:
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        if erd_per == "batch":
            batch.checkpoints = [pool.draw(erd, rng)] * n
        else:
            batch.checkpoints = [pool.draw(erd, rng) for _ in range(n)]
        batch.sample_seeds = torch.randint(2**62, (n,), generator=generator).tolist()
    if ssr_draws > 1:  # drawn last, so ssr_draws = 1 leaves every other draw as it was
        batch.switch_timesteps = torch.randint(0, num_train_timesteps, (n, ssr_draws - 1), generator=generator)
        batch.switch_noise = torch.randn((n, ssr_draws - 1, *batch.winners.shape[1:]), generator=generator)


@torch.no_grad()
def extra_draw_errors(unet, scheduler, winners, noise, timesteps, cond: TextCondition, device) -> torch.Tensor:
    """Sum over the extra draws of each winner's denoising error: ``[B]`` from ``noise`` ``[B, d, ...]``."""
    draws = noise.shape[1]
    latents = winners.repeat_interleave(draws, dim=0).to(device)
    errors = denoising_errors(unet, scheduler, latents, noise.flatten(0, 1).to(device), timesteps.flatten().to(device), cond.repeat_each(draws))
    return errors.view(-1, draws).sum(dim=1).cpu()


def _by_checkpoint(batches: Sequence[PairBatch]) -> dict[int, list[tuple[PairBatch, int]]]:
    groups: dict[int, list[tuple[PairBatch, int]]] = defaultdict(list)
    for batch in batches:
        for i, checkpoint in enumerate(batch.checkpoints):
            groups[checkpoint].append((batch, i))
    return dict(sorted(groups.items()))


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_sampler_scheduler(pipe, cfg: SamplerConfig):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kinds = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if cfg.scheduler == "pipeline":
        return pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    return kinds[cfg.scheduler].from_config(pipe.scheduler.config)


@torch.no_grad()
def sample_reference(pipe, unet, scheduler, cond: TextCondition, uncond: TextCondition, seeds: Sequence[int], cfg: SamplerConfig, device, latent_size: Sequence[int]) -> torch.Tensor:
    """Latents ``x_l`` of ``latent_size`` that ``unet`` (a pool checkpoint) generates for ``cond``.

    Latents are returned directly (``output_type="latent"``): decoding to pixels and re-encoding
    would only add the VAE's round-trip error to the negatives. They are sampled at the winners'
    size, which need not be the model's native resolution.
    """
    sampler = pipe.__class__(**{**pipe.components, "unet": unet, "scheduler": scheduler})
    sampler.set_progress_bar_config(disable=True)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    cond = cond.to(device)
    extra = {"eta": cfg.eta} if cfg.scheduler == "ddim" else {}
    out = sampler(
        **cond.pipeline_kwargs(uncond.repeat(len(cond)).to(device)),
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        generator=generators,
        height=latent_size[0] * pipe.vae_scale_factor,
        width=latent_size[1] * pipe.vae_scale_factor,
        output_type="latent",
        **extra,
    )
    return out.images.float().cpu()


class PairBuilder:
    """Fills :class:`PairBatch` es with negatives and reference errors, grouped by checkpoint."""

    def __init__(self, pipe, reference: ReferenceModel | None, train_scheduler, sampler_cfg: SamplerConfig, device, autocast: Callable):
        self.pipe, self.reference, self.train_scheduler = pipe, reference, train_scheduler
        self.sampler_cfg, self.device, self.autocast = sampler_cfg, device, autocast
        self.sampler_scheduler = make_sampler_scheduler(pipe, sampler_cfg)

    def generate_negatives(self, batches: Sequence[PairBatch], uncond: TextCondition) -> None:
        for batch in batches:
            batch.losers = torch.empty_like(batch.winners)
        for checkpoint, members in _by_checkpoint(batches).items():
            with self.reference.activate(checkpoint) as unet, self.autocast():
                for chunk in _chunks(members, self.sampler_cfg.batch_size):
                    cond = TextCondition.cat([b.cond[i : i + 1] for b, i in chunk])
                    seeds = [b.sample_seeds[i] for b, i in chunk]
                    latents = sample_reference(self.pipe, unet, self.sampler_scheduler, cond, uncond, seeds, self.sampler_cfg, self.device, chunk[0][0].winners.shape[-2:])
                    for (batch, i), latent in zip(chunk, latents):
                        batch.losers[i] = latent

    @torch.no_grad()
    def reference_errors(self, batches: Sequence[PairBatch], chunk_size: int) -> None:
        for batch in batches:
            batch.ref_w, batch.ref_l = torch.empty(len(batch)), torch.empty(len(batch))
            batch.ref_switch = None if batch.switch_noise is None else torch.empty(len(batch))
        for checkpoint, members in _by_checkpoint(batches).items():
            with self.reference.activate(checkpoint) as unet, self.autocast():
                for chunk in _chunks(members, chunk_size):
                    # Winner and loser of every pair in one forward.
                    latents = torch.cat([torch.stack([b.winners[i] for b, i in chunk]), torch.stack([b.losers[i] for b, i in chunk])])
                    noise = torch.stack([b.noise[i] for b, i in chunk]).repeat(2, *[1] * (latents.ndim - 1))
                    t = torch.stack([b.timesteps[i] for b, i in chunk]).repeat(2)
                    cond = TextCondition.cat([b.cond[i : i + 1] for b, i in chunk]).repeat(2)
                    errors = denoising_errors(unet, self.train_scheduler, latents.to(self.device), noise.to(self.device), t.to(self.device), cond).cpu()
                    for k, (batch, i) in enumerate(chunk):
                        batch.ref_w[i], batch.ref_l[i] = errors[k], errors[len(chunk) + k]
                    if chunk[0][0].switch_noise is not None:
                        extra = extra_draw_errors(
                            unet, self.train_scheduler, latents[: len(chunk)], torch.stack([b.switch_noise[i] for b, i in chunk]),
                            torch.stack([b.switch_timesteps[i] for b, i in chunk]), cond[: len(chunk)], self.device,
                        )
                        for k, (batch, i) in enumerate(chunk):
                            batch.ref_switch[i] = (errors[k] + extra[k]) / (1 + batch.switch_noise.shape[1])
