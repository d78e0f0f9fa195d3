"""``sspo compare``: every method and ablation with the same data, budget and seeds (Tables 1 and 6).

Each arm is the base config plus a few overrides (:func:`arms`); only the method-defining keys
differ, so optimizer steps, samples seen, learning rate, beta and iteration length are the same
for every arm. Finished arms are reused, killed ones resumed, so the command can be re-run.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Sequence

from .config import load_config
from .plots import REWARD_PANEL, SSR_PANEL, plot_panels, reward_series, ssr_series
from .errors import ConfigError
from .evaluate import TABLE_COLUMNS, EvalConfig, eval_items, evaluate_model, showcase
from .io import atomic_write_json, atomic_write_text
from .methods import METHODS, Method
from .sample import image_grid, save_png
from .train_config import TrainConfig
from .models.names import resolve_model
from .trainer import latest_checkpoint, train

log = logging.getLogger(__name__)

# SSPO's variants: SSPOr (random side of each pair as winner) and the Table 6 ablations.
VARIANTS: dict[str, list[str]] = {
    "sspo_r": ["method=sspo", "data.mode=random"],
    "ssr_off": ["method=sspo", "ssr=off"],
    "indicator": ["method=sspo", "ssr=indicator"],
    "erd_initial": ["method=sspo", "erd=initial"],
    "erd_last": ["method=sspo", "erd=last"],
}
ABLATIONS = ("ssr_off", "indicator", "erd_initial", "erd_last")


def arms() -> dict[str, list[str]]:
    """Arm -> overrides: the untrained base, every method of the table (sspo/methods.py), SSPO's variants."""
    return {"base": [], **{name: [f"method={name}"] for name in METHODS}, **VARIANTS}


def table1() -> tuple[str, ...]:
    return ("base", *METHODS, "sspo_r")
SHOWCASE_CELL = 96
QUICK = ["iterations=2", "steps_per_iteration=3", "validation.prompts_per_split=4", "negatives.steps=5"]


def arm_config(config: str | Path, arm: str, seed: int, out: Path, extra: Sequence[str]) -> TrainConfig:
    overrides = [*extra, *arms()[arm], f"seed={seed}", f"output_dir={out / 'runs' / f'{arm}-seed{seed}'}", "validation.every_iterations=1", "validation.shapes_eval=true"]
    return load_config(TrainConfig, config, overrides)


def arm_method(arm: str) -> Method:
    """The method an arm trains (its ``method=`` override)."""
    return METHODS[next(o.partition("=")[2] for o in arms()[arm] if o.startswith("method="))]


def run_arm(config, arm: str, seed: int, out: Path, extra: Sequence[str], eval_cfg: EvalConfig) -> dict:
    """Train (or reuse / resume) one arm for one seed and evaluate it; cached in ``eval.json``."""
    cfg = arm_config(config, arm, seed, out, extra)
    run = Path(cfg.output_dir)
    cached = run / "eval.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    base = resolve_model(cfg.model.pretrained)
    if arm == "base":
        model, lora = base, None
    else:
        final = train(cfg, resume=latest_checkpoint(run) is not None)
        model, lora = (base, final) if cfg.model.lora else (final, None)
    summary, images = evaluate_model(model, eval_cfg, lora=lora)
    run.mkdir(parents=True, exist_ok=True)
    save_png(image_grid([showcase(eval_cfg, images)[0]], cell=SHOWCASE_CELL), run / "showcase.png")
    atomic_write_json(cached, summary)
    return summary


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, list[dict]], arms: Sequence[str], split: str) -> str:
    lines = ["| arm | " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---|" * len(TABLE_COLUMNS)]
    for arm in arms:
        if arm in results:
            cells = [mean_std([seed[split][c] for seed in results[arm]]) for c in TABLE_COLUMNS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, list[dict]], command: str, seeds: Sequence[int]) -> None:
    sections = [f"# sspo compare\n\nCommand: `{command}`\n\nSeeds: {list(seeds)}; mean ± std over seeds of the exact reward and its components.\n"]
    for title, arms in (("Table 1: methods", table1()), ("Table 6: SSPO ablations", ("sspo", *ABLATIONS))):
        for split, label in (("seen", "seen prompts (combinations in the alignment data)"), ("heldout", "held-out prompts")):
            if any(a in results for a in arms):
                sections.append(f"## {title} — {label}\n\n{table(results, arms, split)}\n")
    atomic_write_text(out / "results.md", "\n".join(sections))
    atomic_write_json(out / "results.json", {"command": command, "seeds": list(seeds), "results": results})


def write_figures(out: Path, names: Sequence[str], seeds: Sequence[int], eval_cfg: EvalConfig) -> None:
    runs = out / "runs"
    by_arm = {arm: [runs / f"{arm}-seed{seed}" for seed in seeds] for arm in names}
    figure9 = {arm: by_arm[arm] for arm in ("sft", "sspo") if arm in by_arm}
    plot_panels([(*REWARD_PANEL, reward_series(figure9, splits=("heldout",)))], out / "figure9_reward.png")
    preference_arms = {arm: dirs for arm, dirs in by_arm.items() if arm != "base" and arm_method(arm).uses_reference}
    plot_panels([(*SSR_PANEL, ssr_series(preference_arms))], out / "figure4_ssr_rate.png")
    # The arms' showcase strips (same prompts, first seed) stacked into one labelled grid.
    strips = [(arm, runs / f"{arm}-seed{seeds[0]}" / "showcase.png") for arm in names]
    strips = [(arm, path) for arm, path in strips if path.is_file()]
    if strips:
        from PIL import Image

        rows = []
        for _, path in strips:
            with Image.open(path) as strip:
                rows.append([strip.crop((i * SHOWCASE_CELL, 0, (i + 1) * SHOWCASE_CELL, SHOWCASE_CELL)) for i in range(strip.width // SHOWCASE_CELL)])
        captions = showcase(eval_cfg, [None] * len(eval_items(eval_cfg)))[1]
        save_png(image_grid(rows, [arm for arm, _ in strips], captions), out / "grid.png")


def run_compare(config: str | Path, names: Sequence[str], seeds: Sequence[int], out: str | Path, overrides: Sequence[str] = (), quick: bool = False, command: str = "") -> dict:
    unknown = [a for a in names if a not in arms()]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}; expected some of {', '.join(arms())}")
    out = Path(out)
    extra = [*(QUICK if quick else []), *overrides]
    eval_cfg = EvalConfig(prompts_per_split=8 if quick else 24)
    results: dict[str, list[dict]] = {}
    for arm in names:
        for seed in seeds[:1] if arm == "base" else seeds:  # the untrained base has no seed
            log.info("arm %s, seed %d", arm, seed)
            results.setdefault(arm, []).append(run_arm(config, arm, seed, out, extra, eval_cfg))
            write_report(out, results, command, seeds)
    write_figures(out, names, seeds, eval_cfg)
    print((out / "results.md").read_text())
    return results
