"""SSR and RCR checked against ground truth, in a world of images (docs/method.md "SSR against ground truth").

The switch of eq. 9 sets ``K = +1`` when ``L_theta(x_w) > L_ref(x_w)``, on the assumption that the
reference's own sample ``x_l`` is then probably good; Random Checkpoint Replay assumes that older
checkpoints give worse samples. Real data cannot test either. A world (the shapes world) scores every
image exactly, so during training (``diagnostics.ssr_truth_per_batch > 0``):

* every negative ``x_l`` is scored, with the pool checkpoint that drew it;
* for the first ``ssr_truth_per_batch`` pairs of every micro-batch (so spread evenly over training)
  the policy, just before the step that uses the pair, samples the same prompt from the same seed
  with the same sampler, and that sample is scored too; the pair's switch margin
  ``L_theta(x_w) - L_ref(x_w)`` and the ``K`` eq. 9 gives it are recorded for every pair (eq. 9's
  whatever ``ssr`` the run trains with: what is checked is the paper's switch). The margin comes from
  a policy forward of its own, so where it is a near tie its sign may round otherwise than in the step.

Rows go to ``<run>/ssr_truth.jsonl`` (read with :func:`sspo.io.read_jsonl`; a resumed run keeps
only those of saved steps); :func:`summarize_ssr_truth` turns them into per-iteration agreement of
``K`` with "``x_l`` is at least as good as the policy's own sample" (accuracy, precision, recall),
the correlation of the margin with the reward gap, and the mean reward of negatives per checkpoint.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sspo.models.pipeline import decode_images
from sspo.training.losses import ssr_coefficient
from sspo.training.pairs import PairBatch, PairBuilder, mean_over_draws

FILE = "ssr_truth.jsonl"


class SSRTruth:
    """Scores a run's pairs exactly (see the module docstring); main process only."""

    def __init__(self, per_batch: int, run_dir: Path, pair_builder: PairBuilder, device, evaluate: Callable[[Any, str], dict[str, float]]):
        self.per_batch, self.evaluate = per_batch, evaluate  # evaluate: a world's exact score of (image, prompt)
        self.path = Path(run_dir) / FILE
        self.pairs, self.family, self.device = pair_builder, pair_builder.family, device

    @torch.no_grad()
    def observe(self, batches: list[PairBatch], policy, iteration: int, step: int) -> None:
        """Before ``step`` (counted from 1) on ``batches``: margins, K, exact rewards of x_l and of the policy's sample."""
        rows = []
        for batch in batches:
            prompts, draws, cond = batch.rows.prompts, batch.draws, batch.rows.cond
            winners = batch.rows.winners.to(self.device)
            policy_w = self.family.denoising_errors(policy, winners, draws.noise.to(self.device), draws.timesteps.to(self.device), cond.to(self.device))
            reference_w = batch.reference.winners
            if draws.switch_noise is not None:  # ssr_draws > 1: K is decided on errors averaged over draws
                policy_w = mean_over_draws(self.family, policy, policy_w, batch.rows.winners, draws.switch_timesteps, draws.switch_noise, cond, self.device)
                reference_w = batch.reference.switch
            policy_w, reference_w = policy_w.float().cpu(), reference_w.float().cpu()
            margin, k = (policy_w - reference_w).tolist(), ssr_coefficient(policy_w, reference_w, "sign").tolist()
            rewards_l = self._rewards(batch.losers, prompts)
            n_policy = min(len(prompts), self.per_batch)
            own = self.pairs.sample(policy, cond[:n_policy], draws.sample_seeds[:n_policy], self.pairs.negatives, batch.losers.shape[2:])
            rewards_policy: list[float | None] = self._rewards(own, prompts[:n_policy])
            rewards_policy += [None] * (len(prompts) - n_policy)
            for i in range(len(prompts)):
                rows.append({"step": step, "iteration": iteration, "micro_batch": batch.index, "sample": i, "checkpoint": draws.checkpoints[i],
                             "margin": margin[i], "K": int(k[i]), "reward_l": rewards_l[i], "reward_policy": rewards_policy[i]})
        with open(self.path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def _rewards(self, latents: torch.Tensor, prompts: list[str]) -> list[float]:
        return [self.evaluate(image, prompt)["reward"] for image, prompt in zip(decode_images(self.family.vae, latents), prompts, strict=True)]


def agreement(k_positive: list[bool], reference_as_good: list[bool]) -> dict[str, float]:
    """How well ``K = +1`` predicts "the reference's sample is at least as good as the policy's own"."""
    k, truth = np.asarray(k_positive, dtype=bool), np.asarray(reference_as_good, dtype=bool)
    tp, fp, fn = int((k & truth).sum()), int((k & ~truth).sum()), int((~k & truth).sum())
    return {
        "n": len(k),
        "accuracy": float((k == truth).mean()) if len(k) else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "ssr_rate": float(k.mean()) if len(k) else math.nan,
        "reference_as_good_rate": float(truth.mean()) if len(k) else math.nan,
    }


def correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 3 points."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _judge(rows: list[dict]) -> dict:
    """K's agreement with the ground truth and the margin/reward-gap correlation, over the pairs that
    have the policy's own sample."""
    judged = [r for r in rows if r["reward_policy"] is not None]
    gap = [r["reward_l"] - r["reward_policy"] for r in judged]
    return agreement([r["K"] > 0 for r in judged], [g >= 0 for g in gap]) | {"margin_gap_correlation": correlation([r["margin"] for r in judged], gap)}


def summarize_ssr_truth(rows: list[dict]) -> dict:
    """Per iteration and overall: :func:`_judge`; and the mean exact reward of negatives by pool
    checkpoint (all pairs)."""
    by_iteration: dict[int, list[dict]] = defaultdict(list)
    by_checkpoint: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        by_iteration[row["iteration"]].append(row)
        by_checkpoint[row["checkpoint"]].append(row["reward_l"])
    return {
        "iterations": {iteration: _judge(its) for iteration, its in sorted(by_iteration.items())},
        "overall": _judge(rows),
        "negative_reward_by_checkpoint": {c: {"n": len(v), "mean": float(np.mean(v))} for c, v in sorted(by_checkpoint.items())},
    }
