"""Training losses: pure functions of per-sample denoising errors (docs/method.md, "Losses").

Inputs are the per-sample errors ``L_m(x0)`` of the policy and the reference on the winner
``x_w`` and the loser ``x_l``; each function returns the scalar loss and a dict of detached step
metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSR_VARIANTS = ("sign", "indicator", "off")


def sft_loss(policy_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT, eq. (2): ``mean(L_theta(x_w))``."""
    loss = policy_w.mean()
    return loss, {"loss": loss.detach()}


def ssr_coefficient(policy_w: torch.Tensor, ref_w: torch.Tensor, ssr: str = "sign") -> torch.Tensor:
    """The Self-Sampling Regularization switch ``K`` of eq. (9), computed without gradient.

    The switch fires when the reference already denoises the winner better than the policy
    (``L_theta(x_w) > L_ref(x_w)``): its own sample is then probably good, not a loser.
    ``sign``: K = +1 when it fires (SFT on both samples), else -1 (DPO).
    ``indicator``: K = 0 when it fires (learn from the winner only), else -1.
    ``off``: K = -1 always (every self-sample is a loser: plain DPO).
    """
    with torch.no_grad():
        fires = policy_w > ref_w
        minus_one = torch.full_like(policy_w, -1.0)
        if ssr == "sign":
            return torch.where(fires, torch.ones_like(policy_w), minus_one)
        if ssr == "indicator":
            return torch.where(fires, torch.zeros_like(policy_w), minus_one)
        if ssr == "off":
            return minus_one
    raise ValueError(f"ssr must be one of {SSR_VARIANTS}, got {ssr!r}")


def sspo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    ssr: str = "sign",
    switch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SSPO, eq. (8): ``-mean(logsigmoid(-beta/2 * (dw + K * dl)))`` with ``K`` from eq. (9).

    ``dw = L_theta(x_w) - L_ref(x_w)``, ``dl = L_theta(x_l) - L_ref(x_l)``. With ``ssr="off"``
    (K = -1) this is exactly Diffusion-DPO's eq. (4/5), ``-mean(logsigmoid(-beta/2 * (dw - dl)))``:
    the loss the ``dpo`` and ``spin`` methods train with.
    Metrics: ``implicit_acc = mean(inside > 0)``, ``ssr_rate`` = share of samples whose switch
    fired (``K != -1``; ``mean(K == +1)`` for ``sign``, Figure 4), mean ``dw`` and ``dl``, and
    ``loser_pull``: K averaged with each sample's weight in the gradient, ``sigmoid(-inside)``
    (the slope of its log-sigmoid term). -1: every loser is pushed away (DPO); +1: every loser is
    fitted like a winner. The switch can fire on half the samples and still set it near +1, when
    the DPO terms saturate at a large beta and only the fired terms carry gradient.
    ``switch``: (policy, reference) errors on ``x_w`` averaged over more ``(t, eps)`` draws, to
    decide K from a less noisy comparison (``ssr_draws``); by default K uses the loss's own draw.
    """
    ref_w, ref_l = ref_w.detach(), ref_l.detach()
    k = ssr_coefficient(*(switch or (policy_w, ref_w)), ssr)
    dw = policy_w - ref_w
    dl = policy_l - ref_l
    inside = -0.5 * beta * (dw + k * dl)
    loss = -F.logsigmoid(inside).mean()
    # Each sample's share of the gradient, sigmoid(-inside) normalised, from its log so that terms
    # saturated past float range (inside >> 100 at Diffusion-DPO's beta) still give finite shares.
    inside_hp = inside.detach().to(torch.promote_types(inside.dtype, torch.float32))
    share = torch.softmax(F.logsigmoid(-inside_hp), dim=0)
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": (inside > 0).float().mean().detach(),
        "ssr_rate": (k != -1).float().mean(),
        "dw": dw.mean().detach(),
        "dl": dl.mean().detach(),
        "loser_pull": (share * k.to(share.dtype)).sum(),
    }
    return loss, metrics
