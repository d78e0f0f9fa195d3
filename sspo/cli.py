"""The ``sspo`` command line: one subcommand per module (``python -m sspo`` works too)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .errors import SSPOError


def _base(args) -> None:
    from .base import BaseConfig, build_base

    path = build_base(BaseConfig.preset("quick" if args.quick else "default"), output=args.out, force=args.force)
    print(path)


def _sample(args) -> None:
    from .models.pipeline import load_pipeline
    from .sample import generate, image_grid, save_png
    from .models.names import resolve_model

    prompts = args.prompt
    if args.shapes_check:
        from .worlds.shapes import parse_prompt

        for prompt in prompts:
            parse_prompt(prompt)
    pipe = load_pipeline(resolve_model(args.model), lora=args.lora)
    seeds = list(range(args.seeds))
    rows = [generate(pipe, prompts, [seed] * len(prompts), steps=args.steps, guidance_scale=args.guidance_scale) for seed in seeds]
    save_png(image_grid(rows, [f"seed {s}" for s in seeds], prompts), args.out)
    print(args.out)


# `sspo eval` options that only the benchmark mode (--prompts) reads.
_BENCHMARK_ONLY = (
    "metrics", "prompt_source", "limit", "resolution", "scorer_path", "scorer_option", "scorer_batch_size",
    "dtype", "split_seed", "per_split", "grid_prompts",
)
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _eval(args) -> None:
    from .benchmark_eval import check_metrics, model_specs
    from .models.names import resolve_model

    specs = model_specs(args.model, args.lora, args.name)
    seeds = _int_list(args.seeds, "--seeds") if args.seeds is not None else None
    if args.prompts is not None and args.metrics is not None:
        check_metrics(args.metrics.split(","))  # before building any shapes-base model
    specs = [dataclasses.replace(s, path=resolve_model(s.path)) for s in specs]
    if args.prompts is None:
        given = [f"--{k.replace('_', '-')}" for k in _BENCHMARK_ONLY if getattr(args, k) is not None]
        if given:
            raise SSPOError(f"{', '.join(given)} need --prompts (e.g. --prompts shapes)")
        _eval_shapes_table(args, specs, seeds)
        return
    if args.overrides:
        raise SSPOError(
            f"key=value overrides ({' '.join(args.overrides)}) configure the shapes table without --prompts; "
            "with --prompts use --steps, --seeds, --guidance-scale, --batch-size, --per-split"
        )
    import torch

    from .benchmark_eval import format_summary, run_eval

    out = _default(args.out, "runs/eval")
    summary = run_eval(
        specs, args.prompts, args.metrics.split(",") if args.metrics is not None else None,
        _default(seeds, [0, 1]), out,
        prompt_source=args.prompt_source,
        steps=_default(args.steps, 20),
        guidance_scale=_default(args.guidance_scale, 5.0),
        batch_size=_default(args.batch_size, 16),
        limit=args.limit,
        resolution=args.resolution,
        scorer_paths=_key_values(args.scorer_path, "--scorer-path", "METRIC=PATH"),
        scorer_options=_scorer_options(args.scorer_option),
        scorer_batch_size=_default(args.scorer_batch_size, 16),
        split_seed=_default(args.split_seed, 0),
        per_split=_default(args.per_split, 24),
        dtype=getattr(torch, _DTYPES[_default(args.dtype, "fp32")]),
        grid_prompts=_default(args.grid_prompts, 8),
    )
    print(format_summary(summary))
    print(out)


def _default(value, default):
    return default if value is None else value


def _eval_shapes_table(args, specs, seeds) -> None:
    """The original `sspo eval`: the exact evaluator's table on seen and held-out prompts."""
    from .config import apply_overrides, from_dict
    from .evaluate import EvalConfig, evaluate_model, format_table, write_results

    flags = {"steps": args.steps, "guidance_scale": args.guidance_scale, "batch_size": args.batch_size}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if seeds is not None:
        overrides.append(f"seeds=[{','.join(map(str, seeds))}]")
    cfg = from_dict(EvalConfig, apply_overrides({}, [*overrides, *args.overrides]))
    results = {spec.name: evaluate_model(spec.path, cfg, lora=spec.lora)[0] for spec in specs}
    print(format_table(results))
    if args.out:
        write_results(results, args.out)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SSPOError(f"{flag} takes comma-separated integers, e.g. 0,1; got {text!r}") from None
    if not values:
        raise SSPOError(f"{flag} needs at least one integer, e.g. 0,1")
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
    from .config import load_config
    from .train_config import TrainConfig
    from .trainer import dry_run, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    print(dry_run(cfg) if args.dry_run else train(cfg, resume=args.resume))


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)


def _compare(args) -> None:
    from .compare import run_compare

    from .compare import table1

    methods = ",".join(table1()) if args.methods is None else args.methods
    arms = [a for a in (methods + "," + args.ablations).split(",") if a]
    run_compare(args.config, arms, list(range(args.seeds)), args.out, overrides=args.overrides, quick=args.quick, command=" ".join(["sspo", *sys.argv[1:]]))


