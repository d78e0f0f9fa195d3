"""``sspo bench``'s FLOP counts, FLOP floor, CPU memory measure and realistic setting, without running arms."""

import mmap
import time

import pytest
import torch

from sspo.commands.bench import BenchConfig, Meter, count_flops, flop_floor, train_config


def test_flops_of_a_linear_layer_match_a_hand_count():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    forward = 2 * 8 * 32 * 16  # one multiply and one add per weight and row
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == forward
    # Backward: gradients of the input and of the weight, a matmul each.
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_cpu_attention_kernel_is_counted():
    q = k = v = torch.randn(1, 2, 4, 8)  # batch, heads, tokens, head width
    # scores (4 x 8 @ 8 x 4) and output (4 x 4 @ 4 x 8) per head: 2 * 4 * 8 * 4 multiply-adds each.
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 2 * 2 * (2 * 4 * 8 * 4)


def _pair_flops(steps: int, forward_backward: float, generates: bool) -> dict:
    """Per pair, in units of one forward of one sample: policy on x_w and x_l, reference forward on both, S steps with CFG."""
    generation = 2 * steps if generates else 0
    return {"all_in": 2 * forward_backward + 2 + generation, "generation": generation, "images_per_step": 1 if generates else 0,
            "generation_fixed": 0, "generation_per_sampler_step": 2}


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_flop_floor_is_six_plus_two_s_over_six_for_lora(steps):
    dpo, sspo = _pair_flops(steps, 2, False), _pair_flops(steps, 2, True)  # LoRA: forward + backward ~ 2 forwards
    assert flop_floor(sspo, dpo) == pytest.approx((6 + 2 * steps) / 6)
    assert flop_floor(dpo, dpo) == 1
    # Re-costed at another step count: as if counted there.
    assert flop_floor(sspo, dpo, 50) == pytest.approx((6 + 2 * 50) / 6)
    full = _pair_flops(steps, 3, True)  # full fine-tuning: forward + backward ~ 3 forwards
    assert flop_floor(full, _pair_flops(steps, 3, False)) == pytest.approx((8 + 2 * steps) / 8)


def test_cpu_memory_counts_an_allocation_and_not_dropped_file_pages(tmp_path):
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"\1" * (100 * 2**20))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE)) == len(mapped) // mmap.PAGESIZE  # its pages resident
    meter = Meter(torch.device("cpu"))
    assert "anonymous" in meter.method
    meter.reset()
    mapped.close()  # 100 MB of file pages leave the resident set inside the region
    held = torch.ones(50 * 2**20)  # 200 MB, written, so resident
    time.sleep(0.05)
    peak = meter.peak_mb()["peak_mb"]
    del held
    assert 190 <= peak < 260


def test_realistic_sets_the_scale_and_explicit_flags_win(tmp_path):
    b = BenchConfig(model="quick", realistic=True, overrides=("optim.batch_size=2",))
    assert train_config(b, "sspo-pregenerated", tmp_path).optim.batch_size == 2  # an explicit override wins
    b = BenchConfig(model="quick", realistic=True, overrides=("negatives.batch_size=48",))
    cfg = train_config(b, "sspo-pregenerated", tmp_path)
    negatives = cfg.steps_per_iteration * cfg.optim.batch_size
    assert cfg.optim.batch_size >= 8 and negatives >= 64 and negatives >= b.pool_size * 48
    assert (cfg.steps_per_iteration - 1) * cfg.optim.batch_size < max(64, b.pool_size * 48)  # the smallest such K_updates
    assert train_config(BenchConfig(model="quick", realistic=True, steps_per_iteration=7), "dpo", tmp_path).steps_per_iteration == 7
