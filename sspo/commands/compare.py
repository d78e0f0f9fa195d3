"""``sspo compare``: every method and ablation with the same data and budget (Tables 1 and 6).

The protocol (docs/results/README.md):

1. **Settings per arm, on a validation split.** With ``--grid KEY=V1,V2,...`` every trained arm is
   run per combination of the grid (``beta`` only for arms with a reference) and per selection seed
   (``--selection-seeds N``, mean reward; default 2: training seeds 1000, 1001, ..., none of them a
   seed of step 2, whose runs would otherwise share the luck the choice picked), on the world's
   alignment data *without* its validation combinations, and scored on those validation
   combinations (prompt set ``<world>-validation``); the best combination is that arm's setting.
   Held-out combinations are never looked at while choosing.
2. **Seeds at the chosen settings**, every arm with the same budget (optimizer steps, batch,
   iterations), evaluated on held-out and seen combinations.
3. **Tables with 95% CIs** over training seeds and prompts, and paired differences SSPO - each arm
   (same training seed, prompt and sampler seed), and which of the paper's claims the CIs decide.

Finished runs are reused and killed ones resumed, so the command can be re-run; a run's folder names
its arm, settings and seed, so a re-run with a wider grid trains an arm anew where its choice moved,
and a finished run trained or evaluated otherwise than asked (another override, scale or prompt
count) is refused (:func:`check_reusable`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sspo.commands.parallel import run_all
from sspo.config import allowed, field_type, load_config, load_yaml, section_type
from sspo.errors import ConfigError
from sspo.evaluation.evaluate import EvalConfig, eval_items, evaluate_model, showcase, table_columns
from sspo.evaluation.plots import REWARD_PANEL, SSR_PANEL, plot_panels, reward_series, ssr_series
from sspo.evaluation.sampling import image_grid, save_image
from sspo.evaluation.scorers.stats import MIN_DECIDING_RUNS, interval, mean_ci_crossed
from sspo.io import atomic_write_json, atomic_write_text, claimed_output_folder, read_json
from sspo.training.config import TrainConfig, resolved
from sspo.training.methods import METHODS, Method
from sspo.training.run_state import config_differences
from sspo.training.trainer import latest_state, train
from sspo.worlds import get_world
from sspo.worlds.names import resolve_model

log = logging.getLogger(__name__)

# SSPO's variants: SSPOr (random side of each pair as winner) and the Table 6 ablations.
VARIANTS: dict[str, list[str]] = {
    "sspo_r": ["method=sspo", "data.mode=random"],
    "ssr_off": ["method=sspo", "ssr=off"],
    "indicator": ["method=sspo", "ssr=indicator"],
    "erd_initial": ["method=sspo", "erd=initial"],
    "erd_last": ["method=sspo", "erd=last"],
    # K decided by the mean errors of 8 (t, eps) draws instead of the loss's own one: a less noisy switch.
    "ssr_draws_8": ["method=sspo", "ssr_draws=8"],
}
ABLATIONS = ("ssr_off", "indicator", "erd_initial", "erd_last")
TABLE6 = tuple(name for name in VARIANTS if name != "sspo_r")  # the paper's ablations and ours
PREFERENCE_ONLY_KEYS = ("beta",)  # grid keys searched only for arms with a reference model
# The paper's claims the comparison can decide: (arm, what the paper reports for SSPO - arm).
CLAIMS = (("sft", "higher"), ("dpo", "higher"), ("spin", "higher"), ("ssr_off", "higher"), ("erd_initial", "higher"),
          ("erd_last", "higher"), ("indicator", "about equal"), ("sspo_r", "higher"), ("base", "higher"))


def arms() -> dict[str, list[str]]:
    """Arm -> overrides: the untrained base, every method of the table (sspo/training/methods.py), SSPO's variants."""
    return {"base": [], **{name: [f"method={name}"] for name in METHODS}, **VARIANTS}


def table1() -> tuple[str, ...]:
    return ("base", *METHODS, "sspo_r")


SELECTION_SEED_START = 1000
SHOWCASE_CELL = 96
OUTPUTS = ("runs", "select", "results.md", "results.json", "figure9_reward.png", "figure4_ssr_rate.png", "grid.png")
QUICK = ["iterations=2", "steps_per_iteration=3", "validation.prompts_per_split=4", "negatives.steps=5"]


def arm_config(config: str | Path, arm: str, seed: int, run_dir: Path, extra: Sequence[str]) -> TrainConfig:
    overrides = [*extra, *arms()[arm], f"seed={seed}", f"output_dir={run_dir}", "validation.every_iterations=1", "validation.world_eval=true"]
    return load_config(TrainConfig, config, overrides)


