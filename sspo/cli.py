"""The ``sspo`` command line: one subcommand per module (``python -m sspo`` works too)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from sspo.config import split_override
from sspo.errors import ConfigError, SSPOError
from sspo.io import check_output_folder, os_error_message, os_error_of
from sspo.logs import set_up_logging


def _base(args) -> None:
    from sspo.worlds import get_world

    world = get_world(args.world, "--world")
    if args.size not in world.base_presets:
        raise ConfigError(f"--size {args.size}: world {world.name} has sizes {', '.join(world.base_presets)}")
    if args.quick and args.size not in ("default", "quick"):
        raise ConfigError(f"--quick is --size quick, and --size {args.size} is another size: give one of them")
    path = world.resolve_base(f"{world.base}:{'quick' if args.quick else args.size}", output=args.out, force=args.force)
    print(path)
    if args.round_trip:
        scores = world.round_trip(path)
        columns = list(next(iter(scores.values())))
        print(f"VAE round trip of held-out {'clips' if world.clips else 'images'} (exact scores; clean = the ceiling):")
        print("| sample | " + " | ".join(columns) + " |\n| --- |" + " ---: |" * len(columns))
        for name, row in scores.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")


def _sample(args) -> None:
    from sspo.commands.sample import sample_grid

    print(sample_grid(args.model, args.prompt, args.out, rows=args.rows, steps=args.steps, guidance_scale=args.guidance_scale, frames=args.frames,
                      resolution=args.resolution, lora=args.lora, motion_adapter=args.motion_adapter, device=args.device, force=args.force,
                      shapes_check=args.shapes_check))


def _eval(args) -> None:
    if args.videos or args.reference_videos:
        return _eval_videos(args)
    if not args.model:
        raise SSPOError("pass --model (generate images and score them) or --videos DIR (score clips)")
    from sspo.commands.eval import OUTPUTS, format_summary, model_specs, run_eval
    from sspo.evaluation.evaluate import EvalConfig
    from sspo.models.pipeline import check_lora_path
    from sspo.worlds.names import resolve_model, shared_guidance_scale

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}
    values["metrics"] = tuple(args.metrics.split(",")) if args.metrics else ()
    values["seeds"] = tuple(_int_list(args.seeds, "--seeds"))
    cfg = EvalConfig(**values)  # checked before any shapes-base model is built
    if cfg.guidance_scale is None:  # by the names given, which name a world's base as such
        cfg = dataclasses.replace(cfg, guidance_scale=shared_guidance_scale(args.model))
    specs = model_specs(args.model, args.lora, args.name)
    check_output_folder(Path(args.out), "--out", "eval", OUTPUTS)
    for spec in specs:  # before resolve_model builds a world's base
        if spec.lora:
            check_lora_path(Path(spec.lora).expanduser())
    specs = [dataclasses.replace(s, path=resolve_model(s.path, key="--model")) for s in specs]
    summary = run_eval(specs, cfg, args.out, scorer_paths=_key_values(args.scorer_path, "--scorer-path", "METRIC=PATH"), scorer_options=_scorer_options(args.scorer_option))
    print(format_summary(summary))
    print(args.out)


def _eval_videos(args) -> None:
    from sspo.commands.eval import model_specs
    from sspo.commands.eval_videos import format_video_summary, run_video_eval
    from sspo.evaluation.evaluate import EvalConfig
    from sspo.evaluation.video_metrics import VIDEO_METRICS

    if args.model:
        raise SSPOError("--model generates images, --videos scores clips: give one or the other")
    if not args.videos:
        raise SSPOError("--reference-videos needs --videos DIR, a folder of generated clips")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}
    cfg = EvalConfig(**values | {"metrics": (), "seeds": tuple(_int_list(args.seeds, "--seeds"))})  # video metrics are not image scorers
    metrics = tuple(args.metrics.split(",")) if args.metrics else VIDEO_METRICS
    summary = run_video_eval(model_specs(args.videos, None, args.name, "--videos"), cfg, args.out, metrics=metrics, reference=args.reference_videos,
                             scorer_paths=_key_values(args.scorer_path, "--scorer-path", "METRIC=PATH"), scorer_options=_scorer_options(args.scorer_option))
    print(format_video_summary(summary))
    print(args.out)


def _add_eval_arguments(p) -> None:
    """One flag per :class:`~sspo.evaluation.evaluate.EvalConfig` field, defaults from the config itself."""
    from sspo.evaluation.evaluate import DTYPES, PROMPT_SETS, EvalConfig
    from sspo.evaluation.scorers import PAPER_METRICS, scorer_names
    from sspo.evaluation.video_metrics import VIDEO_METRICS
    from sspo.models.families import usual_by_family

    help = {
        "prompts": f"a prompt set ({' | '.join(PROMPT_SETS)}) or a prompt file (.txt .json .jsonl .tsv .csv .parquet)",
        "metrics": f"comma-separated, some of {', '.join(scorer_names())} (default: a world's exact evaluator for its prompts, "
        f"e.g. shapes for --prompts shapes, else {','.join(PAPER_METRICS)}); "
        f"with --videos, some of {','.join(VIDEO_METRICS)} (default: all)",
        "seeds": "comma-separated sampler seeds: one sample per prompt and seed",
        "steps": "sampler steps",
        "guidance_scale": "classifier-free guidance, or FLUX-dev's guidance embedding's input (default: the models' usual, "
                          f"{usual_by_family('default_guidance_scale')}, a world's base its world's: 1 for shapes-base:flow, else 5)",
        "batch_size": "images per generation batch",
        "dtype": f"dtype of the diffusion model's weights: {' | '.join(DTYPES)}",
        "limit": "at most N prompts per category (quick runs)",
        "split_seed": "a world's prompts (--prompts shapes, ...): its train/held-out split",
        "prompts_per_split": "a world's prompts: prompts per split (seen, held-out)",
        "prompt_source": "local copy of a named prompt set (default: its hub dataset); see docs/scorers.md",
        "scorer_batch_size": "images per scorer batch",
        "grid_prompts": "columns of grid.png",
        "frames": "video models: frames per clip",
        "resolution": "image side in pixels, a multiple of 8; SD3, FLUX and PixArt: of 16 (default: the model's native)",
    }
    defaults = EvalConfig()
    for field in dataclasses.fields(EvalConfig):
        default = getattr(defaults, field.name)
        kind = str(field.type)
        flag = "--" + field.name.replace("_", "-")
        text = help.get(field.name, field.name.replace("_", " "))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if shown not in (None, ""):
            text += f" (default: {shown})"
        if kind.startswith("tuple"):
            p.add_argument(flag, default=shown, help=text)
        else:
            p.add_argument(flag, type=int if "int" in kind else float if "float" in kind else str, default=default, help=text)


def _int_list(text: str, flag: str) -> list[int]:
    """``--seeds`` / ``--sweep``'s comma-separated integers, each given once."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SSPOError(f"{flag} takes comma-separated integers, e.g. 0,1; got {text!r}") from None
    if not values:
        raise SSPOError(f"{flag} needs at least one integer, e.g. 0,1")
    if twice := sorted({v for v in values if values.count(v) > 1}):
        raise SSPOError(f"{flag} {text}: {', '.join(map(str, twice))} given twice, which would repeat the same work; give each once")
    return values


