"""``sspo demo``: the shapes world end to end on a CPU.

base model (cached) -> SFT and SSPO fine-tunes on the world's winners, same data and budget ->
exact evaluation of base, SFT and SSPO on seen and held-out prompts -> a table, an image grid
(same prompts and seeds, one row per model) and a plot of reward and SSR rate over training.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import apply_overrides, from_dict, load_yaml
from .evaluate import EvalConfig, evaluate_model, format_table, write_results
from .io import atomic_path, atomic_write_text
from .sample import generate, image_grid, save_png
from .train_config import TrainConfig
from .trainer import resolve_model, train

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo-shapes.yaml"


def demo_config(out: Path, method: str, quick: bool) -> TrainConfig:
    data = load_yaml(DEMO_CONFIG)
    overrides = [f"method={method}", f"output_dir={out / method}"]
    if quick:
        overrides += ["model.pretrained=shapes-base:quick", "iterations=2", "steps_per_iteration=2", "validation.prompts_per_split=2", "data.world_pairs_per_prompt=1"]
    return from_dict(TrainConfig, apply_overrides(data, overrides))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_training(runs: dict[str, Path], path: Path) -> None:
    """Held-out and seen reward (validation) and SSR rate (per step) over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_ssr) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        validation = read_jsonl(run / "validation.jsonl")
        for split, style in (("heldout", "-"), ("seen", ":")):
            points = [(v["step"], v[f"reward_{split}"]) for v in validation if f"reward_{split}" in v]
            if points:
                ax_reward.plot(*zip(*points), style, marker="o", label=f"{name} ({split})")
        steps = [m for m in read_jsonl(run / "metrics.jsonl") if "ssr_rate" in m]
        if steps:
            ax_ssr.plot([m["step"] for m in steps], [m["ssr_rate"] for m in steps], label=name)
    ax_reward.set(xlabel="optimizer step", ylabel="exact reward", title="reward during training")
    ax_ssr.set(xlabel="optimizer step", ylabel="SSR rate", title="SSR rate (share of K = +1)", ylim=(0, 1))
    for ax in (ax_reward, ax_ssr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    out = Path(out)
    started = time.time()
    timings = {}
    base = resolve_model("shapes-base:quick" if quick else "shapes-base")
    timings["base"] = time.time() - started

    models: dict[str, tuple[str, str | None]] = {"base": (base, None)}
    runs = {}
    for method in ("sft", "sspo"):
        t0 = time.time()
        cfg = demo_config(out, method, quick)
        models[method] = (base, str(train(cfg)))
        runs[method] = Path(cfg.output_dir)
        timings[method] = time.time() - t0

    t0 = time.time()
    eval_cfg = EvalConfig(prompts_per_split=4 if quick else 24)
    results, images = {}, {}
    for name, (model, lora) in models.items():
        results[name], images[name] = evaluate_model(model, eval_cfg, lora=lora)
    timings["eval"] = time.time() - t0

    table = format_table(results)
    print("\n" + table)
    write_results({"results": results, "seconds": timings}, out / "results.json")
    atomic_write_text(out / "results.md", table + "\n")
    # Same prompts and seeds in every row: the first seed of 4 seen and 4 held-out prompts.
    n_seeds = len(eval_cfg.seeds)
    per_split = eval_cfg.prompts_per_split * n_seeds
    picks = [i * n_seeds for i in range(4)] + [per_split + i * n_seeds for i in range(4)]
    from .evaluate import shapes_eval_items

    items = shapes_eval_items(eval_cfg)
    captions = [f"[{items[i][0]}] {items[i][1].prompt}" for i in picks]
    save_png(image_grid([[images[name][i] for i in picks] for name in models], list(models), captions), out / "grid.png")
    plot_training(runs, out / "training.png")
    timings["total"] = time.time() - started
    print(f"\nwrote {out}/results.md, grid.png, training.png in {timings['total']:.0f} s " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return results
