"""``sspo pairs``: a world's Pick-a-Pic-shaped pairs, from a generator G trained here.

G is the world's base after ``steps`` SFT steps on clean samples, trained by the trainer from the
world's generator config (its :class:`~sspo.worlds.registry.PairsSettings`) and cached by its
recipe; :mod:`sspo.worlds.pairs` samples two images or clips per training prompt from it, scores
and ranks them, drops ties and writes the parquet and its record. ``--sweep`` prints G's winner
statistics at several step counts instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from sspo.config import load_config, to_dict
from sspo.errors import SSPOError
from sspo.io import check_write_target, entry_list, file_digest, is_temporary, read_json
from sspo.models.tiny import one_thread
from sspo.paths import build_lock, cache_root
from sspo.training.config import TrainConfig, with_family_defaults
from sspo.worlds.names import resolve_model
from sspo.worlds.pairs import (
    BUILDING,
    PAIRS_VERSION,
    Measured,
    PairsConfig,
    base_reward,
    ceiling_reward,
    format_sweep,
    measure,
    pairs_world,
    require_kept,
    sweep_row,
    training_specs,
    worlds_with_pairs,
    write_pairs,
)
from sspo.worlds.registry import get_world

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The generator G


def generator_config(cfg: PairsConfig, output_dir: str | Path) -> TrainConfig:
    """G's recipe: the world's generator config as SFT (its LoRA, learning rate and batch) for
    ``cfg.steps`` steps on the clean samples of the training prompts, validation ones left out; no
    validation, no logging."""
    overrides = [
        "method=sft", f"model.pretrained={cfg.base}", "iterations=1", f"steps_per_iteration={cfg.steps}", f"seed={cfg.seed}",
        f"data.world_split_seed={cfg.split_seed}", "data.world_without_validation=true", "validation.every_iterations=0",
        "report_to=none", f"output_dir={output_dir}",
    ]
    return load_config(TrainConfig, pairs_world(cfg).pairs.generator_config, overrides)


def generator_key(cfg: PairsConfig) -> str:
    if cfg.steps == 0:
        return "base"
    recipe = to_dict(with_family_defaults(generator_config(cfg, "generator")))
    for key in ("output_dir", "process_timeout_s"):  # where G is written, how long processes wait: not its recipe
        recipe.pop(key)
    blob = json.dumps({"v": PAIRS_VERSION, "world": pairs_world(cfg).pairs.version, "steps": cfg.steps, "recipe": recipe}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pairs_key(cfg: PairsConfig) -> str:
    """The pairs' recipe: their settings and G's."""
    blob = json.dumps({"v": PAIRS_VERSION, "world": pairs_world(cfg).pairs.version, **to_dict(cfg), "generator": generator_key(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def generator(cfg: PairsConfig) -> tuple[str, Path | None]:
    """G as (base folder, LoRA folder or None for the base itself): trained now, or reused from the cache."""
    from filelock import FileLock

    from sspo.training.trainer import train

    base = resolve_model(cfg.base)
    if cfg.steps == 0:
        return base, None
    run = cache_root() / f"pairs-generator-{cfg.base.replace(':', '-')}-n{cfg.steps}-{generator_key(cfg)}"
    final = run / "final"
    run.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run) + ".lock"):  # parallel builds share one G
        if not (final / "pytorch_lora_weights.safetensors").is_file():
            with one_thread():
                train(generator_config(cfg, run))
    return base, final


def sampler(model: str, lora: Path | None, cfg: PairsConfig) -> Callable[[list[str], list[int]], list]:
    """``generate(prompts, seeds)`` of ``model`` (+ ``lora``), sampling as the evaluation samples."""
    from sspo.evaluation.sampling import generate
    from sspo.models.pipeline import load_pipeline

    pipe = load_pipeline(model, lora=lora)
    pipe.set_progress_bar_config(disable=True)
    return lambda prompts, seeds: generate(pipe, prompts, seeds, steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size)


def measure_generator(cfg: PairsConfig) -> Measured:
    model, lora = generator(cfg)
    return measure(cfg, model, sampler(model, lora, cfg))


# --------------------------------------------------------------------------------------------------
# Building


def default_folder(cfg: PairsConfig, level: str | None = None) -> Path:
    name = pairs_world(cfg).name
    return cache_root() / "data" / f"{name}-pickapic-{level or f'n{cfg.steps}'}{'-quick' if cfg.base.endswith(':quick') else ''}-{pairs_key(cfg)}"


def existing_pairs(folder: Path) -> dict | None:
    """The record of the pairs ``folder`` holds, None for a new or empty folder; a folder holding
    anything else is refused, so that building never writes among a user's files."""
    check_write_target(folder, "--out")
    if not folder.exists():
        return None
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return None
    # A build stopped before its record (pairs.json, written last) left only its own files, its mark
    # among them: built again. A pairs.parquet without the mark may be the user's, and is refused.
    leftovers = [name for name in names if name in (BUILDING, "pairs.parquet") or is_temporary(name)]
    if "pairs.json" not in names and BUILDING in names and leftovers == names:
        for name in leftovers:
            (folder / name).unlink()
        return None
    if not {"pairs.json", "pairs.parquet"} <= set(names):
        raise SSPOError(f"--out {folder} holds files that are not sspo pairs ({entry_list(names)}); choose an empty or new folder")
    return read_json(folder / "pairs.json", what="the pairs' record", fix="delete that folder and build the pairs again")