def _key_values(pairs: list[str] | None, flag: str, form: str) -> dict[str, str]:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise SSPOError(f"{flag} takes {form}, got {pair!r}")
        result[key.strip()] = value
    return result


def _scorer_options(pairs: list[str] | None) -> dict[str, dict[str, str]]:
    options: dict[str, dict[str, str]] = {}
    for key, value in _key_values(pairs, "--scorer-option", "METRIC.OPTION=VALUE").items():
        metric, dot, option = key.partition(".")
        if not dot or not metric or not option:
            raise SSPOError(f"--scorer-option takes METRIC.OPTION=VALUE (e.g. pickscore.processor=PATH), got {key}={value}")
        options.setdefault(metric, {})[option] = value
    return options


def _train(args) -> None:
    from sspo.config import load_config, yaml_text
    from sspo.training.config import TrainConfig, resolved
    from sspo.training.run_state import STATE_FILE, saved_states
    from sspo.training.trainer import dry_run, launched_as_main, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    shown = launched_as_main()  # under a multi-process launch the main process prints, once
    if args.print_config:
        if shown:
            print(yaml_text(resolved(cfg)), end="")
        return
    if args.dry_run:
        summary = dry_run(cfg, resume=args.resume, overwrite=args.overwrite)
        if shown:
            print(summary)
        return
    run = Path(cfg.output_dir)

    def states() -> set[tuple[str, int]]:  # a state saved again under an earlier one's name is another state
        return {(state.name, (state / STATE_FILE).stat().st_mtime_ns) for state in saved_states(run)}

    before = states()
    try:
        final = train(cfg, resume=args.resume, overwrite=args.overwrite)
        if shown:
            print(final)
    except KeyboardInterrupt as exc:
        # How to go on depends on what is saved now: a fresh start stopped before its first save
        # put any earlier run back, which --resume with this config would not continue.
        if args.resume and before or states() - before:
            exc.going_on = CONTINUE["train"]
        elif before:
            exc.going_on = f"this start saved no state, and the earlier run in {run} is as it was; the same command starts again"
        else:
            exc.going_on = "no state was saved; the same command starts the run again"
        raise


