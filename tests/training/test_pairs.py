"""PairBuilder's hooks: phases seen from outside, rows read beforehand, the sampler's step count per call."""

import contextlib
import dataclasses
import types

import pytest
import torch
from diffusers import DDPMScheduler

from sspo.models.condition import TextCondition
from sspo.models.families.sd import StableDiffusion
from sspo.training.config import NegativesConfig, TrainConfig
from sspo.training.pairs import PairBuilder, Rows

from test_video_latents import HalfDenoiser, OneCheckpointPool

SHAPE = (2, 4, 8, 8)


def rows(m: int) -> Rows:
    gen = torch.Generator().manual_seed(m)
    return Rows(["a", "b"], TextCondition(torch.zeros(2, 7, 16)), torch.randn(SHAPE, generator=gen), None)


def unread(m: int) -> Rows:
    raise AssertionError(f"micro-batch {m} read although its rows were given")


@pytest.fixture
def sampled(monkeypatch):
    """The step count of every sampler call, and a builder whose negatives are zeros."""
    steps_seen: list[int] = []

    def sample(denoiser, sampler, cond, uncond, seeds, *, steps: int, **kwargs):
        steps_seen.append(steps)
        return torch.zeros(len(seeds), *SHAPE[1:])

    family = StableDiffusion({"scheduler": DDPMScheduler()})
    monkeypatch.setattr(family, "sample", sample)
    reference = types.SimpleNamespace(pool=OneCheckpointPool(), activate=lambda checkpoint, fused=False: contextlib.nullcontext(HalfDenoiser()))
    cfg = TrainConfig(method="sspo", beta=5000.0, negatives=NegativesConfig(scheduler="ddim"))  # as resolved for an SD model
    builder = PairBuilder(cfg, family, reference, None, read_rows=unread, stream=lambda m: m, device="cpu", autocast=contextlib.nullcontext)
    return builder, steps_seen


def test_phases_are_entered_around_generation_and_reference_forwards(sampled):
    builder, steps = sampled
    seen = []

    @contextlib.contextmanager
    def around_phase(name):
        seen.append(f"enter {name}")
        yield
        seen.append(f"exit {name} after {len(steps)} sampler calls")

    builder.around_phase = around_phase
    with builder.rows_from({0: rows(0), 1: rows(1)}):
        batches = builder.build([0, 1])
    assert seen == ["enter generate", "exit generate after 1 sampler calls", "enter reference", "exit reference after 1 sampler calls"]
    assert all(b.reference is not None and b.losers.abs().sum() == 0 for b in batches)


def test_rows_from_gives_the_rows_and_then_restores_the_reader(sampled):
    builder, _ = sampled
    given = rows(3)
    with builder.rows_from({3: given}):
        [batch] = builder.build([3], with_reference=False)
    assert batch.rows is given and builder.read_rows is unread


def test_sampler_steps_changes_the_step_count_of_that_call_only(sampled):
    builder, steps = sampled
    with builder.rows_from({0: rows(0)}):
        builder.build([0], with_reference=False, sampler_steps=7)
        builder.build([0], with_reference=False)
    assert steps == [7, TrainConfig().negatives.steps] and TrainConfig().negatives.steps != 7


def test_an_iterations_negatives_fill_generation_batches_across_its_micro_batches(sampled, monkeypatch):
    builder, _ = sampled
    sizes = []
    sample = builder.family.sample

    def sized(denoiser, sampler, cond, uncond, seeds, **kwargs):
        sizes.append(len(seeds))
        return sample(denoiser, sampler, cond, uncond, seeds, **kwargs)

    monkeypatch.setattr(builder.family, "sample", sized)
    builder.negatives = dataclasses.replace(builder.negatives, batch_size=3)
    with builder.rows_from({m: rows(m) for m in range(4)}):
        builder.build(list(range(4)), with_reference=False)  # 4 micro-batches of 2, one checkpoint
    assert sizes == [3, 3, 2]


def test_erd_per_batch_draws_one_checkpoint_per_micro_batch_and_per_sample_one_each():
    from sspo.training.pairs import draw
    from sspo.training.pool import CheckpointPool

    pool = types.SimpleNamespace(draw=lambda erd, rng: CheckpointPool.draw(types.SimpleNamespace(entries=[None] * 5), erd, rng))
    family = StableDiffusion({"scheduler": DDPMScheduler()})
    per_batch = draw(torch.Generator().manual_seed(0), (16, 4, 8, 8), pool, "uniform", "batch", family)
    per_sample = draw(torch.Generator().manual_seed(0), (16, 4, 8, 8), pool, "uniform", "sample", family)
    assert len(per_batch.checkpoints) == 16 and len(set(per_batch.checkpoints)) == 1  # the paper's: one per micro-batch
    assert len(set(per_sample.checkpoints)) > 1


def test_negatives_are_sampled_by_the_checkpoints_drawn_for_them(monkeypatch):
    activated = []
    family = StableDiffusion({"scheduler": DDPMScheduler()})
    monkeypatch.setattr(family, "sample", lambda denoiser, sampler, cond, uncond, seeds, **kwargs: torch.zeros(len(seeds), *SHAPE[1:]))

    def activate(checkpoint, fused=False):
        activated.append(checkpoint)
        return contextlib.nullcontext(HalfDenoiser())

    reference = types.SimpleNamespace(pool=types.SimpleNamespace(draw=lambda erd, rng: rng.randrange(4)), activate=activate)
    cfg = TrainConfig(method="sspo", erd_per="sample", beta=5000.0, negatives=NegativesConfig(scheduler="ddim"))

    def rows(m: int) -> Rows:
        return Rows(["a", "b"], TextCondition(torch.zeros(2, 7, 16)), torch.randn(2, *SHAPE[1:]), None)

    builder = PairBuilder(cfg, family, reference, None, read_rows=rows, stream=lambda m: m, device="cpu", autocast=contextlib.nullcontext)
    batches = builder.build(list(range(6)), with_reference=False)
    drawn = sorted({checkpoint for batch in batches for checkpoint in batch.draws.checkpoints})
    assert len(drawn) > 1 and sorted(set(activated)) == drawn  # each drawn checkpoint generated (RCR), not theta_0 alone
