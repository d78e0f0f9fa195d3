"""CUDA behaviour of the trainer: mixed precision, gradient checkpointing, SDPA, 8-bit Adam, memory.

Marked ``gpu``: skipped without a CUDA device, except under ``scripts/gpu-check --smoke``, which
runs them on the CPU (the CUDA-only checks skip themselves there) so they cannot rot.
"""

import pytest
import torch

from sspo.training.trainer import Trainer

from test_trainer import metrics, tiny_config

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; these tests change its mixed precision."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(not CUDA, reason="fp16 autocast is a CUDA feature"))])
def test_mixed_precision_trains_with_fp32_lora_weights(precision, quick_base, tmp_path):
    # Enough steps for fp16's loss scaler to come down from 65536: it skips the steps that overflow.
    trainer = Trainer(tiny_config(tmp_path, quick_base, f"mixed_precision={precision}", "iterations=1", "steps_per_iteration=16"))
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert all(p.dtype == torch.float32 for p in after.values())  # the optimizer updates fp32 master weights
    assert any(p.dtype == getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision]) for p in trainer.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in after)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in metrics(tmp_path))
    if precision == "fp16":
        assert all("loss_scale" in row for row in metrics(tmp_path))


@pytest.fixture
def deterministic_kernels():
    """CUDA's default conv/matmul kernels are not bitwise repeatable (5.6e-6 apart on an H200 between
    two identical steps); comparing two runs needs the deterministic ones."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_gradient_checkpointing_changes_memory_not_the_step(quick_base, tmp_path, deterministic_kernels):
    weights = {}
    for checkpointing in (False, True):
        trainer = Trainer(tiny_config(tmp_path / str(checkpointing), quick_base, f"model.gradient_checkpointing={checkpointing}", "iterations=1", "steps_per_iteration=1"))
        assert trainer.policy.is_gradient_checkpointing == checkpointing
        trainer.train()
        weights[checkpointing] = trainable(trainer)
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-6)


def test_attention_runs_through_sdpa(quick_base, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    trainer = Trainer(tiny_config(tmp_path, quick_base))
    processors = trainer.policy.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


@pytest.mark.skipif(not CUDA, reason="bitsandbytes' 8-bit Adam needs CUDA")
def test_8bit_adam_trains(quick_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(tiny_config(tmp_path, quick_base, "optim.use_8bit_adam=true", "iterations=1"))
    before = trainable(trainer)
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert any(not torch.equal(before[name], p) for name, p in trainable(trainer).items())


@pytest.mark.skipif(not CUDA, reason="measures CUDA memory")
def test_full_finetune_reference_leaves_the_gpu_after_pregeneration(quick_base, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, quick_base, "model.lora=false", "iterations=2", "steps_per_iteration=1"))
    trainer.train()  # the pool now holds theta_0 .. theta_2: references are real, separate UNets
    unet_bytes = sum(p.numel() * p.element_size() for p in trainer.policy.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    trainer.iteration_pairs(list(range(trainer.micro_batches_per_iteration)))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 0.1 * unet_bytes