def _demo(args) -> None:
    from sspo.commands.demo import run_demo
    from sspo.commands.parallel import default_jobs

    if args.jobs is not None and args.jobs < 1:
        raise SSPOError(f"--jobs {args.jobs}: expected 1 or more runs at a time")
    run_demo(args.out, quick=args.quick, world=args.world, jobs=default_jobs() if args.jobs is None else args.jobs, base=args.base)


def _compare(args) -> None:
    from sspo.commands.compare import ABLATIONS, run_compare, table1
    from sspo.config import MAX_SEED

    methods = ",".join(table1()) if args.methods is None else args.methods
    # Naming the methods names the arms: the ablations join them only when asked for.
    ablations = args.ablations if args.ablations is not None else "" if args.methods is not None else ",".join(ABLATIONS)
    arms = [a for a in (methods + "," + ablations).split(",") if a]
    from sspo.commands.parallel import default_jobs

    if args.training_seeds < 1:
        raise SSPOError(f"--training-seeds {args.training_seeds}: expected 1 or more training runs per arm")
    if not 0 <= args.first_training_seed <= MAX_SEED + 1 - args.training_seeds:
        raise SSPOError(f"--first-training-seed {args.first_training_seed}: expected 0 to {MAX_SEED + 1 - args.training_seeds} "
                        f"(its {args.training_seeds} seeds end at {MAX_SEED}, the largest seed)")
    seeds = list(range(args.first_training_seed, args.first_training_seed + args.training_seeds))
    run_compare(args.config, arms, seeds, args.out, overrides=args.overrides, quick=args.quick, command=shlex.join(["sspo", *sys.argv[1:]]),
                grid=args.grid or (), prompts_per_split=args.prompts_per_split, selection_seeds=args.selection_seeds, jobs=default_jobs() if args.jobs is None else args.jobs,
                chosen_in=args.settings_from, added_points=args.add_point or (), widen=args.widen)


def _pairs(args) -> None:
    from sspo.commands.pairs import run_pairs

    run_pairs(args.world, args.level, args.steps, None if args.sweep is None else _int_list(args.sweep, "--sweep"), args.out, args.quick,
              args.tie_threshold, args.bt_temperature, args.seed, args.pairs_per_prompt, args.max_prompts)


def _export(args) -> None:
    from sspo.commands.export import check_repo_id, export_lora, push_to_hub

    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before the file is written
    out = export_lora(args.run, args.format, args.checkpoint, args.out, args.force)
    print(out)
    if args.push_to_hub:
        print(push_to_hub(out, args.push_to_hub))