def build_pairs(cfg: PairsConfig, out: str | Path | None = None, level: str | None = None) -> tuple[Path, dict, bool]:
    """Write ``pairs.parquet`` and ``pairs.json`` into ``out`` (default: the cache, keyed by the
    config); returns the folder, the record and whether it was reused (same config, already built)."""
    from filelock import FileLock

    if cfg.steps < 1:
        raise SSPOError("G with 0 SFT steps is the base itself, and the pairs' generator must not be the model being trained; give it 1 or more steps")
    key = pairs_key(cfg)
    folder = Path(out) if out else default_folder(cfg, level)
    record_path = folder / "pairs.json"
    # The lock lives in the cache, so a folder sspo was given holds nothing but the pairs, even after a failure.
    with FileLock(build_lock(folder)):
        if (record := existing_pairs(folder)) is not None and record.get("key") == key:
            if (recorded := record.get("parquet")) is None or file_digest(folder / "pairs.parquet") == recorded:
                return folder, record, True
            log.warning("%s is not the file its pairs.json records (cut short or changed since it was built); building the pairs again",
                        folder / "pairs.parquet")
            (folder / "pairs.json").unlink()  # first: a build stopped now leaves a folder the next one builds over
            record = None
        if record is not None:
            raise SSPOError(f"{folder} holds pairs built with other settings; choose another --out (or delete that folder)")
        measured = measure_generator(cfg)
        require_kept(measured, cfg.tie_threshold)
        model, _ = generator(cfg)
        world = pairs_world(cfg)
        extra = {"R_base": base_reward(cfg, measured.specs, sampler(model, None, cfg)), "R_ceil": ceiling_reward(cfg, model)}
        head = {
            "key": key,
            "level": level,
            # --quick pairs come from the small base after 2 steps: a smoke test, not the level's pairs
            "level_target_R_win": world.pairs.levels[level].target_r_win if level and not cfg.base.endswith(":quick") else None,
            "config": to_dict(cfg),
            "generator": {"steps": cfg.steps, "key": generator_key(cfg), "recipe": to_dict(generator_config(cfg, "generator")) | {"output_dir": None}},
        }
        write_pairs(world, folder, measured, head, len(training_specs(cfg)), extra)
    return folder, json.loads(record_path.read_text()), False


def sweep(cfg: PairsConfig, steps: Sequence[int], thresholds: Sequence[float] = (0.01, 0.02, 0.05)) -> list[dict]:
    """Winner statistics of G at every number of SFT steps (0: the base), and the tie fraction at
    several thresholds: the curve the levels are read from. Nothing is written but G's cache."""
    return [sweep_row(n, measure_generator(dataclasses.replace(cfg, steps=n)), thresholds) for n in tqdm(steps, desc="pairs: sweep", leave=False)]


