"""``sspo bench``: time and peak memory of one optimizer step of sft, Diffusion-DPO and SSPO, side by side.

Each arm (:mod:`sspo.benchmark.config`) runs in a fresh subprocess (``--no-isolate``: in this one),
measured by :mod:`sspo.benchmark.measure`; :mod:`sspo.benchmark.report` turns the arms into ratios
to Diffusion-DPO and a table. Memory: :mod:`sspo.benchmark.memory`; FLOPs and the FLOP floor of the
all-in ratio: :mod:`sspo.benchmark.flops`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sspo.benchmark.config import SETTING_KEYS, BenchConfig, model_notes, model_overrides, train_config
from sspo.benchmark.flops import device_peak
from sspo.benchmark.measure import run_arm
from sspo.benchmark.report import format_table, machine_info, result_files, summarize_arms, write_results
from sspo.config import allowed, field_comments
from sspo.errors import SSPOError
from sspo.io import check_write_target
from sspo.models.architectures import ARCH_MODELS, ARCH_TITLES
from sspo.training.config import check_environment, resolved


def check_device(b: BenchConfig) -> None:
    if b.clock == "cpu" and torch.cuda.is_available():
        raise SSPOError("--clock cpu measures this process's CPU time, which says nothing about GPU work; use the default --clock wall on a GPU")
    if b.model in ARCH_MODELS and not torch.cuda.is_available() and not b.allow_cpu:
        raise SSPOError(
            f"model {b.model!r} is the full {ARCH_TITLES[b.model]} architecture, meant for a GPU, and no CUDA device is available; "
            "use --model tiny on the CPU, or pass --allow-cpu to run it here anyway (slow, many GB of RAM)"
        )


def _run_isolated(b: BenchConfig, arm: str, workdir: Path) -> dict:
    config, out = workdir / f"{arm}.config.json", workdir / f"{arm}.result.json"
    config.write_text(json.dumps(dataclasses.asdict(b)))
    cmd = [sys.executable, "-m", "sspo", "bench", "--worker", arm, "--worker-config", str(config), "--worker-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"arm": arm, "error": f"worker exited with {proc.returncode}:\n{tail}"}
    return json.loads(out.read_text())


def worker(arm: str, config_path: str | Path, out_path: str | Path) -> None:
    """Subprocess entry point: run one arm, write its result as JSON."""
    from sspo.io import atomic_write_json

    b = BenchConfig(**json.loads(Path(config_path).read_text()))
    atomic_write_json(out_path, run_arm(b, arm))


def run_bench(b: BenchConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    check_device(b)
    started = time.perf_counter()
    info = machine_info()
    if b.model in ("tiny", "quick"):  # build the cached base once, not in every worker
        from sspo.training.trainer import resolve_model

        resolve_model(f"shapes-base{':quick' if b.model == 'quick' else ''}")
    else:
        model_overrides(b)  # builds the architecture folder and the data at the right resolution
    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sspo-bench-") as workdir:
        check_environment(resolved(train_config(b, b.arms[0], workdir)))  # what this machine cannot run, once, before any arm
        for arm in b.arms:
            log(f"bench: {arm} ...")
            t0 = time.perf_counter()
            arms[arm] = _run_isolated(b, arm, Path(workdir)) if b.isolate else run_arm(b, arm)
            log(f"bench: {arm} done in {time.perf_counter() - t0:.0f} s" + (f" -- {arms[arm]['error']}" if "error" in arms[arm] else ""))
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    first = next((r for r in arms.values() if "error" not in r), {})
    info.update({k: first[k] for k in ("device", "threads") if k in first})
    info["peak"] = device_peak(b.mixed_precision, first.get("threads", b.threads))
    return {"bench": dataclasses.asdict(b), "machine": info, "model": model_notes(b), "settings": {k: first.get(k) for k in SETTING_KEYS},
            "arms": arms, "summary": summarize_arms(arms, info["peak"]["flops_per_s"]), "wall_s": time.perf_counter() - started}


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def add_arguments(parser) -> None:
    """``sspo bench``'s flags, one per :class:`BenchConfig` field (``--batch-size`` sets ``batch_size``),
    each helped by its field's comment; key=value TrainConfig overrides last."""
    import argparse

    comments = field_comments(BenchConfig)
    for field in dataclasses.fields(BenchConfig):
        if field.name == "overrides":
            continue
        kind, default = str(field.type), field.default if field.default is not dataclasses.MISSING else field.default_factory()
        rule = allowed(field)
        help = comments[field.name]
        if kind.startswith("tuple"):
            help += f" (comma-separated{', some of ' + ','.join(rule.choices) if rule and rule.choices else ''})"
        if default is not None and "default" not in help:
            shown = ("on" if default else "off") if kind == "bool" else ",".join(map(str, default)) if kind.startswith("tuple") else default
            help += f" (default: {shown})"
        if kind == "bool":
            parser.add_argument(_flag(field), action=argparse.BooleanOptionalAction, default=default, help=help)
        elif kind.startswith("tuple"):
            parser.add_argument(_flag(field), default=",".join(map(str, default)), help=help)
        else:
            parser.add_argument(_flag(field), type=int if "int" in kind else str, default=default, help=help)
    parser.add_argument("--out", help="write <out>.json and <out>.md, e.g. docs/bench/tiny-cpu")
    parser.add_argument("--force", action="store_true", help="replace <out>.json and <out>.md if they exist")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", default=[], help="TrainConfig overrides for every arm, e.g. negatives.guidance_scale=7.5")


