"""The reference model's sampling levers: a pool checkpoint's LoRA merged while it samples (and the base
restored bitwise after), and the sampling forwards compiled once per run."""

import contextlib
import dataclasses

import pytest
import torch
from peft.tuners.lora import LoraLayer

from sspo.training import reference as reference_module
from sspo.training.pairs import PairBuilder
from sspo.training.reference import REFERENCE, merged
from sspo.training.trainer import Trainer

from test_trainer import tiny_config


@pytest.fixture
def trainer(quick_base, tmp_path):
    """A fresh tiny SSPO trainer (LoRA, fp32) whose pool's last checkpoint is theta_0 with a clearly
    non-zero adapter, which every negative samples with (erd: last)."""
    t = Trainer(tiny_config(tmp_path / "run", quick_base, "erd=last"))
    gen = torch.Generator().manual_seed(0)
    state = {name: value + 0.05 * torch.randn(value.shape, generator=gen) for name, value in t.reference.policy_state().items()}
    t.pool.add(state, step=1)
    yield t
    t.accelerator.end_training()


def negatives(trainer: Trainer, **settings) -> list[torch.Tensor]:
    builder = trainer.pair_builder
    builder.negatives = dataclasses.replace(trainer.cfg.negatives, **settings)
    return [batch.losers for batch in builder.build([0, 1], with_reference=False)]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_bitwise_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []


def test_fused_sampling_gives_the_unfused_negatives_and_leaves_every_weight_as_it_was(trainer):
    unfused = negatives(trainer, fuse_lora=False)  # loads the checkpoint into the reference adapter
    before = weights(trainer.reference.denoiser)
    fused = negatives(trainer, fuse_lora=True)
    assert_bitwise_equal(before, weights(trainer.reference.denoiser))
    assert not any(layer.merged for layer in trainer.reference.denoiser.modules() if isinstance(layer, LoraLayer))
    for a, b in zip(unfused, fused):
        # fp32 rounding of W + BA against W x + B(A x), carried through the sampler's steps: about
        # 1e-5 on this machine's 2 cores (a thread count changes the sums), far below any defect
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_the_merge_changes_the_base_while_it_lasts_and_restores_its_bits(trainer):
    reference = trainer.reference
    with reference.activate(1):
        pass  # loads checkpoint 1 into the reference adapter
    layers = [m for m in reference.denoiser.modules() if isinstance(m, LoraLayer)]
    base = weights(reference.denoiser)
    reference.denoiser.set_adapter(REFERENCE)
    try:
        with merged(reference.denoiser, REFERENCE):
            assert all(layer.merged for layer in layers)
            assert sum(not torch.equal(value, base[name]) for name, value in reference.denoiser.state_dict().items()) >= len(layers)
    finally:
        reference.denoiser.set_adapter("default")
    assert_bitwise_equal(base, weights(reference.denoiser))


def test_half_precision_weights_sample_unmerged(trainer, monkeypatch):
    merges = []

    @contextlib.contextmanager
    def recording(denoiser, adapter):
        merges.append(adapter)
        yield

    monkeypatch.setattr(reference_module, "merged", recording)
    trainer.reference.fusable = False  # what a bf16 or fp16 run's reference is
    negatives(trainer, fuse_lora=True)
    assert merges == []
    trainer.reference.fusable = True
    negatives(trainer, fuse_lora=True)
    assert merges == [REFERENCE]


def test_compiled_sampling_gives_the_same_negatives_and_compiles_once_across_checkpoints(trainer, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    # The real path is torch.compile with inductor; counting the graphs through a no-op backend keeps the test in seconds.
    counter = CompileCounter()
    monkeypatch.setattr(PairBuilder, "compile_backend", counter)
    torch._dynamo.reset()
    eager = negatives(trainer, compile=False)
    compiled = negatives(trainer, compile=True)
    graphs = counter.frame_count
    assert graphs >= 1
    for a, b in zip(eager, compiled):
        # fp32 rounding of W + BA against W x + B(A x), carried through the sampler's steps: about
        # 1e-5 on this machine's 2 cores (a thread count changes the sums), far below any defect
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    # Another checkpoint's weights in the same adapter, sampled with the same shapes: no new graph.
    trainer.pool.add({name: -value for name, value in trainer.reference.policy_state().items()}, step=2)
    negatives(trainer, compile=True)
    assert counter.frame_count == graphs