def pairs_config(world: str = "shapes", level: str | None = None, steps: int | None = None, quick: bool = False, max_prompts: int | None = None,
                 **options) -> PairsConfig:
    """World ``world``'s pairs of ``level`` (or of G after ``steps``) from ``max_prompts`` training
    prompts (default: the world's); ``quick``: the world's small base, 16 prompts and 2 SFT steps
    unless ``steps``, a smoke test rather than a level."""
    entry = get_world(world, "--world")
    if entry.pairs is None:
        with_pairs = ", ".join(other.name for other in worlds_with_pairs())
        raise SSPOError(f"--world {world}: this world has no Pick-a-Pic-shaped pairs; worlds that have them: {with_pairs}")
    if level is not None and level not in entry.pairs.levels:
        raise SSPOError(f"--level {level}: world {world} has levels {', '.join(entry.pairs.levels)}")
    steps = 2 if quick and steps is None else steps if steps is not None else entry.pairs.levels[level].steps if level else 0
    max_prompts = max_prompts if max_prompts is not None else 16 if quick else entry.pairs.max_prompts
    quick_preset = entry.demo.quick_preset  # G's base under --quick: the world's smaller one, as its demo's
    return PairsConfig(steps=steps, base=f"{entry.base}:{quick_preset}" if quick and quick_preset else entry.base, max_prompts=max_prompts,
                       sampler_steps=entry.pairs.sampler_steps, **options)


def level_pairs(world: str, level: str, quick: bool = False) -> tuple[Path, dict]:
    """The folder and record of ``sspo pairs --world <world> --level <level>``'s pairs, built now if not cached."""
    folder, record, _ = build_pairs(pairs_config(world, level, quick=quick), level=level)
    return folder, record


def run_pairs(world: str = "shapes", level: str | None = None, steps: int | None = None, sweep_steps: Sequence[int] | None = None,
              out: str | Path | None = None, quick: bool = False, tie_threshold: float = 0.02, bt_temperature: float = 0.0, seed: int = 0,
              pairs_per_prompt: int = 1, max_prompts: int | None = None) -> None:
    """``sspo pairs``: build (or reuse) the pairs of ``level`` or ``steps`` and say what they are, or
    print G's winner statistics at each of ``sweep_steps``."""
    get_world(world, "--world")
    chosen = [flag for flag, value in (("--level", level), ("--steps", steps), ("--sweep", sweep_steps)) if value is not None]
    if len(chosen) > 1 or not (chosen or quick):
        raise SSPOError(f"give one of --level, --steps or --sweep (got {', '.join(chosen) or 'none'})")
    if max_prompts is not None and max_prompts < 1:
        raise SSPOError(f"--max-prompts: got {max_prompts}; give 1 or more training prompts")
    cfg = pairs_config(world, level, steps, quick, max_prompts, tie_threshold=tie_threshold, bt_temperature=bt_temperature, seed=seed, pairs_per_prompt=pairs_per_prompt)
    entry = pairs_world(cfg)
    if sweep_steps is not None:
        print(format_sweep(sweep(cfg, sweep_steps)))
        return
    folder, record, reused = build_pairs(cfg, out, level)
    target = (f" (level {level}: target R_win {entry.pairs.levels[level].target_r_win:.2f})" if level and not quick else
              f" (level {level}, --quick: a smoke test on the small base, not the level's pairs)" if level else "")
    kind = "clips" if entry.clips else "images"
    print(f"{'reused' if reused else 'wrote'} {folder / 'pairs.parquet'}{target}")
    print(f"  G: the base after {cfg.steps} SFT steps on clean {kind}; {record['prompts']} training prompts, {cfg.pairs_per_prompt * 2} samples each")
    print(f"  pairs: {record['pairs']} kept, {record['ties_dropped']} ties dropped (|reward difference| < {cfg.tie_threshold:g})"
          + (f"; labels Bradley-Terry at T={cfg.bt_temperature:g}, {record['label_agreement']:.0%} agree with the reward" if cfg.bt_temperature else ""))
    print(f"  R_win {record['R_win']:.3f}, R_lose {record['R_lose']:.3f} (mean exact reward after a VAE round trip, as training encodes them; "
          f"as stored {record['R_win_stored']:.3f}, {record['R_lose_stored']:.3f})")
    print(f"  R_base {record['R_base']:.3f} (the base's samples, same prompts and seeds), R_ceil {record['R_ceil']:.3f} (clean {kind} after a VAE round trip)")
    print(f"  record: {folder / 'pairs.json'}")
    first, second = entry.pair_columns
    columns = "" if (first, second) == ("jpg_0", "jpg_1") else f" data.image_0_column={first} data.image_1_column={second}"
    base = f" model.pretrained={cfg.base}" if quick else ""  # the small base G was made from, as the smoke test's
    print(f"  train on it: sspo train {entry.pairs.generator_config.stem}{base} data.source=parquet data.path={folder / 'pairs.parquet'}{columns} "
          f"validation.world={entry.name} output_dir=runs/{entry.name}-pairs-{folder.name}")
