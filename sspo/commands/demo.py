"""``sspo demo [--video]``: the shapes world (or the moving-shapes world) end to end on a CPU.

base model (shipped or cached) -> SFT and SSPO fine-tunes on the world's winners (images: also
Diffusion-DPO on its pairs), same budget -> exact evaluation of every model on seen and held-out
prompts -> a table with each model's paired reward gain over the base (95% CI), a grid (same
prompts and seeds, one row per model; a GIF for clips) and a plot of reward and SSR rate over training.
"""

from __future__ import annotations

from sspo.paths import CONFIGS

import dataclasses
import logging
import time
from pathlib import Path

from sspo.config import load_config
from sspo.evaluation.evaluate import MOTION_TABLE_COLUMNS, TABLE_COLUMNS, EvalConfig, evaluate_model, format_table, showcase
from sspo.io import atomic_write_json, atomic_write_text
from sspo.evaluation.plots import REWARD_PANEL, SSR_PANEL, plot_panels, reward_series, ssr_series
from sspo.evaluation.sampling import clip_grid, image_grid, save_animation, save_png
from sspo.training.config import TrainConfig
from sspo.worlds.names import resolve_model
from sspo.training.trainer import train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class World:
    config: Path
    base: str
    methods: tuple[str, ...]
    eval_cfg: EvalConfig
    columns: tuple[str, ...]


# Images: 96 prompts x 2 seeds per split, since paired gains of ~0.02 need that many for a CI
# excluding zero. Clips: 48 x 2, sampled as the video demo's negatives (10 steps), for its time budget.
WORLDS = {
    "image": World(CONFIGS / "demo-shapes.yaml", "shapes-base", ("sft", "dpo", "sspo"), EvalConfig(prompts_per_split=96), TABLE_COLUMNS),
    "video": World(CONFIGS / "demo-motion.yaml", "shapes-video-base", ("sft", "sspo"), EvalConfig(prompts="motion", prompts_per_split=48, steps=10), MOTION_TABLE_COLUMNS),
}


def demo_config(out: Path, method: str, quick: bool, world: World = WORLDS["image"]) -> TrainConfig:
    overrides = [f"method={method}", f"output_dir={out / method}"]
    if quick:
        overrides += [f"model.pretrained={world.base}:quick", "iterations=2", "steps_per_iteration=2", "validation.prompts_per_split=2", "data.world_pairs_per_prompt=1"]
    return load_config(TrainConfig, world.config, overrides)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, video: bool = False) -> dict:
    import torch

    # The demo's models are tiny: intra-op threads gain little, and on a small shared CPU their
    # spinning against other processes slows training steps ~50x (0.3 s -> 17 s on 2 cores).
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    out = Path(out)
    world = WORLDS["video" if video else "image"]
    started = time.time()
    timings = {}
    base = resolve_model(f"{world.base}:quick" if quick else world.base)
    timings["base"] = time.time() - started

    models: dict[str, tuple[str, str | None]] = {"base": (base, None)}
    runs = {}
    # SFT (and, for images, Diffusion-DPO on the world's clean-vs-defective pairs) show that
    # training moves the base at all; SSPO is the method itself, trained on the winners only.
    for method in world.methods:
        t0 = time.time()
        cfg = demo_config(out, method, quick, world)
        models[method] = (base, str(train(cfg)))
        runs[method] = Path(cfg.output_dir)
        timings[method] = time.time() - t0

    t0 = time.time()
    eval_cfg = dataclasses.replace(world.eval_cfg, prompts_per_split=4) if quick else world.eval_cfg
    results, images = {}, {}
    for name, (model, lora) in models.items():
        results[name], images[name] = evaluate_model(model, eval_cfg, lora=lora)
    timings["eval"] = time.time() - t0

    table = format_table(results, world.columns, baseline="base")
    print("\n" + table)
    atomic_write_text(out / "results.md", table + "\n")
    # Same prompts and seeds in every row.
    rows = {name: showcase(eval_cfg, images[name]) for name in models}
    captions = next(iter(rows.values()))[1]
    if video:
        grid = save_animation(clip_grid([row for row, _ in rows.values()], list(rows), captions), out / "grid.gif")
    else:
        grid = save_png(image_grid([row for row, _ in rows.values()], list(rows), captions), out / "grid.png")
    runs = {name: [path] for name, path in runs.items()}
    plot_panels([(*REWARD_PANEL, reward_series(runs)), (*SSR_PANEL, ssr_series(runs))], out / "training.png")
    timings["total"] = time.time() - started
    atomic_write_json(out / "results.json", {"results": results, "seconds": timings})
    print(f"\nwrote {out}/results.md, {grid.name}, training.png in {timings['total']:.0f} s " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results