def arm_method(arm: str) -> Method:
    """The method an arm trains (its ``method=`` override)."""
    return METHODS[next(o.partition("=")[2] for o in arms()[arm] if o.startswith("method="))]


def run_arm(config, arm: str, seed: int, run_dir: Path, extra: Sequence[str], eval_cfg: EvalConfig) -> dict:
    """Train (or reuse / resume) one arm for one seed and evaluate it; cached in ``eval.json``. A
    finished run is reused as it is: :func:`check_finished_runs` checked its settings before any run."""
    cfg = arm_config(config, arm, seed, run_dir, extra)
    cached = run_dir / "eval.json"
    summary = read_json(cached, what="the arm's cached evaluation", fix="it is evaluated again", default=None, cache=True)
    if summary is not None:
        summary.pop("settings", None)
        return summary
    log.info("arm %s, seed %d: %s", arm, seed, run_dir)
    base = resolve_model(cfg.model.pretrained)
    if arm == "base":
        model, lora = base, None
    else:
        final = train(cfg, resume=latest_state(run_dir) is not None)
        model, lora = (base, final) if cfg.model.lora else (final, None)
    summary, images = evaluate_model(model, eval_cfg, lora=lora)
    run_dir.mkdir(parents=True, exist_ok=True)
    shown = showcase(eval_cfg, images)[0]
    if isinstance(shown[0], np.ndarray):  # clips: their middle frames
        shown = [Image.fromarray(clip[len(clip) // 2]) for clip in shown]
    save_image(image_grid([shown], cell=SHOWCASE_CELL), run_dir / "showcase.png")
    atomic_write_json(cached, summary | {"settings": reuse_settings(arm, cfg, eval_cfg)})
    return summary


def reuse_settings(arm: str, cfg: TrainConfig, eval_cfg: EvalConfig) -> dict:
    """What a run's cached scores (``eval.json``) record beside its config.yaml: how it was evaluated,
    and for the untrained base (which has no config.yaml) its model."""
    settings = {"evaluation": json.loads(json.dumps(dataclasses.asdict(eval_cfg)))}
    if arm == "base":
        settings["model"] = {"pretrained": cfg.model.pretrained, "revision": cfg.model.revision, "variant": cfg.model.variant}
    return settings


def check_finished_runs(config, runs: Sequence[tuple[str, int, Path, Sequence[str]]], eval_cfg: EvalConfig) -> None:
    """Before any run starts: the finished ones among ``runs`` (arm, seed, folder, overrides) that
    this comparison would reuse must be of its settings, all of them named at once if not."""
    found = []
    for arm, seed, run_dir, extra in runs:
        summary = read_json(run_dir / "eval.json", what="the arm's cached evaluation", fix="it is evaluated again", default=None, cache=True)
        if summary is not None:
            cfg = arm_config(config, arm, seed, run_dir, extra)
            found.append((run_dir, reuse_differences(run_dir, cfg if arm != "base" else None, summary.get("settings"), reuse_settings(arm, cfg, eval_cfg))))
    check_reusable(found)


def check_reusable(runs: Sequence[tuple[Path, list[str]]]) -> None:
    """Refuse finished runs (folder, :func:`reuse_differences`) of other settings, never reported as this comparison's."""
    other = [(run_dir, differences) for run_dir, differences in runs if differences]
    if len(other) == 1:
        run_dir, differences = other[0]
        raise ConfigError(f"{run_dir} holds a finished run of other settings ({'; '.join(differences)}); "
                          f"use another --out, or delete {run_dir} to run it again")
    if other:
        listed = "; ".join(f"{run_dir} ({', '.join(differences)})" for run_dir, differences in other)
        raise ConfigError(f"{len(other)} finished runs in --out are of other settings: {listed}; use another --out, or delete those folders to run them again")


def reuse_differences(run_dir: Path, cfg: TrainConfig | None, saved: dict | None, settings: dict) -> list[str]:
    """How a finished run differs from what this comparison asks: how it was trained (``cfg``; None
    for the untrained base) and evaluated (``settings``, against the ``saved`` ones)."""
    differences = []
    if cfg is not None and (run_dir / "config.yaml").is_file():
        trained, wanted = load_yaml(run_dir / "config.yaml"), dataclasses.asdict(resolved(cfg))
        differences += config_differences(trained, wanted, dataclasses.asdict(TrainConfig()))
        # The resume check lets iterations change (a resumed run may be extended); a finished run's result depends on them.
        differences += [f"{key}: {trained.get(key)!r} -> {wanted[key]!r}" for key in ("iterations",) if trained.get(key) != wanted[key]]
    if saved is None:
        differences.append("evaluation settings: not recorded")
    else:
        differences += [f"evaluation {key}: {saved['evaluation'].get(key)!r} -> {value!r}"
                        for key, value in settings["evaluation"].items() if saved["evaluation"].get(key) != value]
        differences += [f"model.{key}: {(saved.get('model') or {}).get(key)!r} -> {value!r}"
                        for key, value in settings.get("model", {}).items() if (saved.get("model") or {}).get(key) != value]
    return differences


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["optim.learning_rate=3e-4,1e-3", "beta=500,5000", "sft:optim.learning_rate=1e-3,1e-2"]`` ->
    ``{key: [values]}``; an ``ARM:`` prefix gives that arm its own values of the key (a grid widened
    past one arm's edge)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. optim.learning_rate=3e-4,1e-3 (or ARM:KEY=... for one arm)")
        arm, colon, _ = key.rpartition(":")
        if colon and arm not in arms():
            raise ConfigError(f"--grid {item!r}: unknown arm {arm!r}; expected one of {', '.join(arms())}")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; give all its values in one --grid {key}=V1,V2,...")
        grid[key] = [v for v in values.split(",") if v]
    return grid


def grid_points(grid: dict[str, list[str]], arm: str) -> list[list[str]]:
    """Every combination of the grid's values that applies to ``arm`` (its own ``ARM:KEY`` values
    where given), as overrides."""
    values = {k: v for k, v in grid.items() if ":" not in k} | {k.partition(":")[2]: v for k, v in grid.items() if k.partition(":")[0] == arm}
    keys = [k for k in values if k not in PREFERENCE_ONLY_KEYS or arm_method(arm).uses_reference]
    return [[f"{k}={v}" for k, v in zip(keys, point)] for point in itertools.product(*(values[k] for k in keys))]


def parse_points(items: Sequence[str], grid: dict[str, list[str]]) -> dict[str, list[list[str]]]:
    """``["sspo:optim.learning_rate=1e-4,beta=5"]`` -> ``{arm: [overrides]}``: single points added to
    an arm's grid (one step past the edge its best point sits on), keys in the grid's order."""
    added: dict[str, list[list[str]]] = {}
    for item in items:
        arm, colon, rest = item.partition(":")
        settings = dict(pair.partition("=")[::2] for pair in rest.split(",") if pair)
        if not colon or arm not in arms() or not settings or not all(settings.values()):
            raise ConfigError(f"--add-point {item!r}: expected ARM:KEY=V,KEY=V with an arm of {', '.join(arms())}, "
                              "e.g. sspo:optim.learning_rate=1e-4,beta=5")
        keys = [override.partition("=")[0] for override in grid_points(grid, arm)[0]]
        if sorted(settings) != sorted(keys):
            raise ConfigError(f"--add-point {item!r}: a point of {arm}'s grid sets {', '.join(keys) or 'nothing'}; give each of them once")
        added.setdefault(arm, []).append([f"{key}={settings[key]}" for key in keys])
    return added


def run_name(arm: str, overrides: Sequence[str], seed: int) -> str:
    """A run's folder name: its arm, settings and seed, so that a changed setting (a wider grid
    choosing another point) trains anew instead of reusing a run trained at the old one."""
    name = "-".join([arm, *overrides, f"seed{seed}"])
    if "/" in name or ".." in name or "\0" in name:  # a name that would lead out of --out/runs, or that no file system takes
        raise ConfigError(f"the run folder name {name!r} (arm {arm}'s settings) holds '/', '..' or a NUL byte; give settings whose values hold none of them")
    return name


def arm_points(names: Sequence[str], grid: dict[str, list[str]], added: dict[str, list[list[str]]] | None = None) -> dict[str, list[list[str]]]:
    """Each arm's grid points (lists of overrides) with its ``added`` ones; an arm of one point chooses nothing."""
    points = {arm: grid_points(grid, arm) if arm != "base" else [[]] for arm in names}
    for arm, extra_points in (added or {}).items():
        if arm in points:
            points[arm] += [point for point in extra_points if point not in points[arm]]
    return points


def select_settings(config, names: Sequence[str], grid: dict[str, list[str]], seeds: Sequence[int], out: Path, extra: Sequence[str], eval_cfg: EvalConfig,
                    jobs: int = 1, added: dict[str, list[list[str]]] | None = None, widen: int = 0) -> dict[str, dict]:
    """Each trained arm's best grid point (or ``added`` point) by exact reward on the validation
    combinations, averaged over training ``seeds`` (one seed can make an unstable setting look best);
    up to ``widen`` times, a best point on its grid's edge gets the points one step past it
    (:func:`points_past_edges`) and the choice is made again."""
    points = arm_points(names, grid, added)
    check_arm_configs(config, [(arm, point) for arm in names for point in points[arm]], out, extra)
    rewards: dict[tuple, float] = {}
    round_ = 0
    while True:
        searched = [(arm, point, seed) for arm in names if len(points[arm]) > 1 for point in points[arm] for seed in seeds
                    if (arm, tuple(point), seed) not in rewards]
        runs = [(arm, seed, out / "select" / run_name(arm, point, seed), [*extra, *point, "data.world_without_validation=true"]) for arm, point, seed in searched]
        check_finished_runs(config, runs, eval_cfg)
        tasks = [functools.partial(run_arm, config, *run, eval_cfg) for run in runs]
        if tasks and not round_:
            log.info("choosing settings: %d runs (%s)", len(tasks), ", ".join(f"{arm} x {len(points[arm]) * len(seeds)}" for arm in names if len(points[arm]) > 1))
        rewards |= {(arm, tuple(point), seed): summary["validation"][eval_cfg.metric_names[0]]
                    for (arm, point, seed), summary in zip(searched, run_all(tasks, jobs, "choosing settings" if not round_ else f"widening the grids ({round_} of {widen})"))}
        chosen = _best_points(names, points, seeds, rewards)
        wider = {arm: new for arm in names if (new := [p for p in points_past_edges(chosen[arm]) if p not in points[arm]])}
        if not wider or round_ == widen:
            return chosen
        check_arm_configs(config, [(arm, point) for arm, new in wider.items() for point in new], out, extra)
        for arm, new in wider.items():
            log.info("%s's choice %s sits on its grid's edge: adding %s", arm, " ".join(chosen[arm]["overrides"]), "; ".join(" ".join(p) for p in new))
            points[arm] += new
        round_ += 1


def _best_points(names: Sequence[str], points: dict[str, list[list[str]]], seeds: Sequence[int], rewards: dict[tuple, float]) -> dict[str, dict]:
    chosen = {}
    for arm in names:
        if len(points[arm]) == 1:
            chosen[arm] = {"overrides": points[arm][0], "grid": []}
            continue
        rows = []
        for point in points[arm]:
            per_seed = [rewards[arm, tuple(point), seed] for seed in seeds]
            rows.append({"overrides": point, "validation_reward": sum(per_seed) / len(per_seed), "per_seed": per_seed})
        best = max(rows, key=lambda row: row["validation_reward"])  # the first of equals
        chosen[arm] = {"overrides": best["overrides"], "grid": rows}
    return chosen


def selection_seed_list(count: int) -> list[int]:
    """The training seeds that choose settings: apart from the seeds of the runs reported (0, 1, ...),
    since a run of the same seed shares its initial weights and draws, and so the luck the choice picked."""
    return list(range(SELECTION_SEED_START, SELECTION_SEED_START + count))


def check_arm_configs(config, settings: Sequence[tuple[str, Sequence[str]]], out: Path, extra: Sequence[str]) -> None:
    """Loads every (arm, overrides) config before any run starts: a bad value in --grid, --add-point or
    an earlier comparison's settings is one error at once, not one after the first runs."""
    for arm, overrides in settings:
        arm_config(config, arm, 0, out / "runs" / run_name(arm, overrides, 0), [*extra, *overrides])


def chosen_setting(key: str) -> bool:
    """Whether ``key`` is a TrainConfig setting of the kind a grid chooses: a number, true/false or one
    of fixed choices. An earlier comparison's results.json may come from anyone: a path, a name or a
    section set from it could point a run at a user's files (``data.cache_dir``, ``output_dir``)."""
    *sections, name = key.split(".")
    section = section_type(TrainConfig, sections)
    fields = {f.name: f for f in dataclasses.fields(section)} if section is not None else {}
    if name not in fields:
        return False
    item_type, _, is_list = field_type(section, name)
    rule = allowed(fields[name])
    return not is_list and (item_type in (int, float, bool) or rule is not None and rule.choices is not None)


def settings_from(path: str | Path, names: Sequence[str]) -> dict[str, dict]:
    """Each arm's settings as an earlier comparison chose them (its ``results.json``, or the folder holding it)."""
    path = Path(path) / "results.json" if Path(path).is_dir() else path
    earlier = read_json(path, what="the earlier comparison", fix="give the results.json that sspo compare wrote", shape={"chosen": {str: {"overrides": [str]}}})
    missing = [arm for arm in names if arm not in earlier["chosen"] and arm != "base"]  # the untrained base has no settings
    if missing:
        raise ConfigError(f"--settings-from {path}: arm {missing[0]!r} was not in that comparison (it has {', '.join(earlier['chosen'])}); "
                          "leave the arm out or choose its settings with --grid")
    for arm in names:
        for override in earlier["chosen"][arm]["overrides"] if arm != "base" else []:
            key = override.partition("=")[0].strip()
            if not chosen_setting(key):
                raise ConfigError(f"--settings-from {path}: arm {arm!r}'s settings set {key!r}, which is not a setting a comparison chooses "
                                  "(a number, true/false or one of fixed choices; never a path, a name or a section); "
                                  "remove it from that file, or choose the arm's settings with --grid")
    return {arm: {"overrides": earlier["chosen"][arm]["overrides"] if arm != "base" else [], "grid": [], "from": str(path)} for arm in names}


def reward_matrix(runs: list[dict], split: str, sampler_seeds: int, n_seeds: int = 1) -> list[list[float]]:
    """Rewards ``[training seeds][prompts]`` of an arm, each prompt averaged over its sampler seeds
    (images are listed prompt by prompt); ``n_seeds``: repeat a single evaluation (the untrained base)
    to pair it with every training seed of another arm."""
    rows = []
    for run in runs:
        images = run[split]["per_image"]
        rows.append([sum(images[i : i + sampler_seeds]) / sampler_seeds for i in range(0, len(images), sampler_seeds)])
    return rows * n_seeds if len(rows) == 1 else rows


def paired_table(results: dict[str, list[dict]], arm: str, split: str, sampler_seeds: int, n_seeds: int) -> list[list[float]]:
    """SSPO - arm, per training seed and prompt."""
    sspo, other = reward_matrix(results["sspo"], split, sampler_seeds, n_seeds), reward_matrix(results[arm], split, sampler_seeds, n_seeds)
    return [[a - b for a, b in zip(x, y)] for x, y in zip(sspo, other)]


def paired_difference(results: dict[str, list[dict]], arm: str, split: str, sampler_seeds: int, n_seeds: int) -> dict:
    """Mean and 95% CI of SSPO - arm over training seeds and prompts."""
    return mean_ci_crossed(paired_table(results, arm, split, sampler_seeds, n_seeds))


def table(results: dict[str, list[dict]], names: Sequence[str], split: str, sampler_seeds: int, n_seeds: int, world: str) -> str:
    columns = table_columns(world)[1:]
    lines = ["| arm | reward [95% CI] | " + " | ".join(c.partition(".")[2] for c in columns) + " | SSPO - arm [95% CI] |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for arm in names:
        if arm not in results:
            continue
        runs = results[arm]
        cells = [f"{sum(run[split][c] for run in runs) / len(runs):.3f}" for c in columns]
        diff = "" if "sspo" not in results or arm == "sspo" else interval(paired_difference(results, arm, split, sampler_seeds, n_seeds))
        lines.append(f"| {arm} | {interval(mean_ci_crossed(reward_matrix(runs, split, sampler_seeds)))} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def claims(results: dict[str, list[dict]], sampler_seeds: int, n_seeds: int) -> list[dict]:
    """Each paper claim SSPO - arm on held-out prompts, decided by the 95% CI of the paired difference."""
    found = []
    for arm, paper in CLAIMS:
        if arm not in results or "sspo" not in results:
            continue
        diff = paired_difference(results, arm, "heldout", sampler_seeds, n_seeds)
        found.append({"arm": arm, "paper": paper, "difference": diff, "verdict": decide(diff, paper)})
    return found


def decide(diff: dict, paper: str) -> str:
    """What the 95% CI of SSPO - arm (``diff``, as :func:`mean_ci_crossed` gives it) decides about the
    paper's claim ``paper`` ("higher", "about equal")."""
    if diff["runs"] < MIN_DECIDING_RUNS:
        seeds = f"{diff['runs']} training seed{'s are' if diff['runs'] > 1 else ' is'}"
        return f"undecided ({seeds} too few to decide: train {MIN_DECIDING_RUNS} or more)"
    if diff["ci95_low"] > 0 or diff["ci95_high"] < 0:
        return "SSPO higher" if diff["ci95_low"] > 0 else "SSPO lower"
    if paper == "about equal":  # an interval holding 0 is no tie: it bounds how unequal the two may be
        return f"undecided (CI includes 0; a difference up to {max(-diff['ci95_low'], diff['ci95_high']):.3f} is not ruled out)"
    return "undecided (CI includes 0)"


def grid_edges(choice: dict) -> list[str]:
    """The chosen settings of an arm (``{"overrides", "grid"}``) on their grid's edge along the axis
    through the choice (the grid points with every other key as chosen), for keys the grid searched
    over several numbers: the highest or lowest tried there, or the only value tried there."""
    return [f"{key}={value} (the {side} tried)" if side != "only" else f"{key}={value} (the only value tried with the other settings as chosen)"
            for key, value, side, _ in _edge_axes(choice)]


def points_past_edges(choice: dict) -> list[list[str]]:
    """The grid points one step past each edge :func:`grid_edges` names, the other keys as chosen: the
    nearest value the grid tried beyond the choice elsewhere, else the grid's spacing continued (on
    its values' leading digits: 1e-3 after 1e-4, 3e-4; 50000 after 500, 5000)."""
    overrides = [o.partition("=")[::2] for o in choice["overrides"]]
    points = []
    for key, value, side, tried in _edge_axes(choice):
        for direction in {"lowest": (-1,), "highest": (1,), "only": (-1, 1)}[side]:
            past = _step_past(value, direction, tried)
            point = [f"{k}={past if k == key else v}" for k, v in overrides]
            if point not in points:
                points.append(point)
    return points


def _edge_axes(choice: dict) -> list[tuple[str, str, str, list[str]]]:
    """(key, chosen value, "lowest" | "highest" | "only", the key's values anywhere in the grid) for
    each number key of the choice on its grid's edge (see :func:`grid_edges`)."""
    chosen = dict(o.partition("=")[::2] for o in choice["overrides"])
    rows = [dict(o.partition("=")[::2] for o in row["overrides"]) for row in choice["grid"]]

    def numbers(points: list[dict], key: str) -> set[float]:
        found = set()
        for point in points:
            with contextlib.suppress(KeyError, ValueError):
                found.add(float(point[key]))
        return found

    def same(a: str | None, b: str) -> bool:
        try:
            return a is not None and float(a) == float(b)
        except ValueError:
            return a == b

    edges = []
    for key, value in chosen.items():
        try:
            number = float(value)
        except ValueError:
            continue
        if len(numbers(rows, key)) < 2:
            continue  # not searched
        tried = list(dict.fromkeys(row[key] for row in rows if key in row))
        axis = numbers([row for row in rows if all(same(row.get(k), v) for k, v in chosen.items() if k != key)], key)
        if len(axis) < 2:
            edges.append((key, value, "only", tried))
        elif number in (min(axis), max(axis)):
            edges.append((key, value, "lowest" if number == min(axis) else "highest", tried))
    return edges


def _step_past(value: str, direction: int, tried: list[str]) -> str:
    """The value one step past ``value`` (``direction`` 1: above, -1: below), written as ``tried`` is."""
    number = float(value)
    written = {}
    for text in tried:
        with contextlib.suppress(ValueError):
            written.setdefault(float(text), text)
    if beyond := [x for x in written if (x - number) * direction > 0]:
        return written[min(beyond, key=lambda x: abs(x - number))]
    neighbour = min((x for x in written if x != number), key=lambda x: abs(x - number))  # a searched key has another value
    if number <= 0 or neighbour <= 0:  # no ratio to continue: the same difference again
        return f"{number + direction * abs(number - neighbour):g}"
    target = math.log10(number) + direction * abs(math.log10(number / neighbour))
    leading = {round(x / 10 ** math.floor(math.log10(x)), 6) for x in written if x > 0}
    candidates = [(m, e) for m in leading for e in range(math.floor(target) - 1, math.floor(target) + 2)
                  if (m * 10.0**e - number) * direction > 0 and not math.isclose(m * 10.0**e, number)]
    m, e = min(candidates, key=lambda c: abs(math.log10(c[0] * 10.0**c[1]) - target))
    return f"{m:g}e{e}" if any("e" in text.lower() for text in tried) else f"{m * 10.0**e:g}"


def write_report(out: Path, results: dict[str, list[dict]], command: str, seeds: Sequence[int], chosen: dict[str, dict], seconds: float,
                 sampler_seeds: int, world: str, selection_seeds: int = 2, quick: bool = False) -> None:
    n = len(seeds)
    wall = f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
    few_seeds = (" With one training seed the CIs are over prompts alone: they leave out how much a method varies from run to run."
                 if n == 1 else "") + (f" The paper's claims need {MIN_DECIDING_RUNS} or more training seeds (--training-seeds) to be decided."
                                       if n < MIN_DECIDING_RUNS else "")
    smoke = "**A smoke test (--quick): a few steps per arm at tiny sizes; these numbers are not a result.**\n\n" if quick else ""
    sections = [f"# sspo compare\n\n{smoke}Command: `{command}`\n\nTraining seeds: {list(seeds)}; this invocation {wall} of wall time "
                "(finished runs are reused, not timed again). "
                "Rewards are the exact reward, mean and 95% CI over training seeds and prompts (each prompt averaged over its "
                f"sampler seeds); SSPO - arm is the paired difference (same training seed, prompt and sampler seed).{few_seeds}\n"]
    earlier = {c["from"] for c in chosen.values() if "from" in c}
    if earlier:
        lines = [f"## Settings as chosen by the comparison in {', '.join(sorted(earlier))}\n", "| arm | settings |", "|---|---|"]
        lines += [f"| {arm} | {' '.join(c['overrides']) or '-'} |" for arm, c in chosen.items()]
        sections.append("\n".join(lines) + "\n")
    if any(c["grid"] for c in chosen.values()):
        lines = ["## Settings chosen on the validation split\n", f"Each grid point trained with seeds {', '.join(map(str, selection_seed_list(selection_seeds)))} "
                 "(none of them a seed of the runs below) and scored by mean validation reward.\n",
                 "| arm | chosen | validation reward of every grid point |", "|---|---|---|"]
        for arm, c in chosen.items():
            grid = "; ".join(f"{' '.join(row['overrides'])}: {row['validation_reward']:.3f}"
                             + (f" ({', '.join(f'{r:.3f}' for r in row['per_seed'])})" if len(row["per_seed"]) > 1 else "") for row in c["grid"])
            lines.append(f"| {arm} | {' '.join(c['overrides']) or '-'} | {grid or '-'} |")
        edges = [f"{arm}: {edge}" for arm, c in chosen.items() for edge in grid_edges(c)]
        if edges:
            lines.append(f"\nOn the grid's edge (the best value may lie beyond it: widen the grid there before trusting the choice): {'; '.join(edges)}.")
        sections.append("\n".join(lines) + "\n")
    # Table 6 only when an ablation ran: SSPO's row alone repeats Table 1.
    for title, names, shown_by in (("Table 1: methods", table1(), table1()), ("Table 6: SSPO ablations", ("sspo", *TABLE6), TABLE6)):
        for split, label in (("seen", "seen prompts (combinations in the alignment data)"), ("heldout", "held-out prompts")):
            if any(a in results for a in shown_by):
                sections.append(f"## {title} — {label}\n\n{table(results, names, split, sampler_seeds, n, world)}\n")
    found = claims(results, sampler_seeds, n)
    if found:
        lines = ["## The paper's claims on held-out prompts\n", "| SSPO vs | paper | SSPO - arm [95% CI] | here |", "|---|---|---|---|"]
        lines += [f"| {c['arm']} | {c['paper']} | {interval(c['difference'])} | {c['verdict']} |" for c in found]
        sections.append("\n".join(lines) + "\n")
    atomic_write_text(out / "results.md", "\n".join(sections))
    atomic_write_json(out / "results.json", {"command": command, "seeds": list(seeds), "selection_seeds": selection_seeds, "sampler_seeds": sampler_seeds,
                                             "chosen": chosen, "claims": found, "results": results})


def write_figures(out: Path, names: Sequence[str], seeds: Sequence[int], chosen: dict[str, dict], eval_cfg: EvalConfig) -> None:
    by_arm = {arm: [out / "runs" / run_name(arm, chosen[arm]["overrides"], seed) for seed in seeds] for arm in names}
    figure9 = {arm: by_arm[arm] for arm in ("sft", "sspo") if arm in by_arm}
    plot_panels([(*REWARD_PANEL, reward_series(figure9, splits=("heldout",)))], out / "figure9_reward.png")
    preference_arms = {arm: dirs for arm, dirs in by_arm.items() if arm != "base" and arm_method(arm).uses_reference}
    plot_panels([(*SSR_PANEL, ssr_series(preference_arms))], out / "figure4_ssr_rate.png")
    # The arms' showcase strips (same prompts, first seed) stacked into one labelled grid.
    strips = [(arm, by_arm[arm][0] / "showcase.png") for arm in names]
    strips = [(arm, path) for arm, path in strips if path.is_file()]
    if strips:
        from PIL import Image

        rows = []
        for _, path in strips:
            with Image.open(path) as strip:
                rows.append([strip.crop((i * SHOWCASE_CELL, 0, (i + 1) * SHOWCASE_CELL, SHOWCASE_CELL)) for i in range(strip.width // SHOWCASE_CELL)])
        captions = showcase(eval_cfg, [None] * len(eval_items(eval_cfg)))[1]
        save_image(image_grid(rows, [arm for arm, _ in strips], captions), out / "grid.png")


def run_compare(config: str | Path, names: Sequence[str], seeds: Sequence[int], out: str | Path, overrides: Sequence[str] = (), quick: bool = False,
                command: str = "", grid: Sequence[str] = (), prompts_per_split: int | None = None, selection_seeds: int = 2, jobs: int = 1,
                chosen_in: str | Path | None = None, added_points: Sequence[str] = (), widen: int = 0) -> dict:
    """Every arm of ``names`` for every training seed (``jobs`` runs at a time), with settings chosen on
    ``grid`` or taken from the comparison whose ``results.json`` is ``chosen_in``; writes the report."""
    names = list(dict.fromkeys(names))  # an arm named twice (--methods sft --ablations sft) is one arm
    if not names:
        raise ConfigError("no arm to compare: --methods and --ablations name none; name the arms, e.g. --methods sft,sspo")
    unknown = [a for a in names if a not in arms()]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}; expected some of {', '.join(arms())}")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected 1 or more runs at a time")
    if added_points and not grid:
        raise ConfigError("--add-point adds to a grid: give the --grid it widens")
    if widen < 0:
        raise ConfigError(f"--widen {widen}: expected 0 or more rounds of widening")
    if widen and not grid:
        raise ConfigError(f"--widen {widen} widens a grid: give the --grid it widens")
    if chosen_in and grid:
        raise ConfigError("--settings-from and --grid both choose the arms' settings; give one of them")
    started = time.time()
    out = Path(out)
    extra = [*(QUICK if quick else []), *overrides]
    # The world the config names (validation.world, else data.source), sampled as its negatives are.
    probe = resolved(load_config(TrainConfig, config, extra))  # negatives.guidance_scale as the arms train with it
    world = get_world(probe.eval_world, "validation.world (or data.source)").name
    sampling = dict(steps=probe.negatives.steps, guidance_scale=probe.negatives.guidance_scale, frames=probe.data.frames or 8)
    if prompts_per_split is not None and prompts_per_split < 1:
        raise ConfigError(f"--prompts-per-split {prompts_per_split}: expected 1 or more")
    eval_cfg = EvalConfig(prompts=world, prompts_per_split=prompts_per_split if prompts_per_split is not None else 8 if quick else 24, **sampling)
    validation_cfg = EvalConfig(prompts=f"{world}-validation", prompts_per_split=8 if quick else 1000, **sampling)
    if not seeds:
        raise ConfigError("--training-seeds 0: expected 1 or more training runs per arm")
    if selection_seeds < 1:
        raise ConfigError(f"--selection-seeds {selection_seeds}: expected 1 or more training runs per grid point")
    if not chosen_in:
        parsed = parse_grid(grid)
        added = parse_points(added_points, parsed)
        choosing = any(len(points) > 1 for points in arm_points(names, parsed, added).values())
        shared = sorted(set(seeds) & set(selection_seed_list(selection_seeds))) if choosing else []
        if shared:
            raise ConfigError(f"training seed {shared[0]} also chooses the settings (selection seeds start at {SELECTION_SEED_START}), so its "
                              "runs would report the luck that chose them: pick --first-training-seed so the seeds end below it")
    if chosen_in and Path(chosen_in).resolve() in (out.resolve(), (out / "results.json").resolve()):
        raise ConfigError(f"--settings-from {chosen_in} is this comparison's own --out, whose record of the choice the report would replace; "
                          "rerun it with its --grid, or give another --out")
    with claimed_output_folder(out, "--out", "compare", OUTPUTS):
        if chosen_in:
            chosen = settings_from(chosen_in, names)
            check_arm_configs(config, [(arm, chosen[arm]["overrides"]) for arm in names], out, extra)
        else:
            chosen = select_settings(config, names, parsed, selection_seed_list(selection_seeds), out, extra, validation_cfg, jobs, added, widen)
        planned = [(arm, seed) for arm in names for seed in (seeds[:1] if arm == "base" else seeds)]  # the untrained base has no seed
        runs = [(arm, seed, out / "runs" / run_name(arm, chosen[arm]["overrides"], seed), [*extra, *chosen[arm]["overrides"]]) for arm, seed in planned]
        check_finished_runs(config, runs, eval_cfg)
        tasks = [functools.partial(run_arm, config, *run, eval_cfg) for run in runs]
        results: dict[str, list[dict]] = {}
        for (arm, _), summary in zip(planned, run_all(tasks, jobs, "training and evaluating")):
            results.setdefault(arm, []).append(summary)
        write_report(out, results, command, seeds, chosen, time.time() - started, len(eval_cfg.seeds), world, selection_seeds, quick)
        write_figures(out, names, seeds, chosen, eval_cfg)
        print((out / "results.md").read_text())
    return results
