"""``sspo demo [--world NAME]``: a world (default: shapes) end to end on a CPU.

base model (shipped or cached) -> the world's demo arms (SFT and SSPO on its winners; for shapes
also Diffusion-DPO on its pairs), same budget -> exact evaluation of every model on seen and held-out
prompts -> a table with each model's paired reward gain over the base (95% CI), a grid (same
prompts and seeds, one row per model; a GIF for clips) and a plot of reward and SSR rate over training.
What a world's demo runs is its registry entry's ``demo`` (sspo/worlds/registry.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sspo.config import load_config
from sspo.evaluation.evaluate import EvalConfig, evaluate_model, format_table, showcase, table_columns
from sspo.evaluation.plots import REWARD_PANEL, SSR_PANEL, plot_panels, reward_series, ssr_series
from sspo.evaluation.sampling import clip_grid, image_grid, save_animation, save_png
from sspo.io import atomic_write_json, atomic_write_text
from sspo.training.config import TrainConfig
from sspo.training.trainer import train
from sspo.worlds import World, get_world
from sspo.worlds.names import resolve_model

log = logging.getLogger(__name__)

QUICK = ["iterations=2", "steps_per_iteration=2", "validation.prompts_per_split=2", "data.world_pairs_per_prompt=1"]


def demo_base(world: World, quick: bool) -> str:
    """The base the demo trains from: the world's, at its quick preset with ``quick``."""
    return f"{world.base}:quick" if quick and "quick" in world.base_presets else world.base


def demo_config(out: Path, method: str, quick: bool, world: World) -> TrainConfig:
    overrides = [f"method={method}", f"output_dir={out / method}"]
    if quick:
        overrides += [f"model.pretrained={demo_base(world, quick)}", *QUICK]
    return load_config(TrainConfig, world.demo.config, overrides)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, world: str = "shapes") -> dict:
    import torch

    # The demo's models are tiny: intra-op threads gain little, and on a small shared CPU their
    # spinning against other processes slows training steps ~50x (0.3 s -> 17 s on 2 cores).
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    out = Path(out)
    world = get_world(world, "--world")
    started = time.time()
    timings = {}
    base = resolve_model(demo_base(world, quick))
    timings["base"] = time.time() - started

    models: dict[str, tuple[str, str | None]] = {"base": (base, None)}
    runs = {}
    # SFT (and Diffusion-DPO on the world's clean-vs-defective pairs, where a world's demo has it)
    # show that training moves the base at all; SSPO is the method itself, trained on the winners only.
    for method in world.demo.methods:
        t0 = time.time()
        cfg = demo_config(out, method, quick, world)
        models[method] = (base, str(train(cfg)))
        runs[method] = Path(cfg.output_dir)
        timings[method] = time.time() - t0

    t0 = time.time()
    eval_cfg = EvalConfig(prompts=world.name, prompts_per_split=4 if quick else world.demo.prompts_per_split, steps=world.demo.sampler_steps)
    results, images = {}, {}
    for name, (model, lora) in models.items():
        results[name], images[name] = evaluate_model(model, eval_cfg, lora=lora)
    timings["eval"] = time.time() - t0

    table = format_table(results, table_columns(world.name), baseline="base")
    print("\n" + table)
    atomic_write_text(out / "results.md", table + "\n")
    # Same prompts and seeds in every row.
    rows = {name: showcase(eval_cfg, images[name]) for name in models}
    captions = next(iter(rows.values()))[1]
    if world.clips:
        grid = save_animation(clip_grid([row for row, _ in rows.values()], list(rows), captions), out / "grid.gif")
    else:
        grid = save_png(image_grid([row for row, _ in rows.values()], list(rows), captions), out / "grid.png")
    runs = {name: [path] for name, path in runs.items()}
    plot_panels([(*REWARD_PANEL, reward_series(runs)), (*SSR_PANEL, ssr_series(runs))], out / "training.png")
    timings["total"] = time.time() - started
    atomic_write_json(out / "results.json", {"results": results, "seconds": timings})
    print(f"\nwrote {out}/results.md, {grid.name}, training.png in {timings['total']:.0f} s " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results
