"""The training methods, one row each: what a method needs and does is read from here and nowhere else.

The trainer, the model card, ``sspo compare`` and ``sspo bench`` all read :data:`METHODS`; a new
method is one :func:`register` call (docs/method.md, "Methods" section).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sspo.training.losses import sft_loss, sspo_loss


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str  # one line, for the model card and `sspo train --dry-run`
    uses_reference: bool  # a reference model in the loss (a checkpoint pool); False: SFT's loss on winners
    generates_negatives: bool  # losers x_l sampled by a pool checkpoint (else the dataset's, or none)
    needs_dataset_losers: bool  # losers x_l read from (winner, loser) pairs in the data
    # A pure function of sspo/training/losses.py returning (loss, detached metrics). With a reference:
    # loss(policy_w, policy_l, ref_w, ref_l, beta, ssr, switch), as sspo_loss; without: loss(policy_w), as sft_loss.
    loss: Callable
    erd: str | None = None  # the pool checkpoint it always draws; None: the config's `erd`
    ssr: str | None = None  # the SSR switch it always uses; None: the config's `ssr`


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.generates_negatives and method.needs_dataset_losers:
        raise ValueError(f"method {method.name!r}: losers come either from the pool or from the data, not both")
    if method.uses_reference != (method.generates_negatives or method.needs_dataset_losers):
        raise ValueError(f"method {method.name!r}: the preference loss needs both a reference and losers; SFT's neither")
    METHODS[method.name] = method
    return method


register(Method("sft", "supervised fine-tuning on the preferred images", uses_reference=False, generates_negatives=False, needs_dataset_losers=False, loss=sft_loss,
                ssr="off"))
register(Method("dpo", "Diffusion-DPO on the dataset's (preferred, rejected) pairs", uses_reference=True, generates_negatives=False,
                needs_dataset_losers=True, loss=sspo_loss, erd="initial", ssr="off"))
register(Method("spin", "SPIN-Diffusion-style self-play against the latest checkpoint", uses_reference=True, generates_negatives=True,
                needs_dataset_losers=False, loss=sspo_loss, erd="last", ssr="off"))
register(Method("sspo", "Self-Sampling Preference Optimization (SSPO)", uses_reference=True, generates_negatives=True, needs_dataset_losers=False,
                loss=sspo_loss))
