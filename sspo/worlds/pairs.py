"""Pick-a-Pic-shaped pairs of any world: two samples of a generator G per prompt, ranked by the exact reward.

A world's own pairs (``data.source: <world>``) put an ideal clean sample against a defective one:
their winners are the evaluator's optimum. Pick-a-Pic's winners are samples of other models that
people preferred to a second sample: imperfect, with room above them. This module makes such data
for every world whose registry entry has :class:`~sspo.worlds.registry.PairsSettings`, from a
generator G that :mod:`sspo.commands.pairs` trains (the world's base after ``steps`` SFT steps on
clean samples, cached by its recipe), so ``steps`` sets how good its samples are. G draws two
samples (images or clips) per alignment-train prompt (never a validation or held-out one) with
different seeds; the one with the higher exact reward wins; pairs whose rewards differ by less than
``tie_threshold`` are dropped, as Pick-a-Pic's ties are. Optionally the label is drawn from a
Bradley-Terry model of the reward difference (people disagree).

Written as a Pick-a-Pic parquet (``caption``, the world's two media columns — ``jpg_0`` / ``jpg_1``
PNG bytes, or ``video_0`` / ``video_1`` lossless clip bytes —, ``label_0``, the winner's side drawn
per row; plus ``reward_0`` / ``reward_1``) that ``data.source: parquet`` reads as it reads any
other, and ``pairs.json`` beside it with the recipe and the statistics:

- ``R_win`` / ``R_lose``: the mean exact reward of the kept winners / losers after a VAE round
  trip: encoded as training encodes them, then decoded. That is what a model that fits the winners
  exactly can reach (SFT's asymptote), as ``R_ceil`` is for clean samples. G's samples were decoded
  from latents, yet the VAE is not idempotent: one more trip moves a shapes image's reward by
  ~0.02-0.03 (median), so the stored winners' own reward (``R_win_stored``) is recorded beside it.
- ``R_base``: the mean exact reward of the base's own samples on the same prompts and seeds.
- ``R_ceil``: the VAE's ceiling, the mean reward of held-out clean samples after a round trip (the
  world's ``round_trip``): no model decoding through this VAE scores higher.

Every choice is seeded; the same config writes the same rows.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sspo.config import MAX_SEED, setting, validate
from sspo.errors import ConfigError, SSPOError
from sspo.io import atomic_write_json, file_digest, write_parquet
from sspo.models.tiny import one_thread
from sspo.worlds.registry import World, base_world, get_world, world_names

# Bump when G's recipe, the sampling or the ranking changes, so cached generators and pairs are rebuilt.
PAIRS_VERSION = 1

_SIDE_STREAM, _LABEL_STREAM = 1, 2  # independent random streams of a row: winner's side, Bradley-Terry label


@dataclasses.dataclass
class PairsConfig:
    steps: int = setting(at_least=0)  # N: G's SFT steps on clean samples from the base (0: the base itself; measurement only)
    base: str = setting("shapes-base", nonempty=True)  # the base G starts from: a world's base or preset ("moving-shapes-base", "shapes-base:quick")
    tie_threshold: float = setting(0.02, at_least=0, below=1)  # pairs whose exact rewards differ by less are dropped as ties
    bt_temperature: float = setting(0.0, at_least=0)  # > 0: label drawn with P(higher reward wins) = sigmoid(diff / T); 0: the higher always wins
    seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # G's training seed, the sampler's seeds, the sides and labels
    split_seed: int = setting(0, at_least=0, at_most=MAX_SEED)  # the world's train / held-out split
    max_prompts: int | None = setting(None, at_least=1)  # at most this many training prompts (a seeded sample; quick runs)
    pairs_per_prompt: int = setting(1, at_least=1)  # pairs drawn per prompt (two samples each, all with different seeds)
    sampler_steps: int = setting(20, at_least=1)  # G's sampler steps, as the evaluation samples (the world's PairsSettings.sampler_steps)
    guidance_scale: float = setting(5.0, at_least=0)  # G's classifier-free guidance (shapes-base and moving-shapes-base sample at 5)
    batch_size: int = setting(32, at_least=1)  # samples per generation batch (a seed fixes its sample whatever the batching)

    def __post_init__(self) -> None:
        validate(self)
        pairs_world(self)


def worlds_with_pairs() -> list[World]:
    """The registered worlds whose entry has PairsSettings."""
    return [world for world in map(get_world, world_names()) if world.pairs is not None]


def pairs_world(cfg: PairsConfig) -> World:
    """The world whose base ``cfg.base`` names; a base of no world, or of a world without pairs, is a ConfigError."""
    world = base_world(cfg.base)
    if world is None or world.pairs is None:
        bases = ", ".join(other.base for other in worlds_with_pairs())
        raise ConfigError(f"base: {cfg.base!r} is not the base of a world with Pick-a-Pic-shaped pairs; expected one of {bases} (or one of their presets)")
    world.base_preset(cfg.base, "base")
    return world


# --------------------------------------------------------------------------------------------------
# Prompts, samples and ranking


def training_specs(cfg: PairsConfig) -> list:
    """The alignment-train combinations without the validation ones (a seeded sample of ``max_prompts``)."""
    specs = list(pairs_world(cfg).make_split(cfg.split_seed).train_without_validation)
    if cfg.max_prompts is not None and cfg.max_prompts < len(specs):
        specs = sorted(random.Random(cfg.seed).sample(specs, cfg.max_prompts))
    return specs


def pair_specs(cfg: PairsConfig) -> list:
    """The prompt of every pair: each training prompt ``pairs_per_prompt`` times."""
    return [spec for spec in training_specs(cfg) for _ in range(cfg.pairs_per_prompt)]


def sample_seeds(cfg: PairsConfig, specs: Sequence) -> list[tuple[int, int]]:
    """The two sampler seeds of every pair, fixed by its prompt (the prompt's place among all
    training combinations), its number among the prompt's pairs and ``cfg.seed``: the same pair
    gets the same seeds at every ``max_prompts``."""
    place = {spec: i for i, spec in enumerate(pairs_world(cfg).make_split(cfg.split_seed).train_without_validation)}
    seen: dict[Any, int] = {}
    seeds = []
    for spec in specs:
        j = seen[spec] = seen.get(spec, -1) + 1
        first = cfg.seed * 1_000_003 + 2 * (place[spec] * cfg.pairs_per_prompt + j)
        seeds.append((first, first + 1))
    return seeds


def draw_samples(generate: Callable[[list[str], list[int]], list], specs: Sequence, seeds: Sequence[tuple[int, int]], cfg: PairsConfig, desc: str) -> list[tuple]:
    """Two samples per prompt, ``(sample_a, sample_b)``: ``generate(prompts, seeds)`` is G's sampler (as
    the evaluation samples), called in batches of ``cfg.batch_size``."""
    prompts = [s.prompt for s in specs for _ in range(2)]
    flat_seeds = [seed for pair in seeds for seed in pair]
    samples: list = []
    with one_thread():
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False):
            end = start + cfg.batch_size
            samples += generate(prompts[start:end], flat_seeds[start:end])
    return list(zip(samples[0::2], samples[1::2]))


def rewards(world: World, samples: Sequence, specs: Sequence) -> np.ndarray:
    """The exact reward of every sample for its spec's prompt."""
    return np.array([world.evaluate(sample, spec.prompt)["reward"] for sample, spec in zip(samples, specs)], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One kept pair: the prompt's place in the sampled list, winner and loser side (0 = sample a), rewards."""

    index: int
    winner: int  # 0: sample a wins, 1: sample b
    winner_first: bool  # the winner goes in the first of the world's pair columns (jpg_0, video_0)
    reward_a: float
    reward_b: float


def rank_pairs(reward_a: np.ndarray, reward_b: np.ndarray, tie_threshold: float, bt_temperature: float, seed: int) -> list[Ranked]:
    """The kept pairs, ranked: ties (|difference| < ``tie_threshold``) dropped, the higher reward
    wins (or, with ``bt_temperature``, wins with probability ``sigmoid(|difference| / T)``), the
    winner's column drawn at random. A row's draws depend only on ``seed`` and its index."""
    kept = []
    for i, (a, b) in enumerate(zip(reward_a, reward_b)):
        difference = float(a - b)
        if abs(difference) < tie_threshold:
            continue
        winner = 0 if difference > 0 else 1
        if bt_temperature > 0:
            agree = 1.0 / (1.0 + math.exp(-abs(difference) / bt_temperature))
            if np.random.default_rng([_LABEL_STREAM, seed, i]).random() >= agree:
                winner = 1 - winner
        first = bool(np.random.default_rng([_SIDE_STREAM, seed, i]).random() < 0.5)
        kept.append(Ranked(i, winner, first, float(a), float(b)))
    return kept


def pickapic_rows(world: World, specs: Sequence, samples: Sequence[tuple], ranked: Sequence[Ranked]) -> list[dict]:
    """Pick-a-Pic rows of the kept pairs: ``caption``, the world's two media columns (``jpg_0``,
    ``jpg_1`` for images), ``label_0`` (1: the first column wins), ``reward_0``, ``reward_1``."""
    first, second = world.pair_columns
    rows = []
    for r in ranked:
        pair, scores = samples[r.index], (r.reward_a, r.reward_b)
        order = (r.winner, 1 - r.winner) if r.winner_first else (1 - r.winner, r.winner)
        rows.append({
            "caption": specs[r.index].prompt,
            first: world.pairs.encode(pair[order[0]]),
            second: world.pairs.encode(pair[order[1]]),
            "label_0": 1.0 if r.winner_first else 0.0,
            "reward_0": scores[order[0]],
            "reward_1": scores[order[1]],
        })
    return rows


def round_trip_rewards(world: World, model: str, samples: Sequence, specs: Sequence) -> np.ndarray:
    """Rewards of ``samples`` after a round trip through ``model``'s VAE (encoded as training encodes
    them, decoded): G's samples were decoded from latents, but the VAE is not idempotent, and one
    more trip moves their reward (docs/data.md "Pick-a-Pic-shaped pairs")."""
    with one_thread(), torch.no_grad():
        return rewards(world, world.pairs.vae_round_trip(model, samples), specs)


# --------------------------------------------------------------------------------------------------
# Statistics and building


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def winner_statistics(stored: tuple[np.ndarray, np.ndarray], round_trip: tuple[np.ndarray, np.ndarray], ranked: Sequence[Ranked]) -> dict:
    """Counts and mean rewards of the kept winners and losers (the labelled ones, with
    Bradley-Terry): as stored, and after a VAE round trip (``R_win``, ``R_lose``: see DEFINITIONS)."""
    def side(rewards: tuple[np.ndarray, np.ndarray], winner: bool) -> np.ndarray:
        return np.array([rewards[r.winner if winner else 1 - r.winner][r.index] for r in ranked])

    drawn = len(stored[0])
    win, lose = side(stored, True), side(stored, False)
    return {
        "pairs_drawn": drawn,
        "ties_dropped": drawn - len(ranked),
        "tie_fraction": (drawn - len(ranked)) / drawn if drawn else float("nan"),
        "pairs": len(ranked),
        "R_G": float(np.concatenate(stored).mean()),
        "R_win": _mean(side(round_trip, True)),
        "R_lose": _mean(side(round_trip, False)),
        "R_win_stored": _mean(win),
        "R_lose_stored": _mean(lose),
        "mean_abs_diff": _mean(np.abs(win - lose)),
        "label_agreement": _mean((win > lose).astype(np.float64)),
    }


DEFINITIONS = {
    "R_win": "mean exact reward of the kept winners after a VAE round trip (encoded as training encodes them, decoded): "
    "what a model that fits the winners exactly reaches, SFT's asymptote; R_ceil is the same round trip of clean renders",
    "R_lose": "the same for the kept losers",
    "R_win_stored": "mean exact reward of the kept winners as stored (G decoded them from its latents; the ranking uses these)",
    "R_lose_stored": "the same for the kept losers",
    "R_G": "mean exact reward of all of G's samples as stored (both of every pair, ties included)",
    "R_base": "mean exact reward of the base's samples on the same prompts and seeds",
    "R_ceil": "mean exact reward of held-out clean samples after a VAE round trip (the ceiling; the world's round trip)",
    "mean_abs_diff": "mean |R(winner) - R(loser)| over kept pairs, as stored",
    "tie_fraction": "share of drawn pairs whose stored rewards differ by less than tie_threshold (dropped)",
    "label_agreement": "share of kept pairs whose labelled winner has the higher stored reward (1 without Bradley-Terry)",
}


@dataclasses.dataclass(frozen=True)
class Measured:
    """G's pairs on the training prompts: prompts, samples, rewards (stored and round-tripped), ranking, statistics."""

    specs: list
    samples: list[tuple]
    stored: tuple[np.ndarray, np.ndarray]
    round_trip: tuple[np.ndarray, np.ndarray]
    ranked: list[Ranked]
    stats: dict


def measure(cfg: PairsConfig, model: str, generate: Callable[[list[str], list[int]], list]) -> Measured:
    """Sample G's pairs (``generate``: G's sampler; ``model``: the base whose VAE training encodes with),
    score them exactly (as stored and after a VAE round trip) and rank them."""
    world = pairs_world(cfg)
    specs = pair_specs(cfg)
    samples = draw_samples(generate, specs, sample_seeds(cfg, specs), cfg, f"pairs: G ({cfg.steps} SFT steps) samples")
    stored = tuple(rewards(world, [s[k] for s in samples], specs) for k in (0, 1))
    round_trip = tuple(round_trip_rewards(world, model, [s[k] for s in samples], specs) for k in (0, 1))
    ranked = rank_pairs(*stored, cfg.tie_threshold, cfg.bt_temperature, cfg.seed)
    return Measured(specs, samples, stored, round_trip, ranked, winner_statistics(stored, round_trip, ranked))


def base_reward(cfg: PairsConfig, specs: Sequence, generate: Callable[[list[str], list[int]], list]) -> float:
    """``R_base``: the mean exact reward of the base's samples (``generate``) on the pairs' prompts and seeds."""
    world = pairs_world(cfg)
    samples = draw_samples(generate, specs, sample_seeds(cfg, specs), cfg, "pairs: base samples")
    return float(np.concatenate([rewards(world, [s[k] for s in samples], specs) for k in (0, 1)]).mean())


def ceiling_reward(cfg: PairsConfig, model: str) -> float:
    """``R_ceil``: the mean exact reward of held-out clean samples after a round trip through ``model``'s VAE."""
    with one_thread():
        return pairs_world(cfg).round_trip(Path(model))["clean"]["reward"]


NOTHING_SCORED = 0.05  # a mean exact reward below this: G's samples show nothing the evaluator recognises


def require_kept(measured: Measured, tie_threshold: float) -> None:
    """Refuse pairs of which every one is a tie: there is nothing to write. The fix depends on why:
    samples that all score about 0 need a better G, not a lower threshold."""
    if not measured.ranked:
        reward = measured.stats["R_G"]
        fix = ("G makes nothing the evaluator scores: give it more SFT steps (--steps N), or the full base (without --quick)"
               if reward < NOTHING_SCORED else "lower --tie-threshold")
        raise SSPOError(f"every one of G's {len(measured.specs)} pairs is a tie below {tie_threshold} (G's mean exact reward {reward:.3f}); {fix}")


# Written before a build's first file and removed after its last: a folder holding it (and no
# pairs.json) is a build that was stopped, which the next one builds over.
BUILDING = "pairs.building"


def write_pairs(world: World, folder: Path, measured: Measured, head: dict, prompts: int, extra_stats: dict) -> dict:
    """Write ``pairs.parquet`` (the kept pairs), then ``pairs.json``: ``head`` (the recipe), the number
    of training ``prompts``, the statistics (``extra_stats`` after G's) and their definitions. A
    folder with ``pairs.json`` is complete."""
    require_kept(measured, head["config"]["tie_threshold"])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / BUILDING, {"key": head["key"]})
    parquet = write_parquet(folder / "pairs.parquet", pickapic_rows(world, measured.specs, measured.samples, measured.ranked))
    record = {**head, "prompts": prompts, "prompt_split": "alignment-train combinations without the validation ones",
              **measured.stats, **extra_stats, "definitions": DEFINITIONS, "parquet": file_digest(parquet)}
    atomic_write_json(folder / "pairs.json", record)
    (folder / BUILDING).unlink()
    return record


def sweep_row(steps: int, measured: Measured, thresholds: Sequence[float]) -> dict:
    """One row of the sweep: G's winner statistics at ``steps`` SFT steps and the tie fraction at each threshold."""
    difference = np.abs(measured.stored[0] - measured.stored[1])
    return {"steps": steps, **measured.stats} | {f"ties<{t:g}": float((difference < t).mean()) for t in thresholds}


def format_sweep(table: Sequence[dict]) -> str:
    ties = [k for k in table[0] if k.startswith("ties<")]
    columns = ("R_G", "R_win", "R_lose", "R_win_stored", "R_lose_stored", "mean_abs_diff", *ties)
    lines = ["| G's SFT steps | " + " | ".join(columns) + " | pairs kept |", "| ---: | " + " | ".join("---:" for _ in columns) + " | ---: |"]
    for row in table:
        cells = [f"{row[k]:.3f}" for k in columns]
        lines.append(f"| {row['steps']} | " + " | ".join(cells) + f" | {row['pairs']}/{row['pairs_drawn']} |")
    return "\n".join(lines)
