"""Losses of docs/method.md ("Losses") against values computed by hand, and the model family's denoising error."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sspo.errors import ModelError
from sspo.models.condition import TextCondition
from sspo.models.families.sd import StableDiffusion
from sspo.models.families.sdxl import StableDiffusionXL
from sspo.training.losses import sft_loss, sspo_loss, ssr_coefficient


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def softplus_neg(x):
    """-log(sigmoid(x)) = log(1 + exp(-x)), by hand."""
    return math.log(1.0 + math.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# Shared example (beta = 2, so -beta/2 = -1):
#   policy_w = [1.0, 0.4], ref_w = [0.8, 0.7]  -> dw = [ 0.2, -0.3], mean dw = -0.05
#   policy_l = [0.6, 0.9], ref_l = [0.7, 0.4]  -> dl = [-0.1,  0.5], mean dl =  0.2
#   switch fires (policy_w > ref_w): [1.0 > 0.8 yes, 0.4 > 0.7 no]
POLICY_W, REF_W = [1.0, 0.4], [0.8, 0.7]
POLICY_L, REF_L = [0.6, 0.9], [0.7, 0.4]


def example():
    return t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L)


# ----------------------------------------------------------------------------------------------
# SFT


def test_sft_loss_is_mean_of_winner_errors():
    # (1.0 + 0.5 + 0.3) / 3 = 0.6
    loss, metrics = sft_loss(t([1.0, 0.5, 0.3]))
    assert loss.item() == pytest.approx(0.6, abs=1e-12)
    assert metrics["loss"].item() == pytest.approx(0.6, abs=1e-12)
    assert not metrics["loss"].requires_grad


def test_sft_loss_gradient_is_one_over_n():
    policy_w = t([1.0, 0.5, 0.3, 2.0], grad=True)
    loss, _ = sft_loss(policy_w)
    loss.backward()
    # d mean / d x_i = 1/4
    assert torch.allclose(policy_w.grad, torch.full((4,), 0.25, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Diffusion-DPO, eq. (4/5): sspo_loss with the switch off (K = -1), as the dpo and spin methods train


def diffusion_dpo(policy_w, policy_l, ref_w, ref_l, beta: float) -> torch.Tensor:
    """Diffusion-DPO's eq. (4/5) as published, written apart from sspo_loss: the reference it must equal."""
    return -torch.nn.functional.logsigmoid(-beta / 2 * ((policy_w - ref_w) - (policy_l - ref_l))).mean()


def dpo_loss(policy_w, policy_l, ref_w, ref_l, beta: float):
    """The loss the dpo and spin methods train with (their switch is always off)."""
    return sspo_loss(policy_w, policy_l, ref_w, ref_l, beta, ssr="off")


def test_dpo_loss_matches_eq4_by_hand_beta2():
    # dw - dl = [0.2 - (-0.1), -0.3 - 0.5] = [0.3, -0.8]
    # inside = -beta/2 * (dw - dl) = -1 * [0.3, -0.8] = [-0.3, 0.8]
    # loss = (log(1 + e^0.3) + log(1 + e^-0.8)) / 2
    expected = (math.log(1 + math.exp(0.3)) + math.log(1 + math.exp(-0.8))) / 2
    loss, metrics = dpo_loss(*example(), beta=2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["loss"].item() == pytest.approx(expected, abs=1e-12)
    assert diffusion_dpo(*example(), beta=2.0).item() == pytest.approx(expected, abs=1e-12)
    # implicit accuracy: inside > 0 for [no, yes] -> 0.5
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)
    # K = -1 everywhere: no switch fires
    assert metrics["ssr_rate"].item() == 0.0
    assert metrics["dw"].item() == pytest.approx(-0.05, abs=1e-12)
    assert metrics["dl"].item() == pytest.approx(0.2, abs=1e-12)


