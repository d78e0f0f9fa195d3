"""``sspo bench``'s FLOP counts and FLOP floor, without running arms."""


import pytest
import torch

from sspo.benchmark.flops import count_flops, flop_floor


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