def _bench(args) -> None:
    from sspo.commands.bench import cli

    cli(args)


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line that points to ``--help`` (its subcommands' too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from sspo.models.families import usual_by_family
    from sspo.worlds import world_names

    parser = Parser(prog="sspo", description="Self-Sampling Preference Optimization for diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the libraries' own messages")
    parser.add_argument("--version", action="version", version=f"sspo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("base", help="build a world's tiny base model (shipped for the default size; cached)",
                       description="Print the folder of a world's tiny base model (a diffusers pipeline), building it first where it is "
                       "not shipped and not yet in $SSPO_CACHE (default ~/.cache/sspo). Its name (shapes-base, shapes-base:quick, ...) "
                       "stands for that folder as model.pretrained and --model everywhere.")
    p.add_argument("--world", default="shapes", help=f"the world whose base to build: {' | '.join(world_names())} (default: shapes)")
    p.add_argument("--quick", action="store_true", help="the small size used by tests (--size quick)")
    p.add_argument("--size", default="default", help="the base's preset: default (shipped), quick, or for shapes 64px (64 px images, 16x16 latents), "
                   "flow (shipped; an SD3-style flow-matching base) or flow-quick")
    p.add_argument("--out", help="folder to write (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if shipped or cached")
    p.add_argument("--round-trip", action="store_true", help="also score clean and defective renders after a VAE round trip (the ceiling)")
    p.set_defaults(func=_base)

    p = sub.add_parser("sample", help="write a PNG grid of samples (video models: an animated GIF or MP4 grid)")
    p.add_argument("--model", required=True, help="diffusers folder, hub id, or a world's base: shapes-base[:quick|:64px|:flow|:flow-quick] or moving-shapes-base[:quick]")
    p.add_argument("--motion-adapter", help="a MotionAdapter (hub id or folder) that makes an image --model an AnimateDiff one")
    p.add_argument("--frames", type=int, help="video models: frames per clip (default: 8, at least 1)")
    p.add_argument("--lora", help="LoRA weights folder (pytorch_lora_weights.safetensors), or a finished training run's folder for its final LoRA")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--rows", type=int, default=2, metavar="N", help="rows of the grid, one sampler seed each: seeds 0..N-1 (default: 2, at least 1)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20, at least 1)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (at least 0; at most 1: none), or FLUX-dev's guidance embedding's input; "
                   f"default: the model's usual, {usual_by_family('default_guidance_scale')}, a world's base its world's: 1 for shapes-base:flow, else 5")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native; SD3, FLUX and PixArt take multiples of 16): "
                   "the size a LoRA was trained at, say")
    p.add_argument("--device", default="auto", help="where to sample: auto (CUDA, else MPS, else the CPU; default), cpu, cuda, cuda:N or mps")
    p.add_argument("--shapes-check", action="store_true", help="reject prompts outside the shapes world")
    p.add_argument("--out", default="grid.png", help="the grid's file (default grid.png; .jpg and .webp are taken too, another suffix becomes .png); "
                   "video models: .gif, .mp4 or .webp (another becomes .gif)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "eval",
        help="score models on a prompt set with metrics (the shapes world's exact evaluator or reward models)",
        description="Generate one image per (model, prompt, seed) (resumable), score every image with every metric, "
        "write scores.csv, summary.md/.json, reward_hist.png and grid.png under --out.",
    )
    p.add_argument("--model", action="append", help="diffusers folder, hub id, or a world's base (shapes-base[:quick|:64px|:flow|:flow-quick], moving-shapes-base[:quick]); repeat")
    p.add_argument("--videos", action="append", metavar="DIR", help="instead of --model: score the generated clips in DIR (<prompt_index>-<seed>.<ext>) "
                   "with the paper's video metrics (docs/video-metrics.md); repeat for several models, --name labels them")
    p.add_argument("--reference-videos", metavar="DIR", help="with --videos: each prompt's reference clip (<prompt_index>.<ext>), for fid, fvd and psnr")
    p.add_argument("--lora", action="append", help="LoRA folder (or finished training run) per --model, in order (none: no LoRA)")
    p.add_argument("--name", action="append", help="row label per --model (or --videos), in order")
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval): new, empty, or one sspo eval wrote; a re-run adds to it: scores.csv keeps the rows of "
                   "models and seeds this call does not ask for, summary.md/.json, reward_hist.png and grid.png show this call's models")
    _add_eval_arguments(p)
    p.add_argument("--scorer-path", action="append", metavar="METRIC=PATH", help="local weights (or hub id) of a metric's scorer; repeat. "
                   "With --videos: a video metric's TorchScript backbone (fid=pixels: exact shapes-world features); "
                   "TorchScript runs the code it holds: pass only files you trust")
    p.add_argument("--scorer-option", action="append", metavar="METRIC.OPTION=VALUE", help="a build_scorer option, e.g. pickscore.processor=PATH; repeat "
                   "(with --videos: e.g. fvd.frames=16, fid.bootstrap=0)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("train", help="train with a YAML config (sft, dpo, spin, sspo)")
    p.add_argument("config", help="a YAML file, a shipped config by name (e.g. demo-shapes), or a run folder (its config.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. method=sft optim.learning_rate=1e-5")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the last saved state in output_dir")
    start.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir (without it a fresh start there is refused)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--dry-run", action="store_true", help="check the config, data columns and model folder, print a summary, train nothing")
    shown.add_argument("--print-config", action="store_true", help="print the config as the run saves it (config.yaml): the overrides applied, "
                       "every default filled in, the settings left to the model family and the launch named; train nothing")
    p.set_defaults(func=_train)

    p = sub.add_parser("compare", help="every method and ablation with the same data, budget and seeds")
    p.add_argument("config", help="base YAML config, e.g. configs/compare-shapes.yaml")
    p.add_argument("--methods", help="comma-separated arms (default: base, every method, sspo_r, and the ablations); "
                   "named, only those arms and the --ablations named")
    p.add_argument("--ablations", help="comma-separated SSPO variants (default: none with --methods; without it the paper's "
                   "Table 6 ablations: ssr_off, indicator, erd_initial, erd_last)")
    p.add_argument("--training-seeds", type=int, default=3, metavar="N", help="training runs per arm, with training seeds K..K+N-1 (default: 3)")
    p.add_argument("--first-training-seed", type=int, default=0, metavar="K", help="the first training seed K (default 0): seeds no "
                   "earlier comparison reported, to replicate its claims on fresh runs")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare): new, empty, or one sspo compare wrote, whose finished runs are reused")
    p.add_argument("--quick", action="store_true", help="a few steps per arm: a smoke test, not a result")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="settings chosen per arm on the validation split, e.g. "
                   "optim.learning_rate=3e-4,1e-3 (beta only for arms with a reference); repeat for several keys; "
                   "ARM:KEY=V1,V2 gives one arm its own values (a grid widened past that arm's edge)")
    p.add_argument("--selection-seeds", type=int, default=2, help="training seeds per grid point when choosing settings: seeds "
                   "1000, 1001, ..., apart from the reported runs' (mean validation reward; 2 or more keep an unstable setting "
                   "from winning on one lucky seed; default 2)")
    p.add_argument("--prompts-per-split", type=int, help="evaluation prompts per split, seen and held-out (default 24; "
                   "more than the held-out combinations means all of them)")
    p.add_argument("--add-point", action="append", metavar="ARM:KEY=V,KEY=V", help="one more point for an arm's grid, e.g. "
                   "sspo:optim.learning_rate=1e-4,beta=5 (the next step past the edge its best point sits on); repeat")
    p.add_argument("--widen", type=int, default=0, metavar="N", help="up to N rounds in which an arm whose best point sits on its grid's "
                   "edge gets the points one step past it and chooses again (the grid's spacing continued), so that no choice stays on "
                   "an edge; default 0: the report names the edge")
    p.add_argument("--settings-from", metavar="RESULTS_JSON", help="instead of --grid: each arm's settings as the comparison that wrote this "
                   "results.json chose them (e.g. another data level at the settings chosen at the middle one)")
    p.add_argument("--jobs", type=int, help="runs at a time, each a one-thread process (default: one per CPU core; 1 on a GPU)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides applied to every arm")
    p.set_defaults(func=_compare)

    p = sub.add_parser("pairs", help="Pick-a-Pic-shaped pairs of a world: two samples of a generator, ranked by the exact reward",
                       description="G (the world's base after N SFT steps) samples two images or clips per alignment-train prompt; the "
                       "higher exact reward wins, near-ties are dropped. Writes pairs.parquet (caption, the two media columns, label_0) and "
                       "pairs.json (recipe, counts, R_base, R_win, R_lose, R_ceil) for data.source=parquet.")
    p.add_argument("--world", default="shapes", help="the world (default: shapes; moving-shapes for clips)")
    p.add_argument("--level", help="winner quality, by G's measured steps: shapes has low, mid, high (R_win about 0.65, 0.72, G saturated at "
                   "about 0.78), moving-shapes has mid (see docs/data.md)")
    p.add_argument("--steps", type=int, help="instead of --level: G's SFT steps on clean samples")
    p.add_argument("--sweep", metavar="N1,N2,...", help="instead: print winner statistics at each number of G's SFT steps (0: the base); writes no pairs")
    p.add_argument("--out", help="folder for pairs.parquet and pairs.json (default: the cache, keyed by the settings)")
    p.add_argument("--tie-threshold", type=float, default=0.02, help="drop pairs whose rewards differ by less (default: 0.02)")
    p.add_argument("--bt-temperature", type=float, default=0.0, help="> 0: labels drawn from a Bradley-Terry model of the reward difference at this temperature (default: 0, off)")
    p.add_argument("--pairs-per-prompt", type=int, default=1, help="pairs drawn per training prompt, two samples each (default: 1)")
    p.add_argument("--max-prompts", type=int, help="draw from a seeded sample of this many training prompts (default: the world's: "
                   "every one of shapes', 480 of moving-shapes')")
    p.add_argument("--seed", type=int, default=0, help="G's training seed, the sampler's seeds and the labels' sides (default: 0)")
    p.add_argument("--quick", action="store_true", help="the world's small test base, 16 prompts, 2 SFT steps unless --steps (a smoke test, not a level; "
                   "moving-shapes' small base makes clips its evaluator scores ~0, so its pairs are ties)")
    p.set_defaults(func=_pairs)

    from sspo.commands.export import FINAL, FORMATS

    p = sub.add_parser("export", help="a LoRA run's final model or a pool checkpoint as one .safetensors file for ComfyUI, AUTOMATIC1111 or diffusers",
                       description="Convert a LoRA run's final model (or pool checkpoint N) to one .safetensors file: --format kohya for "
                       "ComfyUI, AUTOMATIC1111 and kohya's sd-scripts, --format diffusers for pipe.load_lora_weights. See docs/coming-from-diffusers.md.")
    p.add_argument("run", help="the training run's folder (its output_dir)")
    p.add_argument("--format", required=True, choices=FORMATS, help="kohya (lora_unet_... keys) or diffusers (pytorch_lora_weights layout)")
    p.add_argument("--checkpoint", default=FINAL, metavar="final|N", help="the final LoRA (default), or pool checkpoint N (0: the initial model)")
    p.add_argument("--out", metavar="FILE", help="the file to write (default: RUN-CHECKPOINT-FORMAT.safetensors in the current folder)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the file to this hub model repository (made if missing; token: $HF_TOKEN or hf auth login)")
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="step time, FLOP/s and peak memory of each training arm (sft, dpo, sspo, ...) on one model and batch")
    from sspo.commands.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("demo", help="a world end to end: base model -> its demo arms (SFT, SSPO; Diffusion-DPO for shapes) -> evaluation table, grid and plot",
                       description="A world end to end on this machine: its base model, its Pick-a-Pic-shaped pairs, the demo arms "
                       "trained side by side (SFT and SSPO on the winners, Diffusion-DPO on the pairs), every arm scored exactly "
                       "with 95% CIs: results.md, grid.png (or grid.gif), training.png in --out. About 4 to 6 minutes for the "
                       "shapes world on an idle 2-core CPU from an empty cache.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo): new, empty, or one a demo of the same world wrote")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a result)")
    p.add_argument("--world", default="shapes", help=f"the world: {' | '.join(world_names())} (default: shapes; moving-shapes: "
                   "AnimateDiff base -> SFT and SSPO -> temporal evaluation, GIF grid)")
    p.add_argument("--base", help="the world's base to train from (default: its usual one); shapes-base:flow is the shapes world's "
                   "flow-matching (SD3-style) base")
    p.add_argument("--jobs", type=int, help="runs at a time, each a one-thread process (default: one per CPU core; 1 on a GPU)")
    p.set_defaults(func=_demo)
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps one given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging, and the libraries' own messages")
    parser.subcommands = sub.choices  # main reports an unknown option with its subcommand's name
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sspo")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