def test_dpo_loss_beta_halved():
    # beta = 4: inside = -2 * [0.3, -0.8] = [-0.6, 1.6]
    expected = (softplus_neg(-0.6) + softplus_neg(1.6)) / 2
    loss, _ = dpo_loss(*example(), beta=4.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("beta", [0.5, 3.0, 500.0])
def test_sspo_with_the_switch_off_is_diffusion_dpo_in_value_and_gradient(beta):
    gen = torch.Generator().manual_seed(0)
    errors = [torch.rand(16, generator=gen, dtype=torch.float64) for _ in range(4)]
    ours, theirs = [[e.clone().requires_grad_() for e in errors] for _ in range(2)]
    loss, _ = dpo_loss(*ours, beta=beta)
    expected = diffusion_dpo(*theirs, beta=beta)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    for mine, published in zip(ours[:2], theirs[:2]):  # the reference's errors get no gradient in ours
        torch.testing.assert_close(mine.grad, published.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# SSPO, eq. (8) / (9)


def test_sspo_sign_by_hand():
    # K = [+1, -1]
    # dw + K*dl = [0.2 + (-0.1), -0.3 - 0.5] = [0.1, -0.8]
    # inside = -1 * [0.1, -0.8] = [-0.1, 0.8]
    expected = (softplus_neg(-0.1) + softplus_neg(0.8)) / 2
    loss, metrics = sspo_loss(*example(), beta=2.0, ssr="sign")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)  # [-0.1 no, 0.8 yes]
    assert metrics["ssr_rate"].item() == pytest.approx(0.5)  # mean(K == +1) = 1/2
    assert metrics["dw"].item() == pytest.approx(-0.05, abs=1e-12)
    assert metrics["dl"].item() == pytest.approx(0.2, abs=1e-12)


def test_loser_pull_weights_k_by_each_sample_share_of_the_gradient():
    # As in test_sspo_sign_by_hand: K = [+1, -1], inside = [-0.1, 0.8].
    # weights sigmoid(-inside) = [sigmoid(0.1), sigmoid(-0.8)] = [0.524979, 0.310026]
    # loser_pull = (0.524979 - 0.310026) / (0.524979 + 0.310026) = 0.257428
    w_fired, w_dpo = 1 / (1 + math.exp(-0.1)), 1 / (1 + math.exp(0.8))
    _, metrics = sspo_loss(*example(), beta=2.0, ssr="sign")
    assert metrics["loser_pull"].item() == pytest.approx((w_fired - w_dpo) / (w_fired + w_dpo), abs=1e-12)
    assert metrics["loser_pull"].item() == pytest.approx(0.257428, abs=1e-6)
    # indicator: K = [0, -1] -> -w_dpo / (w_fired' + w_dpo) with inside = [-0.2, 0.8]
    _, metrics = sspo_loss(*example(), beta=2.0, ssr="indicator")
    w_fired = 1 / (1 + math.exp(-0.2))
    assert metrics["loser_pull"].item() == pytest.approx(-w_dpo / (w_fired + w_dpo), abs=1e-12)
    # DPO pushes every loser away, whatever beta
    for beta in (2.0, 2000.0):
        assert dpo_loss(*example(), beta=beta)[1]["loser_pull"].item() == pytest.approx(-1.0, abs=1e-12)


def test_at_a_large_beta_the_saturated_dpo_terms_leave_only_the_fired_pull():
    # beta = 200: inside = -100 * [0.1, -0.8] = [-10, 80]: the DPO term's slope sigmoid(-80) ~ 2e-35,
    # so the one fired sample (K = +1) carries all the gradient though the switch fired on half.
    _, metrics = sspo_loss(*example(), beta=200.0, ssr="sign")
    assert metrics["ssr_rate"].item() == pytest.approx(0.5)
    assert metrics["loser_pull"].item() == pytest.approx(1.0, abs=1e-12)


def test_loser_pull_stays_finite_when_every_term_saturates():
    # beta = 1e4, switch off, the winners' errors lowered by 1: dw - dl = [0.3 - 1, -0.8 - 1] = [-0.7, -1.8],
    # inside = -5e3 * [-0.7, -1.8] = [3500, 9000]: sigmoid(-3500) and sigmoid(-9000) are 0 in float64,
    # yet the shares come from their logs, and every K is -1.
    policy_w, policy_l, ref_w, ref_l = example()
    _, metrics = sspo_loss(policy_w - 1.0, policy_l, ref_w, ref_l, beta=1e4, ssr="off")
    assert metrics["loser_pull"].item() == pytest.approx(-1.0, abs=1e-12)
    # sign switch, all saturated: the pull follows the least saturated term
    policy_w, policy_l, ref_w, ref_l = t([1.0, 0.0]), t([0.0, 1.0]), t([0.5, 0.5]), t([1.0, 0.0])
    # K = [+1, -1]; dw = [0.5, -0.5], dl = [-1, 1]; dw + K dl = [-0.5, -1.5]; inside = 5e3 * [0.5, 1.5]
    _, metrics = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=1e4, ssr="sign")
    assert metrics["loser_pull"].item() == pytest.approx(1.0, abs=1e-12)


