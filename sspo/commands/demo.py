"""``sspo demo [--world NAME]``: a world (default: shapes) end to end on a CPU.

base model (shipped or cached) [+ the Pick-a-Pic-shaped pairs its entry names, built from a
generator G] -> the world's demo arms (SFT and SSPO on the winners; for shapes also Diffusion-DPO on
the pairs), same budget -> exact evaluation of every model on seen and held-out prompts -> a table
with each model's paired reward gain over the base (95% CI) and, on model-sampled pairs, its reward
against the winners' (R_win), a grid (same prompts and seeds, one row per model; a GIF for clips) and
a plot of reward and SSR rate over training. Runs go side by side in one-thread processes (``jobs``).
What a world's demo runs is its registry entry's ``demo`` (sspo/worlds/registry.py).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from sspo.commands.parallel import run_all
from sspo.config import load_config
from sspo.errors import SSPOError
from sspo.evaluation.evaluate import EvalConfig, evaluate_model, format_table, showcase, showcase_rewards, table_columns
from sspo.evaluation.plots import REWARD_PANEL, SSR_PANEL, plot_panels, reward_series, ssr_series
from sspo.evaluation.sampling import clip_grid, image_grid, save_animation, save_image
from sspo.io import atomic_write_json, atomic_write_text, claimed_output_folder
from sspo.training.config import TrainConfig
from sspo.training.methods import METHODS
from sspo.training.trainer import train
from sspo.worlds import DemoSettings, World, get_world
from sspo.worlds.names import resolve_model

log = logging.getLogger(__name__)

OUTPUTS = ("results.md", "results.json", "grid.png", "grid.gif", "training.png")  # and a run folder per arm
QUICK = ["iterations=2", "steps_per_iteration=2", "optim.batch_size=4", "validation.prompts_per_split=2", "data.world_pairs_per_prompt=1"]


def demo_base(world: World, base: str, quick: bool) -> str:
    """The base the demo trains from: ``base``, or with ``quick`` the smaller preset its demo names."""
    preset = world.demo_of(base).quick_preset
    return f"{world.base}:{preset}" if quick and preset in world.base_presets else base


def demo_config(out: Path, method: str, quick: bool, world: World, base: str, data: list[str] = ()) -> TrainConfig:
    settings = world.demo_of(base)
    overrides = [f"method={method}", f"output_dir={out / method}", *data, *settings.arm_overrides.get(method, ())]
    overrides += [f"model.pretrained={demo_base(world, base, quick)}"]
    if quick:
        overrides += QUICK
    return load_config(TrainConfig, settings.config, overrides)


def build_data(world: str, level: str, quick: bool) -> tuple[Path, dict]:
    from sspo.commands.pairs import level_pairs

    return level_pairs(world, level, quick)


def evaluate_base(base: str, eval_cfg: EvalConfig) -> tuple[dict, list, float]:
    started = time.time()
    summary, images = evaluate_model(base, eval_cfg)
    return summary, images, time.time() - started


def train_and_evaluate(cfg: TrainConfig, base: str, eval_cfg: EvalConfig) -> tuple[dict, list, float]:
    """One arm: trained (a LoRA on ``base``), then scored; its summary, images and seconds."""
    started = time.time()
    final = train(cfg, overwrite=True)  # the demo's --out is its own: a demo run again trains its arms again
    summary, images = evaluate_model(base, eval_cfg, lora=final)
    return summary, images, time.time() - started


def run_demo(out: str | Path = "runs/demo", quick: bool = False, world: str = "shapes", jobs: int = 1, base: str | None = None) -> dict:
    import torch

    # The demo's models are tiny: intra-op threads gain little, and on a small shared CPU their
    # spinning against other processes slows training steps ~50x (0.3 s -> 17 s on 2 cores).
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    out = Path(out)
    world = get_world(world, "--world")
    base_name = base or world.base
    if not world.names_base(base_name):
        raise SSPOError(f"--base: {base_name!r} is not a base of world {world.name!r}; expected {world.base!r} or {world.base}:<preset>")
    settings = world.demo_of(base_name)
    # A demo of another world writes other arms and another grid (grid.gif, grid.png): never mixed in one folder.
    with claimed_output_folder(out, "--out", "demo", {*OUTPUTS, *METHODS}, {"world": world.name}):
        return _run_demo(out, quick, world, jobs, base_name, settings)


def _run_demo(out: Path, quick: bool, world: World, jobs: int, base_name: str, settings: DemoSettings) -> dict:
    trained_from = demo_base(world, base_name, quick)
    started = time.time()
    base = resolve_model(trained_from)
    timings = {"base": time.time() - started}
    eval_cfg = EvalConfig(prompts=world.name, prompts_per_split=4 if quick else settings.prompts_per_split, steps=settings.sampler_steps,
                          guidance_scale=world.guidance_scale(trained_from))

    # The pairs (when the entry names a level) are built while the base is scored.
    level = settings.data_level
    first = [functools.partial(evaluate_base, base, eval_cfg), *([functools.partial(build_data, world.name, level, quick)] if level else [])]
    (summary, images, timings["eval base"]), *built = run_all(first, jobs, "demo: the base" + (" and the pairs" if level else ""))
    results, shown = {"base": summary}, {"base": images}
    data, record = [], None
    if built:
        folder, record = built[0]
        column_0, column_1 = world.pair_columns
        data = ["data.source=parquet", f"data.path={folder / 'pairs.parquet'}", f"data.image_0_column={column_0}", f"data.image_1_column={column_1}",
                f"validation.world={world.name}"]

    # SFT (and Diffusion-DPO on the pairs, where a world's demo has it) show that training moves the
    # base at all; SSPO is the method itself, trained on the winners only.
    configs = {method: demo_config(out, method, quick, world, base_name, data) for method in settings.methods}
    arms = run_all([functools.partial(train_and_evaluate, cfg, base, eval_cfg) for cfg in configs.values()], jobs, "demo: training and scoring")
    for method, (summary, images, seconds) in zip(configs, arms):
        results[method], shown[method], timings[method] = summary, images, seconds

    target = ("R_win", record["R_win"]) if record else None
    table = format_table(results, table_columns(world.name), baseline="base", target=target)
    if record:
        generator_base = record["config"]["base"]
        table += (f"\n\nTrained on Pick-a-Pic-shaped pairs (level {level}{', quick: a smoke test' if quick else ''}): {record['pairs']} pairs sampled from G, "
                  f"{generator_base} after {record['generator']['steps']} SFT steps. R_base {record['R_base']:.3f} ({generator_base}'s samples), "
                  f"R_win {record['R_win']:.3f} (the winners, SFT's asymptote), R_ceil {record['R_ceil']:.3f} (clean samples). "
                  "A model above R_win went beyond its winners.")
    print("\n" + table)
    atomic_write_text(out / "results.md", table + "\n")
    # Same prompts and seeds in every row.
    rows = {name: showcase(eval_cfg, shown[name]) for name in results}
    captions = next(iter(rows.values()))[1]
    # Each cell's exact reward under it: a change that is hard to see (a clip that stops shaking) is read there.
    notes = [[f"reward {reward:.2f}" for reward in showcase_rewards(eval_cfg, results[name])] for name in results]
    if world.clips:
        grid = save_animation(clip_grid([row for row, _ in rows.values()], list(rows), captions, notes=notes), out / "grid.gif")
    else:
        grid = save_image(image_grid([row for row, _ in rows.values()], list(rows), captions, notes=notes), out / "grid.png")
    runs = {method: [Path(cfg.output_dir)] for method, cfg in configs.items()}
    plot_panels([(*REWARD_PANEL, reward_series(runs)), (*SSR_PANEL, ssr_series(runs))], out / "training.png")
    timings["total"] = time.time() - started
    levels = {key: record[key] for key in ("R_base", "R_win", "R_ceil")} if record else {}
    atomic_write_json(out / "results.json", {"results": results, "data_level": level, **levels, "seconds": timings})
    print(f"\nwrote {out}/results.md, {grid.name}, training.png in {timings['total']:.0f} s with {jobs} run(s) at a time: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results