# What an interrupted command keeps, and how to go on from it.
CONTINUE = {
    "train": "the same command with --resume continues from the last saved state",
    "eval": "the same command again continues: the images and scores on disk are kept",
    "compare": "the same command again continues: finished runs are reused and the others resumed",
    "pairs": "the same command again builds them (a folder a build left without pairs.json is built over)",
}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch: a second or two, in which Ctrl-C is common
    except KeyboardInterrupt:
        print("\nsspo: interrupted; nothing was done", file=sys.stderr)
        return 128 + signal.SIGINT
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops positionals at the first option):
    # argparse leaves every positional after an option unparsed, so each is an override, and one
    # without '=' is named on its own below rather than making all of them "unrecognized".
    unknown = [e for e in extra if e.startswith("-")] if hasattr(args, "overrides") else extra
    if unknown:
        command = parser.subcommands[args.command]
        options = {o.lstrip("-"): o for action in command._actions for o in action.option_strings if o not in ("-h", "--help")}
        name = unknown[0].split("=", 1)[0].lstrip("-")
        holding = [o for o in options if len(name) >= 3 and name in o]  # seeds: training-seeds before methods
        near = [options[o] for o in difflib.get_close_matches(name, holding or list(options), n=1, cutoff=0 if holding else 0.6)]
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {near[0]}?" if near else ""))
    if extra:
        args.overrides = [*args.overrides, *extra]
    _expand_home(args)
    set_up_logging(args.verbose)
    on_sigterm = signal.signal(signal.SIGTERM, _stop)
    try:
        given: dict[str, str] = {}
        for item in getattr(args, "overrides", ()):
            config = getattr(args, "config", "")  # bench takes overrides without a config
            if "=" not in item and "=" in config and not Path(config).exists():  # argparse took the first override for the config
                raise SSPOError(f"the config name comes before the overrides: sspo {args.command} {item} {config} ...")
            key = split_override(item)[0].strip()
            if key in given:  # composed overrides (a shared list, then one run's) may mean it; a slip may not
                logging.getLogger("sspo").warning("override %s is given twice (%s, then %s): the last one is used", key, given[key], item)
            given[key] = item
        args.func(args)
    except SSPOError as exc:
        print(f"sspo: error: {_named_by_flag(str(exc), sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A failed read or write (a full disk, a read-only folder) anywhere, or a collective another process left.
        if (failed := os_error_of(exc)) is not None:
            logging.getLogger("sspo").debug("the failed read or write", exc_info=True)
            print(f"sspo: error: {os_error_message(failed)}", file=sys.stderr)
            return 2
        if isinstance(exc, RuntimeError) and (lost := _lost_processes(exc)) is not None:
            logging.getLogger("sspo").debug("the failed collective", exc_info=True)
            print(f"sspo: error: {lost}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Stopped) else "interrupted"
        nothing_left = "nothing half-written was left"
        going_on = getattr(exc, "going_on", None) or (nothing_left if getattr(args, "dry_run", False) else CONTINUE.get(args.command, nothing_left))
        print(f"\nsspo: {how}; {going_on}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    return 0


# Options that name files or folders: a leading ~ is the home folder, as a shell expands it unquoted
# (hub ids and shipped names never start with one).
PATH_OPTIONS = ("config", "out", "model", "motion_adapter", "lora", "videos", "reference_videos", "prompts", "run", "settings_from")


def _expand_home(args: argparse.Namespace) -> None:
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


def _named_by_flag(message: str, argv: list[str]) -> str:
    """An error about a config field the user set by a flag of its name (eval's ``--limit``, pairs'
    ``--tie-threshold``) names that flag, not a config key."""
    match = re.match(r"config key '(\w+)(?:\[\d+\])?'(.*)", message)
    flag = match and "--" + match.group(1).replace("_", "-")
    if match is None or not any(a == flag or a.startswith(flag + "=") for a in argv):
        return message
    key, rest = match.group(1), match.group(2).replace(", or null", "")  # a flag left out is the null
    rest = re.sub(rf"\bset {key}=(\S+)", rf"pass {flag} \1", rest)  # the fix, in the flag's spelling too
    return flag + re.sub(rf"(?<![\w.]){key}=(\S+)", rf"{flag} \1", rest)


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler's or a user's stop), unwound as Ctrl-C is: what a failed start set
    aside goes back, temporary files go, and the last saved state stays."""


def _lost_processes(exc: RuntimeError) -> str | None:
    """What a collective that failed because another process stopped or fell behind means, in one line
    (None: another error). Only in a multi-process launch, where that process's own error is printed too."""
    import torch.distributed as dist

    # How gloo and NCCL report a peer that is gone or late; any other error inside a collective is sspo's own, and raised.
    peer_lost = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out waiting", "watchdog caught collective operation timeout")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if not isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)) and not any(words in str(exc).lower() for words in peer_lost):
        return None
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"process {dist.get_rank()} lost the others at a collective ({what}): another process stopped (its own error is printed too) "
            "or kept the others waiting longer than process_timeout_s; the same command with --resume continues from the last saved state")


def _stop(signum, frame) -> None:
    raise Stopped