def test_sspo_indicator_by_hand():
    # K = [0, -1]
    # dw + K*dl = [0.2 + 0, -0.3 - 0.5] = [0.2, -0.8]; inside = [-0.2, 0.8]
    expected = (softplus_neg(-0.2) + softplus_neg(0.8)) / 2
    loss, metrics = sspo_loss(*example(), beta=2.0, ssr="indicator")
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["ssr_rate"].item() == pytest.approx(0.5)  # the switch fired once (K = 0)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)


def test_sspo_all_fire_implicit_acc_and_rate():
    # policy_w > ref_w everywhere -> K = [+1, +1, +1]
    # dw = [0.5, 0.1, 0.2], dl = [-0.7, 0.3, -0.1]; dw + dl = [-0.2, 0.4, 0.1]
    # beta = 10: inside = -5 * [-0.2, 0.4, 0.1] = [1.0, -2.0, -0.5]
    policy_w, ref_w = t([1.0, 0.6, 0.7]), t([0.5, 0.5, 0.5])
    policy_l, ref_l = t([0.1, 0.5, 0.3]), t([0.8, 0.2, 0.4])
    loss, metrics = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=10.0)
    expected = (softplus_neg(1.0) + softplus_neg(-2.0) + softplus_neg(-0.5)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["ssr_rate"].item() == 1.0
    assert metrics["implicit_acc"].item() == pytest.approx(1 / 3)
    assert metrics["dw"].item() == pytest.approx((0.5 + 0.1 + 0.2) / 3, abs=1e-12)
    assert metrics["dl"].item() == pytest.approx((-0.7 + 0.3 - 0.1) / 3, abs=1e-12)


def test_ssr_coefficient_boundary_is_strict():
    # policy_w == ref_w -> condition `>` is false -> K = -1 (sign and indicator alike)
    policy_w = t([0.5, 0.5 + 1e-12, 0.5 - 1e-12])
    ref_w = t([0.5, 0.5, 0.5])
    assert ssr_coefficient(policy_w, ref_w, "sign").tolist() == [-1.0, 1.0, -1.0]
    assert ssr_coefficient(policy_w, ref_w, "indicator").tolist() == [-1.0, 0.0, -1.0]
    assert ssr_coefficient(policy_w, ref_w, "off").tolist() == [-1.0, -1.0, -1.0]


def test_sspo_boundary_loss_uses_minus_one():
    # policy_w == ref_w = 0.5 -> dw = 0, K = -1; dl = 0.3 - 0.1 = 0.2
    # inside = -1 * (0 - 0.2) = 0.2 -> loss = log(1 + e^-0.2)
    loss, metrics = sspo_loss(t([0.5]), t([0.3]), t([0.5]), t([0.1]), beta=2.0, ssr="sign")
    assert loss.item() == pytest.approx(softplus_neg(0.2), abs=1e-12)
    assert metrics["ssr_rate"].item() == 0.0
    assert metrics["implicit_acc"].item() == 1.0


def test_invalid_ssr_raises():
    with pytest.raises(ValueError, match="ssr"):
        ssr_coefficient(t([1.0]), t([0.0]), "sometimes")
    with pytest.raises(ValueError, match="ssr"):
        sspo_loss(t([1.0]), t([1.0]), t([0.0]), t([0.0]), beta=1.0, ssr="sometimes")


# ----------------------------------------------------------------------------------------------
# Gradients


def test_k_has_no_grad():
    policy_w = t([1.0, 0.2], grad=True)
    k = ssr_coefficient(policy_w, t([0.5, 0.5]), "sign")
    assert not k.requires_grad
    assert k.grad_fn is None


@pytest.mark.parametrize("ssr", ["sign", "indicator", "off"])
def test_gradients_only_reach_policy(ssr):
    policy_w, policy_l = t(POLICY_W, grad=True), t(POLICY_L, grad=True)
    ref_w, ref_l = t(REF_W, grad=True), t(REF_L, grad=True)
    loss, metrics = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=2.0, ssr=ssr)
    loss.backward()
    assert ref_w.grad is None
    assert ref_l.grad is None
    assert policy_w.grad is not None and torch.all(policy_w.grad != 0)
    assert policy_l.grad is not None
    for name, value in metrics.items():
        assert not value.requires_grad, name