def _bench(args) -> None:
    from .bench import cli

    cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sspo", description="Self-Sampling Preference Optimization for diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("base", help="build the shapes world's tiny base model (cached)")
    p.add_argument("--quick", action="store_true", help="the small size used by tests")
    p.add_argument("--out", help="folder to write (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_base)

    p = sub.add_parser("sample", help="write a PNG grid of samples")
    p.add_argument("--model", required=True, help="diffusers folder, hub id or shapes-base[:quick]")
    p.add_argument("--lora", help="LoRA weights folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--seeds", type=int, default=2, help="rows of the grid (seeds 0..N-1)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--shapes-check", action="store_true", help="reject prompts outside the shapes world")
    p.add_argument("--out", default="grid.png")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "eval",
        help="score models: the shapes world's exact table, or a benchmark with reward models (--prompts)",
        description="Without --prompts: the shapes world's exact scores on seen and held-out prompts (key=value "
        "EvalConfig overrides, --out FILE.json). With --prompts: generate with fixed seeds (resumable), score with "
        "--metrics, write scores.csv, summary.md/.json, reward_hist.png and grid.png under --out DIR.",
    )
    p.add_argument("--model", action="append", required=True, help="diffusers folder, hub id or shapes-base[:quick]; repeat for several")
    p.add_argument("--lora", action="append", help="LoRA folder per --model, in order (none: no LoRA)")
    p.add_argument("--name", action="append", help="row label per --model, in order")
    p.add_argument("--out", help="without --prompts: write the summary as JSON here; with --prompts: output folder (default runs/eval)")
    p.add_argument("--prompts", help="shapes | pickapic_val | hpsv2 | parti | a prompt file (.txt .json .jsonl .tsv .csv .parquet)")
    p.add_argument("--prompt-source", help="local copy of a named prompt set (default: its hub dataset); see docs/scorers.md")
    p.add_argument("--metrics", help="comma-separated scorers (default: shapes for --prompts shapes, else pickscore,hpsv2,imagereward,aesthetic)")
    p.add_argument("--seeds", help="comma-separated sampler seeds (default 0,1)")
    p.add_argument("--steps", type=int, help="sampler steps (default 20)")
    p.add_argument("--guidance-scale", type=float, help="default 5.0")
    p.add_argument("--batch-size", type=int, help="images per generation batch (default 16)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), help="diffusion model precision (default fp32)")
    p.add_argument("--limit", type=int, help="at most N prompts per category (quick runs)")
    p.add_argument("--scorer-path", action="append", metavar="METRIC=PATH", help="local weights (or hub id) of a metric's scorer; repeat")
    p.add_argument("--scorer-option", action="append", metavar="METRIC.OPTION=VALUE", help="a build_scorer option, e.g. pickscore.processor=PATH; repeat")
    p.add_argument("--scorer-batch-size", type=int, help="images per scorer batch (default 16)")
    p.add_argument("--split-seed", type=int, help="--prompts shapes: the world's train/held-out split (default 0)")
    p.add_argument("--per-split", type=int, help="--prompts shapes: prompts per split (default 24)")
    p.add_argument("--grid-prompts", type=int, help="columns of grid.png (default 8)")
    p.add_argument("overrides", nargs="*", help="without --prompts: EvalConfig overrides, e.g. prompts_per_split=48")
    p.set_defaults(func=_eval)

    p = sub.add_parser("train", help="train with a YAML config (sft, dpo, spin, sspo)")
    p.add_argument("config", help="YAML file, e.g. configs/demo-shapes.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=sft optim.learning_rate=1e-5")
    p.add_argument("--resume", action="store_true", help="continue from the last saved state in output_dir")
    p.add_argument("--dry-run", action="store_true", help="check the config, data columns and model folder, print a summary, train nothing")
    p.set_defaults(func=_train)

    p = sub.add_parser("compare", help="every method and ablation with the same data, budget and seeds")
    p.add_argument("config", help="base YAML config, e.g. configs/compare-shapes.yaml")
    p.add_argument("--methods", help="comma-separated arms (default: base, every method, sspo_r)")
    p.add_argument("--ablations", default="ssr_off,indicator,erd_initial,erd_last")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--quick", action="store_true", help="a few steps per arm: a smoke test, not a result")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every arm")
    p.set_defaults(func=_compare)

    p = sub.add_parser("bench", help="step time and peak memory of sft, dpo and sspo on one model and batch")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("demo", help="base model -> SFT and SSPO -> evaluation table, grid and plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a result)")
    p.set_defaults(func=_demo)
    return parser


def _quiet_libraries(quiet: bool) -> None:
    """Without --verbose, the libraries' notices and progress bars give way to sspo's own output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Every pipeline load draws "Loading pipeline components" / "Loading weights" bars, dozens per
    # run; sspo's own bars (one per phase) and summaries stay.
    for library in (diffusers_logging, transformers_logging):
        if quiet:
            library.disable_progress_bar()
        else:
            library.enable_progress_bar()
    if not quiet:
        return
    for name in ("diffusers", "transformers", "accelerate", "matplotlib", "peft"):  # per-call notices (safety checker, state files)
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()  # e.g. the torchvision fallback notice on every run
    warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops positionals at the first option).
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(not args.verbose)
    try:
        args.func(args)
    except SSPOError as exc:
        print(f"sspo: error: {exc}", file=sys.stderr)
        return 2
    return 0
