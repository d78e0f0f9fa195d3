"""Pairs: a micro-batch's winners, its losers, its random draws and its reference errors, built whole.

Every random choice of micro-batch ``m`` (which checkpoint, the sampler's seeds, ``t`` and
``eps``) comes from a generator seeded by the run's seed and ``m``'s stream (``m`` and the process),
never from global RNG state. So the same draws are made whether pairs are built one micro-batch at a
time just before the step (online) or for a whole iteration up front, grouped by checkpoint
(pregenerated, docs/method.md "Pairs"), and a resumed run rebuilds exactly the pairs it would have
had. The two differ only in rounding: a checkpoint sampling several micro-batches in one batch.

Latents may have any rank: ``(B, C, H, W)`` images or ``(B, C, F, H, W)`` videos.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from sspo.models.condition import TextCondition
from sspo.models.families import ModelFamily, Sampler
from sspo.training.config import NegativesConfig, TrainConfig
from sspo.training.faults import fault_point
from sspo.training.reference import ReferenceModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rows:
    """A micro-batch's data, encoded: prompts, text condition, winner latents, dataset losers (or None)."""

    prompts: list[str]
    cond: TextCondition
    winners: torch.Tensor
    losers: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class Draws:
    """Every random choice of one micro-batch (docs/method.md "Pairs")."""

    timesteps: torch.Tensor  # t, shared by x_w and x_l
    noise: torch.Tensor  # eps, shared by x_w and x_l (as in Diffusion-DPO)
    checkpoints: list[int]  # the pool checkpoint of every sample (empty without a reference)
    sample_seeds: list[int]  # the sampler's noise for every negative
    # ssr_draws > 1: more (t, eps) per winner, [B, d] and [B, d, ...], for a less noisy SSR switch.
    switch_timesteps: torch.Tensor | None
    switch_noise: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class ReferenceErrors:
    """The reference's per-sample denoising errors on the pair, with the pair's own (t, eps)."""

    winners: torch.Tensor  # L_ref(x_w)
    losers: torch.Tensor  # L_ref(x_l)
    switch: torch.Tensor | None  # L_ref(x_w) averaged over all ssr_draws draws


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Everything the policy step of one micro-batch needs; tensors live on the CPU until used."""

    index: int  # global micro-batch number
    rows: Rows
    draws: Draws
    losers: torch.Tensor | None  # x_l: the dataset's or generated; None for SFT
    reference: ReferenceErrors | None = None  # None until computed (or for SFT)

    def __len__(self) -> int:
        return len(self.rows.prompts)


def batch_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def draw(generator: torch.Generator, shape: Sequence[int], pool, erd: str, erd_per: str, family: ModelFamily, ssr_draws: int = 1) -> Draws:
    """``t`` (the family's training timesteps), ``eps``, the reference checkpoint(s), the sampler seeds
    and the switch's extra draws, in that order."""
    n = shape[0]
    timesteps = family.draw_timesteps((n,), generator)
    noise = torch.randn(tuple(shape), generator=generator)
    checkpoints, sample_seeds = [], []
    if pool is not None:
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        checkpoints = [pool.draw(erd, rng)] * n if erd_per == "batch" else [pool.draw(erd, rng) for _ in range(n)]
        sample_seeds = torch.randint(2**62, (n,), generator=generator).tolist()
    switch_timesteps = switch_noise = None
    if ssr_draws > 1:  # drawn last, so every other draw is the same whatever ssr_draws is
        switch_timesteps = family.draw_timesteps((n, ssr_draws - 1), generator)
        switch_noise = torch.randn((n, ssr_draws - 1, *shape[1:]), generator=generator)
    return Draws(timesteps, noise, checkpoints, sample_seeds, switch_timesteps, switch_noise)


def pair_errors(family: ModelFamily, denoiser, winners, losers, noise, timesteps, cond: TextCondition, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's winner and loser denoising errors ``[B]``, ``[B]`` at the pair's shared ``t`` and
    ``eps``: both in one forward, as a batch of twice the pairs."""
    latents = torch.cat([winners, losers]).to(device)
    noise = noise.repeat(2, *[1] * (latents.ndim - 1)).to(device)
    return family.denoising_errors(denoiser, latents, noise, timesteps.repeat(2).to(device), cond.repeat(2)).chunk(2)


def mean_over_draws(family: ModelFamily, denoiser, first: torch.Tensor, winners, switch_timesteps, switch_noise, cond: TextCondition, device) -> torch.Tensor:
    """Each winner's denoising error averaged over all ssr_draws draws (docs/method.md "SSR"): ``first``
    is the pair's own draw ``[B]``, the extra ones (``[B, d]``, ``[B, d, ...]``) are computed here."""
    with torch.no_grad():
        extra = switch_noise.shape[1]
        latents = winners.repeat_interleave(extra, dim=0).to(device)
        errors = family.denoising_errors(denoiser, latents, switch_noise.flatten(0, 1).to(device), switch_timesteps.flatten().to(device), cond.repeat_each(extra))
    return (first.detach().to(device) + errors.view(-1, extra).sum(dim=1)) / (1 + extra)


def _by_checkpoint(draws: Sequence[Draws]) -> dict[int, list[tuple[int, int]]]:
    """checkpoint -> (micro-batch number in ``draws``, sample) of every sample that uses it, in order."""
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for b, batch_draws in enumerate(draws):
        for i, checkpoint in enumerate(batch_draws.checkpoints):
            groups[checkpoint].append((b, i))
    return dict(sorted(groups.items()))


def _chunks(items: list[tuple[int, int]], size: int, latents: Sequence[torch.Tensor]):
    """``items`` ((micro-batch, sample) pairs) in order, in chunks of at most ``size`` whose
    ``latents[micro-batch]`` are of one shape (micro-batches of different buckets are batched apart)."""
    by_shape: dict[tuple, list] = defaultdict(list)
    for b, i in items:
        by_shape[tuple(latents[b].shape[1:])].append((b, i))
    for same in by_shape.values():
        for start in range(0, len(same), size):
            yield same[start : start + size]


class PairBuilder:
    """Builds :class:`PairBatch` es: rows, draws, losers (generated grouped by checkpoint), reference errors.

    ``family`` is the model's (sspo/models/families/): it draws ``t``, samples the negatives and
    computes the denoising errors. ``read_rows(m)`` gives micro-batch ``m``'s :class:`Rows` (the trainer's data order);
    ``stream(m)`` the number its random draws are seeded with (``m`` and the process).
    ``around_phase(name)``, a public attribute that may be set after construction, is a context
    manager entered around each costly phase: ``"generate"`` (sampling the negatives) and
    ``"reference"`` (the reference's forwards). It does nothing by default; ``sspo bench`` times
    the phases with it. ``progress``, also public: whether sampling the negatives shows a bar of its
    own (the trainer's, for an iteration's negatives sampled up front).
    """

    progress = False
    compile_backend = "inductor"  # torch.compile's backend for negatives.compile; tests take a faster one

    def __init__(self, cfg: TrainConfig, family: ModelFamily, reference: ReferenceModel | None, uncond: TextCondition,
                 read_rows: Callable[[int], Rows], stream: Callable[[int], int], device, autocast: Callable,
                 around_phase: Callable[[str], contextlib.AbstractContextManager] | None = None):
        self.cfg, self.family, self.reference, self.uncond = cfg, family, reference, uncond
        self.read_rows, self.stream, self.device, self.autocast = read_rows, stream, device, autocast
        self.around_phase = around_phase or (lambda name: contextlib.nullcontext())
        self.negatives = cfg.negatives
        if cfg.generates_negatives:  # a sampler of the wrong kind refused now, before training
            family.check_sampler(cfg.negatives.scheduler)
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> its compiled module (negatives.compile)

    @functools.cached_property
    def sampler(self) -> Sampler:
        """``negatives.scheduler``, made when something is first sampled (a method with dataset losers samples nothing)."""
        return self.family.sampler(self.cfg.negatives.scheduler, self.cfg.negatives.eta)

    @contextlib.contextmanager
    def rows_from(self, rows: Mapping[int, Rows]) -> Iterator[None]:
        """Within it, micro-batch ``m``'s rows are ``rows[m]`` instead of ``read_rows(m)``: rows read
        beforehand, so that building the pairs is timed apart from reading the data (``sspo bench``)."""
        read_rows, self.read_rows = self.read_rows, rows.__getitem__
        try:
            yield
        finally:
            self.read_rows = read_rows

    def build(self, indices: Sequence[int], with_reference: bool = True, sampler_steps: int | None = None) -> list[PairBatch]:
        """The pairs of micro-batches ``indices``; without reference errors, :meth:`complete` adds them later.

        ``sampler_steps`` replaces ``negatives.steps`` for this call (``sspo bench`` measures
        generation at several step counts); the sampler is otherwise the configured one.
        """
        cfg = self.cfg
        rows = [self.read_rows(m) for m in indices]
        # A switch that never fires needs no extra draws (sft, dpo, spin, ssr off).
        ssr_draws = cfg.ssr_draws if cfg.effective_ssr != "off" else 1
        pool = self.reference.pool if self.reference is not None else None
        draws = [
            draw(batch_generator(cfg.seed, self.stream(m)), r.winners.shape, pool, cfg.effective_erd, cfg.erd_per, self.family, ssr_draws)
            for m, r in zip(indices, rows)
        ]
        if cfg.generates_negatives:
            settings = self.negatives if sampler_steps is None else dataclasses.replace(self.negatives, steps=sampler_steps)
            with self.around_phase("generate"):
                losers = self._generate_negatives(rows, draws, settings)
        else:
            losers = [r.losers for r in rows]
        batches = [PairBatch(m, r, d, x_l) for m, r, d, x_l in zip(indices, rows, draws, losers)]
        return self.complete(batches) if with_reference else batches

    def complete(self, batches: list[PairBatch]) -> list[PairBatch]:
        """``batches`` with their reference errors (computed now where missing): what the step consumes."""
        if not self.cfg.uses_reference or all(b.reference is not None for b in batches):
            return batches
        # Chunks of one training batch of pairs: no-grad forwards never peak above the step.
        with self.around_phase("reference"):
            errors = self._reference_errors(batches, self.cfg.optim.batch_size)
        return [dataclasses.replace(b, reference=e) for b, e in zip(batches, errors)]

    def _generate_negatives(self, rows: Sequence[Rows], draws: Sequence[Draws], settings: NegativesConfig) -> list[torch.Tensor]:
        """Every micro-batch's losers x_l, sampled by its pool checkpoints, grouped by checkpoint."""
        losers = [torch.empty_like(r.winners) for r in rows]
        groups = _by_checkpoint(draws)
        with tqdm(total=sum(map(len, groups.values())), desc="negatives", unit="image", leave=False, disable=not self.progress) as bar:
            for checkpoint, members in groups.items():
                with self.reference.activate(checkpoint, fused=settings.fuse_lora) as denoiser, self.autocast():
                    for chunk in _chunks(members, settings.batch_size, [r.winners for r in rows]):
                        cond = TextCondition.cat([rows[b].cond[i : i + 1] for b, i in chunk])
                        seeds = [draws[b].sample_seeds[i] for b, i in chunk]
                        size = rows[chunk[0][0]].winners.shape[2:]
                        latents = self.sample(denoiser, cond, seeds, settings, size)
                        for (b, i), latent in zip(chunk, latents):
                            losers[b][i] = latent
                        bar.update(len(chunk))
                        fault_point("negatives")
        return losers

    def sample(self, denoiser, cond: TextCondition, seeds: Sequence[int], settings: NegativesConfig, latent_size: Sequence[int]) -> torch.Tensor:
        """Latents ``x_l`` of ``latent_size`` that ``denoiser`` (a pool checkpoint, or the policy) samples
        for ``cond`` with the negatives' sampler, as ``settings`` say."""
        compiling = self.negatives.compile and denoiser not in self._compiled
        start = time.perf_counter()
        latents = self.family.sample(self._sampling_denoiser(denoiser), self.sampler, cond, self.uncond, seeds, steps=settings.steps,
                                     guidance_scale=settings.guidance_scale, latent_size=latent_size, device=self.device)
        if compiling:
            log.info("negatives.compile: the denoiser's first compiled sampling call took %.1f s (%d steps, compiling included)", time.perf_counter() - start, settings.steps)
        return latents

    def _sampling_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """``denoiser`` as sampling calls it: with ``negatives.compile``, compiled the first time and reused after.

        With LoRA every pool checkpoint samples through the one policy denoiser (its adapter switched),
        so the run compiles once; a checkpoint's weights are graph inputs, not constants.
        """
        if not self.negatives.compile:
            return denoiser
        if denoiser not in self._compiled:
            # Static shapes: a shape's kernels do not depend on which shapes came before, so a resumed
            # run samples as an uninterrupted one does.
            self._compiled[denoiser] = torch.compile(denoiser, backend=self.compile_backend, dynamic=False)
        return self._compiled[denoiser]

    @torch.no_grad()
    def _reference_errors(self, batches: Sequence[PairBatch], chunk_size: int) -> list[ReferenceErrors]:
        n = [len(b) for b in batches]
        ref_w, ref_l = [torch.empty(k) for k in n], [torch.empty(k) for k in n]
        switch = [torch.empty(k) if b.draws.switch_noise is not None else None for k, b in zip(n, batches)]
        for checkpoint, members in _by_checkpoint([b.draws for b in batches]).items():
            with self.reference.activate(checkpoint) as denoiser, self.autocast():
                for chunk in _chunks(members, chunk_size, [b.rows.winners for b in batches]):
                    winners = torch.stack([batches[b].rows.winners[i] for b, i in chunk])
                    losers = torch.stack([batches[b].losers[i] for b, i in chunk])
                    noise = torch.stack([batches[b].draws.noise[i] for b, i in chunk])
                    t = torch.stack([batches[b].draws.timesteps[i] for b, i in chunk])
                    cond = TextCondition.cat([batches[b].rows.cond[i : i + 1] for b, i in chunk])
                    errors_w, errors_l = (e.cpu() for e in pair_errors(self.family, denoiser, winners, losers, noise, t, cond, self.device))
                    for k, (b, i) in enumerate(chunk):
                        ref_w[b][i], ref_l[b][i] = errors_w[k], errors_l[k]
                    if switch[chunk[0][0]] is not None:
                        mean = mean_over_draws(
                            self.family, denoiser, errors_w, winners, torch.stack([batches[b].draws.switch_timesteps[i] for b, i in chunk]),
                            torch.stack([batches[b].draws.switch_noise[i] for b, i in chunk]), cond, self.device,
                        ).cpu()
                        for k, (b, i) in enumerate(chunk):
                            switch[b][i] = mean[k]
        return [ReferenceErrors(w, l, s) for w, l, s in zip(ref_w, ref_l, switch)]