def test_k_plus_one_pushes_both_errors_down():
    # policy_w > ref_w everywhere -> K = +1.
    # d(-log sigmoid(x))/dx = -sigmoid(-x); x = -beta/2 (dw + dl)
    # dloss/dpolicy_w_i = dloss/dpolicy_l_i = sigmoid(-x_i) * beta/2 / N > 0
    # beta = 2, dw = [0.5, 0.3], dl = [0.1, -0.2] -> x = [-0.6, -0.1]
    policy_w, ref_w = t([1.0, 0.8], grad=True), t([0.5, 0.5])
    policy_l, ref_l = t([0.4, 0.3], grad=True), t([0.3, 0.5])
    loss, metrics = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=2.0, ssr="sign")
    assert metrics["ssr_rate"].item() == 1.0
    loss.backward()
    expected = [sigmoid(0.6) * 1.0 / 2, sigmoid(0.1) * 1.0 / 2]
    assert torch.all(policy_w.grad > 0)  # gradient descent lowers the winner's error
    assert torch.all(policy_l.grad > 0)  # ... and the self-sample's error (SFT on both)
    assert policy_w.grad.tolist() == pytest.approx(expected, abs=1e-12)
    assert policy_l.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_k_minus_one_pushes_winner_down_loser_up():
    # policy_w <= ref_w everywhere -> K = -1 (DPO):
    # dloss/dpolicy_w = +sigmoid(-x) * beta/2 / N, dloss/dpolicy_l = -sigmoid(-x) * beta/2 / N
    # beta = 2, dw = [-0.5, 0.0], dl = [0.1, -0.2] -> dw - dl = [-0.6, 0.2] -> x = [0.6, -0.2]
    policy_w, ref_w = t([0.5, 0.5], grad=True), t([1.0, 0.5])
    policy_l, ref_l = t([0.4, 0.3], grad=True), t([0.3, 0.5])
    loss, metrics = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=2.0, ssr="sign")
    assert metrics["ssr_rate"].item() == 0.0
    loss.backward()
    magnitude = [sigmoid(-0.6) / 2, sigmoid(0.2) / 2]
    assert torch.all(policy_w.grad > 0)  # winner's error pushed down
    assert torch.all(policy_l.grad < 0)  # loser's error pushed up
    assert policy_w.grad.tolist() == pytest.approx(magnitude, abs=1e-12)
    assert policy_l.grad.tolist() == pytest.approx([-m for m in magnitude], abs=1e-12)


def test_indicator_zero_gives_no_loser_gradient():
    # K = 0 where the switch fires: the loser term drops out of that sample
    policy_w, ref_w = t([1.0, 0.2], grad=True), t([0.5, 0.5])
    policy_l, ref_l = t([0.4, 0.3], grad=True), t([0.3, 0.5])
    loss, _ = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=2.0, ssr="indicator")
    loss.backward()
    assert policy_l.grad[0].item() == 0.0
    assert policy_l.grad[1].item() < 0
    assert torch.all(policy_w.grad > 0)


# ----------------------------------------------------------------------------------------------
# Pipeline: diffusion target and per-sample denoising error


def _ddpm(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def _sd(prediction_type, family=StableDiffusion):
    """A family bound to a pipeline's components: only the scheduler, which training needs."""
    return family({"scheduler": _ddpm(prediction_type)})


def test_diffusion_target_epsilon_is_noise():
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    target = _sd("epsilon").target(x0, eps, torch.tensor([10, 500]))
    assert torch.equal(target, eps)


def test_diffusion_target_v_prediction_by_hand():
    family = _sd("v_prediction")
    sched = family.noise_schedule
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 700])
    target = family.target(x0, eps, timesteps)
    for i, step in enumerate(timesteps.tolist()):
        abar = float(sched.alphas_cumprod[step])
        alpha_t, sigma_t = math.sqrt(abar), math.sqrt(1.0 - abar)
        expected = alpha_t * eps[i] - sigma_t * x0[i]  # v = alpha_t * eps - sigma_t * x0
        assert torch.allclose(target[i], expected, atol=1e-5)
    # sanity: at t = 700 the velocity is not the noise
    assert not torch.allclose(target[1], eps[1], atol=1e-2)