def config_from_args(args) -> BenchConfig:
    values = {}
    for field in dataclasses.fields(BenchConfig):
        value = getattr(args, field.name)
        if str(field.type).startswith("tuple") and isinstance(value, str):
            try:
                value = tuple((int(x) if "int" in str(field.type) else x) for x in value.split(",") if x)
            except ValueError:
                raise SSPOError(f"{_flag(field)} takes comma-separated integers, e.g. 20,50; got {value!r}") from None
        values[field.name] = tuple(value) if field.name == "overrides" else value
    return BenchConfig(**values)


def _cli_args(b: dict) -> list[str]:
    """The flags that reproduce ``b`` (a :class:`BenchConfig` as a dict), defaults left out."""
    default = dataclasses.asdict(BenchConfig())
    args = []
    for field in dataclasses.fields(BenchConfig):
        value = b[field.name]
        if isinstance(value, list):  # after a JSON round trip
            value = tuple(value)
        if value == default[field.name] or field.name == "overrides":
            continue
        if isinstance(value, bool):
            args.append(_flag(field) if value else "--no-" + _flag(field)[2:])
        elif isinstance(value, tuple):
            args.append(f"{_flag(field)} {','.join(map(str, value))}")
        else:
            args.append(f"{_flag(field)} {value}")
    return args + list(b.get("overrides", ()))


def cli(args) -> None:
    """``sspo bench`` (flags: :func:`add_arguments`)."""
    if args.worker:
        worker(args.worker, args.worker_config, args.worker_out)
        return
    b = config_from_args(args)
    if args.out:  # before minutes of measuring
        check_write_target(args.out, "--out", file=True)
    if args.out and not args.force and (existing := [path for path in result_files(args.out) if path.exists()]):
        raise SSPOError(f"--out {args.out}: {' and '.join(map(str, existing))} exist already; pass --force to replace them, or name another --out")
    result = run_bench(b)
    failed = [arm for arm in result["arms"].values() if "error" in arm]
    if failed and len(failed) == len(result["arms"]):  # nothing was measured: a failure, not a table
        raise SSPOError(f"every arm failed; {failed[0]['arm']}: {failed[0]['error'].strip().splitlines()[-1].removeprefix('sspo: error: ')}")
    print(format_table(result))
    if args.out:
        for path in write_results(result, args.out, " ".join(["sspo bench", *_cli_args(result["bench"])])):
            print(path)