def test_diffusion_target_unsupported_raises_model_error():
    with pytest.raises(ModelError, match="prediction_type"):
        _sd("sample").target(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1]))
    family = _sd("epsilon")
    family.noise_schedule = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"))
    with pytest.raises(ModelError, match="flow"):
        family.target(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1]))


class FakeDenoiser(nn.Module):
    """Returns a fixed prediction and records what it was called with."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.calls.append((sample, timestep, encoder_hidden_states, kwargs))
        return SimpleNamespace(sample=self.out)


def test_denoising_errors_epsilon_by_hand():
    family = _sd("epsilon")
    sched = family.noise_schedule
    latents = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, -1.0], [2.0, 1.0]]]])  # (2,1,2,2)
    noise = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[0.5, -0.5], [1.5, 0.5]]]])
    pred = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    # sample 0: pred - noise = [1, 0, -1, -2] -> squares [1, 0, 1, 4] -> mean 6/4 = 1.5
    # sample 1: pred - noise = [0, 1, -1, 0]  -> squares [0, 1, 1, 0] -> mean 2/4 = 0.5
    timesteps = torch.tensor([3, 900])
    cond = TextCondition(embeds=torch.ones(2, 5, 8))
    denoiser = FakeDenoiser(pred)
    errors = family.denoising_errors(denoiser, latents, noise, timesteps, cond)
    assert errors.shape == (2,)
    assert errors.tolist() == pytest.approx([1.5, 0.5], abs=1e-6)
    # the denoiser saw x_t = sqrt(abar) * x0 + sqrt(1 - abar) * eps, the timesteps and the text embeddings
    (sample, timestep, hidden, kwargs), = denoiser.calls
    for i, step in enumerate(timesteps.tolist()):
        abar = float(sched.alphas_cumprod[step])
        expected = math.sqrt(abar) * latents[i] + math.sqrt(1 - abar) * noise[i]
        assert torch.allclose(sample[i], expected, atol=1e-5)
    assert torch.equal(timestep, timesteps)
    assert torch.equal(hidden, cond.embeds)
    assert kwargs == {}


def test_denoising_errors_v_prediction_by_hand():
    family = _sd("v_prediction")
    sched = family.noise_schedule
    latents = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    noise = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    step = 400
    abar = float(sched.alphas_cumprod[step])
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    # pred = 0 -> error = mean over 4 elements of v^2, v = a*eps - s*x0
    v = [a * e - s * x for e, x in zip([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])]
    expected = sum(x * x for x in v) / 4
    errors = family.denoising_errors(FakeDenoiser(torch.zeros(1, 1, 2, 2)), latents, noise, torch.tensor([step]), TextCondition(torch.zeros(1, 2, 3)))
    assert errors.item() == pytest.approx(expected, rel=1e-5)


def test_denoising_errors_passes_sdxl_conditioning():
    cond = TextCondition(embeds=torch.zeros(1, 2, 3), pooled=torch.ones(1, 4), time_ids=torch.ones(1, 6))
    denoiser = FakeDenoiser(torch.zeros(1, 1, 1, 1))
    _sd("epsilon", StableDiffusionXL).denoising_errors(denoiser, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.tensor([0]), cond)
    (_, _, _, kwargs), = denoiser.calls
    added = kwargs["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], cond.pooled)
    assert torch.equal(added["time_ids"], cond.time_ids)


def test_switch_errors_decide_k_instead_of_the_loss_draw():
    # The loss's own draw says the policy is worse on x_w (1.0 > 0.5: K = +1); the averaged
    # switch errors say it is better (0.2 < 0.4: K = -1), and K follows the switch.
    policy_w, policy_l = torch.tensor([1.0]), torch.tensor([0.3])
    ref_w, ref_l = torch.tensor([0.5]), torch.tensor([0.1])
    _, own = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=2.0)
    loss, switched = sspo_loss(policy_w, policy_l, ref_w, ref_l, beta=2.0, switch=(torch.tensor([0.2]), torch.tensor([0.4])))
    assert own["ssr_rate"] == 1.0 and switched["ssr_rate"] == 0.0
    # K = -1: inside = -beta/2 * (dw - dl) = -(0.5 - 0.2) = -0.3; loss = -log(sigmoid(-0.3))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(0.3))), rel=1e-6)
