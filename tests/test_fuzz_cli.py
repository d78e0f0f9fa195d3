"""A fuzz test of the command line: random config overrides for ``sspo train`` (dry runs and a few
short real runs), random sample flags, and random damage to copies of a finished run folder and an
eval folder followed by ``sspo train --resume``, an ``sspo eval`` re-run, ``sspo eval --lora
RUN/final`` and ``sspo sample --lora RUN/final``. Every command runs in-process (``sspo.cli.main``).

What every case must show (docs/reliability.md):

- The exit code is 0 or 2 and no exception escapes ``main`` (in a process, that is a traceback);
  stderr holds no ``Traceback (most recent call last)``.
- A failure's stderr is one ``sspo: error:`` line once library output is set aside: progress bars
  (tqdm), log records in the CLI's format (``DEBUG|INFO|WARNING name: message``) and Python
  warnings (``file:line: SomeWarning: message`` and the source line under it). A flag value of
  the wrong type is argparse's, one ``sspo SUBCOMMAND: error:`` line.
- Every file and folder under the case's folder is hashed before the command. A failure changes,
  removes and creates nothing there (not a lock, not a manifest, not an empty folder). A success
  changes only its own outputs:

  * ``train --dry-run``: nothing;
  * a real ``train``: only what is under its new ``output_dir``;
  * ``train --resume``: in the run folder each path is either as it was before the command or as
    the finished run had it before the damage (a repair), and ``final/`` is as the finished run had
    it; nothing outside the run folder;
  * an ``eval`` re-run: in the eval folder the same rule, with ``summary.json`` and ``scores.csv``
    as they were before the damage. A sample generated again (it was damaged or deleted) must be
    a whole image, but may differ from the lost one by the rounding of a differently batched
    generation; then only its own row of ``scores.csv`` and the files summing up the scores may
    differ from before the damage;
  * ``eval --lora RUN/final --out NEW`` and ``sample --lora RUN/final --out NEW/grid.png``: only
    what is under NEW; the run folder is only read.

Cases: ``SSPO_FUZZ_CASES`` in all (default 300; a nightly run sets e.g. 5000) drawn from
``SSPO_FUZZ_SEED`` (default 0). A failing case is printed with its arguments and damage, and
``SSPO_FUZZ_SEED`` and the case number reproduce it. Each failure the fuzz test once found has a
reproducer of its own at the end of this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest

from sspo.cli import main
from sspo.config import Allowed, allowed, field_type
from sspo.logs import UserFormatter
from sspo.training.config import TrainConfig
from sspo.training.trainer import train

from test_trainer import DEMO, tiny_config, tiny_overrides

CASES = int(os.environ.get("SSPO_FUZZ_CASES", "300"))
SEED = int(os.environ.get("SSPO_FUZZ_SEED", "0"))
REAL_RUNS = max(3, CASES // 100)  # a real run costs seconds: a handful
RUN_DAMAGE_CASES = CASES * 3 // 25
EVAL_DAMAGE_CASES = CASES // 20  # an eval re-run rewrites its summary, plot and grid: the dearest case
SAMPLE_CASES = CASES // 12
DRY_RUN_CASES = CASES - REAL_RUNS - RUN_DAMAGE_CASES - EVAL_DAMAGE_CASES - SAMPLE_CASES
PROMPT = "a small red circle on the left, white background"


# ------------------------------------------------------------------------------------------------
# Running a command and judging its output


@dataclasses.dataclass
class Outcome:
    code: int | None
    err: str
    escaped: str | None  # an exception that escaped main: a traceback in a real process


def run_cli(argv: list[str], capsys) -> Outcome:
    """``main(argv)`` in-process, its log records on stderr in the CLI's format as in a process of its
    own (under pytest, main's logging.basicConfig finds pytest's handlers and adds none)."""
    capsys.readouterr()
    escaped = escaped_traceback = None
    handler = logging.StreamHandler(sys.stderr)  # capsys's stream, while it captures
    handler.setFormatter(UserFormatter())
    logging.getLogger().addHandler(handler)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except Exception as exc:  # noqa: BLE001 - the finding itself
        code, escaped = None, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        escaped_traceback = "".join(traceback.format_exception(exc))
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    return Outcome(code, err + (escaped_traceback if escaped else ""), escaped)


_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|it/s\]|s/it\]")
_LOG_RECORD = re.compile(r"^sspo: (?!error: )|^[\w.-]+: (warning|debug): ")  # UserFormatter's lines, a library's with its level
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")
_ERROR = re.compile(r"^sspo: error: \S")
_ARGPARSE_ERROR = re.compile(r"^sspo( \w+)?: error: \S.*--help lists the options\)$")


def message_lines(err: str) -> list[str]:
    """stderr's lines without library output (module docstring)."""
    kept, after_warning = [], False
    for line in re.split(r"[\r\n]", err):
        if after_warning and line.startswith(" "):  # the source line Python prints under a warning
            after_warning = False
            continue
        after_warning = bool(_WARNING.match(line))
        if not line.strip() or after_warning or _PROGRESS.search(line) or _LOG_RECORD.match(line):
            continue
        kept.append(line)
    return kept


def output_problems(outcome: Outcome) -> list[str]:
    problems = []
    if outcome.escaped:
        problems.append(f"exception escaped main: {outcome.escaped}")
    elif outcome.code not in (0, 2):
        problems.append(f"exit code {outcome.code}")
    if "Traceback (most recent call last)" in outcome.err and not outcome.escaped:
        problems.append("a traceback in stderr")
    lines = message_lines(outcome.err)
    if outcome.code == 2:
        if len(lines) != 1 or not (_ERROR.match(lines[0]) or _ARGPARSE_ERROR.match(lines[0])):
            problems.append(f"stderr is not one error line: {lines[:6]}")
    elif outcome.code == 0 and any(_ERROR.match(line) for line in lines):
        problems.append(f"exit code 0 with an error line: {lines[:6]}")
    return problems


# ------------------------------------------------------------------------------------------------
# Files before and after


def snapshot(root: Path) -> dict[str, str]:
    """``{path relative to root: sha256 of a file, or 'folder'}`` of everything under ``root``."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink() or not path.is_dir():
            try:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                state[key] = f"unreadable: {exc.strerror}"
        else:
            state[key] = "folder"
    return state


def changes(before: dict, after: dict, allowed_under: str | None = None, repaired: dict | None = None, prefix: str = "") -> list[str]:
    """Paths whose state differs, except those under ``allowed_under`` and, under ``prefix``, those now as ``repaired`` has them."""
    found = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) == after.get(key):
            continue
        if allowed_under is not None and (key == allowed_under or key.startswith(allowed_under + "/")):
            continue
        if repaired is not None and key.startswith(prefix) and repaired.get(key.removeprefix(prefix)) == after.get(key):
            continue
        state = "created" if key not in before else "removed" if key not in after else "changed"
        found.append(f"{key} {state}")
    return found


# ------------------------------------------------------------------------------------------------
# Config overrides


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str
    item_type: type
    optional: bool
    is_list: bool
    rule: Allowed | None


def leaves(cls: type = TrainConfig, prefix: str = "") -> list[Leaf]:
    """Every value key of the TrainConfig tree, with its type and what its declaration allows."""
    found = []
    for field in dataclasses.fields(cls):
        item_type, optional, is_list = field_type(cls, field.name)
        if dataclasses.is_dataclass(item_type):
            found += leaves(item_type, f"{prefix}{field.name}.")
        else:
            found.append(Leaf(prefix + field.name, item_type, optional, is_list, allowed(field)))
    return found


LEAVES = leaves()
BOUNDED = [leaf for leaf in LEAVES if leaf.rule is not None and leaf.item_type is not bool]
# Keys whose valid values make the dry run render world data or load models into the shared cache:
# valid draws come from these values only (invalid ones stop at the config and cost nothing).
CHEAP_VALID = {
    "data.source": ["shapes", "parquet", "imagefolder", "hf"], "data.world_split_seed": ["0"], "data.world_pairs_per_prompt": ["1"],
    "data.resolution": ["32"], "data.world_without_validation": ["false"], "data.frames": ["0", "8"], "model.pretrained": ["shapes-base:quick"],
}
# Strings that name a path: always local-looking, so that nothing is looked up on the hub.
PATH_KEYS = {"data.path", "model.pretrained", "model.motion_adapter", "data.cache_dir", "output_dir"}
JUNK = [
    "", " ", "null", "~", "five", "1.5", "0", "-0", "-1", "-99999999999999999999", "1" + "0" * 40, "9" * 400, "1e400", "-1e400", ".inf", "-.inf",
    ".nan", "nan", "true", "false", "yes", "[]", "[1, 2]", "[a, [b]]", "{}", "{a: 1}", "a,b", "1,2", "'a,b'", "ü", "日本語", "🙂", "\u202e", "[",
    "{", "]", "'", '"', "!!python/object:os.system", "*x", "&x", "%x", "@x", "`x`", "a: b", "- a", "#c", "?", "|", ">", "0x1F", "0o17", "1_000",
    "1:30", "2001-01-01", "\t", "a\nb", "--", "-", "../..", "/", ".", "./",
]
WEIRD_KEYS = ["optim.lr", "optim", "model", "optim.batch_size.x", "x", "", " beta", "BETA", "optim..batch_size", "data.path.x", "日本",
              "model.lora_targets[0]", "__class__", "optim.__init__", "validation.prompts.0"]


def _number_text(value) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def valid_text(leaf: Leaf, rng: random.Random) -> str:
    """An override value the key accepts (small numbers: a real run stays seconds long)."""
    if leaf.key in CHEAP_VALID:
        return rng.choice(CHEAP_VALID[leaf.key])
    if leaf.key == "output_dir":
        return rng.choice(["runs/fuzz", "./runs/x y", "runs/ü-日本"])
    if leaf.key in PATH_KEYS:
        return rng.choice(["./missing", "/nonexistent/fuzz", "a-file.txt", "user"])
    rule = leaf.rule or Allowed()
    if leaf.item_type is bool:
        item = rng.choice(["true", "false"])
    elif rule.choices is not None:
        item = str(rng.choice(rule.choices))
    elif leaf.item_type in (int, float):
        low = rule.at_least if rule.at_least is not None else rule.above if rule.above is not None else 0
        high = rule.at_most if rule.at_most is not None else rule.below if rule.below is not None else low + 8
        high = min(high, low + 8)
        if leaf.item_type is int:
            value = rng.randint(int(low) + (rule.above is not None), int(high) - (rule.below is not None))
            if rule.multiple_of:
                value = max(rule.multiple_of, value - value % rule.multiple_of)
        else:
            value = rng.uniform(low, high)
            value = value if (rule.above is None or value > rule.above) and (rule.below is None or value < rule.below) else (low + high) / 2
        item = _number_text(value)
    else:
        item = rng.choice(["a", "to_q", "x y", "ü"])
    return f"[{item}]" if leaf.is_list else item


def out_of_range_text(leaf: Leaf, rng: random.Random) -> str | None:
    """A value of the right type that the key's declaration refuses; None when it refuses none."""
    rule = leaf.rule
    if rule is None or leaf.item_type is bool:
        return None
    options = []
    if rule.choices is not None:
        options += ["ppo", str(rule.choices[0]).upper() + "x", f" {rule.choices[0]}", "日本"]
    if rule.nonempty:
        options += ["''", "'   '"] if not leaf.is_list else ["[]", "['']"]
    if rule.own_folder:
        options += ["''", ".", "/", "~", "./", "..", "../..", "~/."]
    step = 1 if leaf.item_type is int else rng.choice([1e-9, 0.5, 1e300])
    if rule.at_least is not None:
        options.append(_number_text(rule.at_least - step if leaf.item_type is float else int(rule.at_least) - rng.choice([1, 2, 10**30])))
    if rule.above is not None:
        options += [_number_text(rule.above), _number_text(rule.above - step), ".nan"]
    if rule.at_most is not None:
        options.append(_number_text(rule.at_most + step if leaf.item_type is float else int(rule.at_most) + rng.choice([1, 10**30])))
    if rule.below is not None:
        options.append(_number_text(rule.below))
    if rule.multiple_of:
        options.append(str((rule.at_least or rule.multiple_of) + 1))
    if not options:
        return None
    text = rng.choice(options)
    return f"[{text}]" if leaf.is_list and not text.startswith("[") else text


def wrong_type_text(leaf: Leaf, rng: random.Random) -> str:
    if leaf.is_list:
        return rng.choice(["{a: 1}", "5", "[[a]]", "[{a: 1}]", "[null]"])
    if leaf.item_type is bool:
        return rng.choice(["yes", "1", "'true'", "[true]", "on"])
    if leaf.item_type in (int, float):
        return rng.choice(["five", "[1]", "{a: 1}", "true", "'1'" if leaf.item_type is int else "'x'"] + (["1.5", "1e3"] if leaf.item_type is int else []))
    return rng.choice(["123", "true", "[a]", "{a: b}"] + ([] if leaf.optional else ["null", "~"]))


def override(rng: random.Random, for_real_run: bool) -> str:
    """One ``key=value`` token: a key of the tree (now and then one that is not) and a value that is
    valid, out of range, of the wrong type or junk. A real run's valid values are small."""
    if not for_real_run and rng.random() < 0.05:
        return rng.choice(["beta", "=", "==", "optim.batch_size==1"])
    key_pool = [leaf for leaf in LEAVES if leaf.key in REAL_RUN_KEYS] if for_real_run else LEAVES
    if not for_real_run and rng.random() < 0.08:
        return f"{rng.choice(WEIRD_KEYS)}={rng.choice(JUNK)}"
    leaf = rng.choice(key_pool)
    kind = rng.random()
    if for_real_run:  # a refused value stops at the config; any other is small
        return _out_of_range_token(rng) if kind < 0.2 else f"{leaf.key}={valid_text(leaf, rng)}"
    if kind < 0.3:
        text = valid_text(leaf, rng)
    elif kind < 0.6:
        text = out_of_range_text(leaf, rng) or wrong_type_text(leaf, rng)
    elif kind < 0.8:
        text = wrong_type_text(leaf, rng)
    else:
        text = rng.choice(JUNK)
    if leaf.key in PATH_KEYS and text and not text.startswith(("/", ".", "~", "[", "'", "$")) and text not in CHEAP_VALID.get(leaf.key, ()):
        text = "./" + text  # a local path, never a hub id
    return f"{leaf.key}={text}"


def _out_of_range_token(rng: random.Random) -> str:
    """A refused value for a real run: never of output_dir, which a bug would then write into."""
    leaf = rng.choice([leaf for leaf in BOUNDED if not leaf.rule.own_folder])
    return f"{leaf.key}={out_of_range_text(leaf, rng)}"


# A real run's keys: cheap whatever their valid value (no world data rendered, nothing cached).
REAL_RUN_KEYS = {
    "optim.learning_rate", "optim.weight_decay", "optim.adam_beta1", "optim.adam_beta2", "optim.adam_epsilon", "optim.max_grad_norm",
    "optim.lr_warmup_steps", "model.lora_rank", "model.lora_alpha", "model.lora", "beta", "ssr", "erd", "erd_per", "seed", "nonfinite",
    "log_every", "save_every_steps", "checkpoints_total_limit", "negatives.scheduler", "negatives.eta", "negatives.guidance_scale",
    "data.seed", "data.random_flip", "data.center_crop", "data.mode", "pregenerate", "cache_reference_errors", "ssr_draws",
}


# ------------------------------------------------------------------------------------------------
# Cases and their verdicts


class Verdicts:
    """The failing cases of one fuzz test."""

    def __init__(self, what: str):
        self.what, self.cases, self.failures, self.exits, self.started = what, 0, [], {}, time.perf_counter()

    def judge(self, case: dict, outcome: Outcome, problems: list[str]) -> None:
        self.cases += 1
        self.exits[outcome.code] = self.exits.get(outcome.code, 0) + 1
        if not problems:
            return
        self.failures.append(f"case {case['number']} (SSPO_FUZZ_SEED={SEED}): {json.dumps({k: v for k, v in case.items() if k != 'number'}, ensure_ascii=False)}\n    -> "
                             + "\n    -> ".join(problems))

    def check(self) -> None:
        print(f"{self.what}: {self.cases} cases in {time.perf_counter() - self.started:.1f} s, exit codes {self.exits}")
        assert not self.failures, f"{len(self.failures)} of {self.cases} cases failed:\n" + "\n".join(self.failures[:25])


def fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def user_files(folder: Path, monkeypatch) -> Path:
    """A working folder holding a user's files, as the current and home folder of a case."""
    fresh(folder)
    (folder / "home").mkdir()
    (folder / "home" / ".profile").write_text("home\n")
    (folder / "user").mkdir()
    (folder / "user" / "notes.txt").write_text("mine\n")
    (folder / "a-file.txt").write_text("text\n")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(folder / "home"))
    return folder


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A fuzzed name must never reach the hub: a connection is refused at once."""

    def refuse(*args, **kwargs):
        raise OSError("the fuzz test has no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------------------------------------
# Random config overrides


def test_random_overrides_on_the_dry_run(quick_base, tmp_path, monkeypatch, capsys):
    rng = random.Random(f"dry-run-{SEED}")
    verdicts = Verdicts("train --dry-run")
    for number in range(DRY_RUN_CASES):
        folder = user_files(tmp_path / "case", monkeypatch)
        tokens = [override(rng, for_real_run=False) for _ in range(rng.choice([1, 1, 2, 3]))]
        argv = ["train", str(DEMO), *tiny_overrides(Path("runs/fuzz"), quick_base), *tokens]
        argv.insert(rng.randint(2, len(argv)), "--dry-run")
        before = snapshot(folder)
        outcome = run_cli(argv, capsys)
        verdicts.judge({"number": number, "overrides": tokens, "argv": argv}, outcome, output_problems(outcome) + changes(before, snapshot(folder)))
    verdicts.check()


def test_random_overrides_on_short_real_runs(quick_base, tmp_path, monkeypatch, capsys):
    rng = random.Random(f"real-{SEED}")
    verdicts = Verdicts("train (real runs)")
    for number in range(REAL_RUNS):
        folder = user_files(tmp_path / "case", monkeypatch)
        tokens = [f"method={rng.choice(['sft', 'dpo', 'spin', 'sspo'])}", *(override(rng, for_real_run=True) for _ in range(rng.choice([1, 2])))]
        # Last: one iteration of one step, whatever the tokens say.
        argv = ["train", str(DEMO), *tiny_overrides(Path("real"), quick_base), *tokens, "iterations=1", "steps_per_iteration=1"]
        before = snapshot(folder)
        outcome = run_cli(argv, capsys)
        problems = output_problems(outcome) + changes(before, snapshot(folder), allowed_under="real" if outcome.code == 0 else None)
        if outcome.code == 0 and not (folder / "real" / "final").is_dir():
            problems.append("exit 0 without final/")
        verdicts.judge({"number": number, "overrides": tokens, "argv": argv}, outcome, problems)
    verdicts.check()


# ------------------------------------------------------------------------------------------------
# Random damage to a finished run folder and an eval folder

FINISHED = ["steps_per_iteration=1"]  # 2 iterations of 1 step: two saved states, three pool checkpoints


def eval_argv(base: str, lora: Path, out: Path) -> list[str]:
    return ["eval", "--model", base, "--name", "base", "--model", base, "--name", "tuned", "--lora", "none", "--lora", str(lora),
            "--prompts-per-split", "1", "--seeds", "0,1", "--steps", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def stash(quick_base, tmp_path_factory) -> Path:
    """A finished run (``run``) and an eval folder of the base and of the run's LoRA (``eval``), kept
    untouched: each case restores them to ``work`` beside it, where they were made (a run's files name their folder)."""
    root = tmp_path_factory.mktemp("fuzz-folders")
    work = root / "work"
    train(tiny_config(work / "run", quick_base, *FINISHED))
    shutil.copytree(work / "run", root / "stash" / "run")
    assert main(eval_argv(quick_base, root / "stash" / "run" / "final", work / "eval")) == 0
    shutil.move(work / "eval", root / "stash" / "eval")
    shutil.rmtree(work)
    return root / "stash"


def restore(stash: Path, names: tuple[str, ...]) -> Path:
    work = fresh(stash.parent / "work")
    for name in names:
        shutil.copytree(stash / name, work / name)
    return work


def damage(root: Path, rng: random.Random, prefer: str | None = None) -> str:
    """Damage one file or folder under ``root`` (inside ``prefer``, when given, most of the time); says what was done."""
    entries = sorted(p for p in root.rglob("*"))
    if prefer and rng.random() < 0.75:
        entries = [p for p in entries if p.relative_to(root).parts[0] == prefer] or entries
    path = rng.choice(entries)
    name = str(path.relative_to(root))
    if path.is_dir():
        shutil.rmtree(path)
        return f"deleted the folder {name}"
    data = path.read_bytes()
    kinds = ["truncated", "zero-length", "garbage", "a byte flipped", "deleted"]
    if path.suffix in (".json", ".jsonl", ".yaml", ".csv"):
        kinds += ["another JSON type", "another JSON type"]
    if path.suffix == ".jsonl":
        kinds += ["last line cut short", "a bad line inside"]
    kind = rng.choice(kinds)
    if kind == "truncated" and len(data) > 1:
        path.write_bytes(data[: rng.randrange(1, len(data))])
    elif kind in ("truncated", "zero-length"):
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(rng.randbytes(rng.choice([1, 16, 4096, max(1, len(data))])))
    elif kind == "a byte flipped" and data:
        at = rng.randrange(len(data))
        path.write_bytes(data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :])
    elif kind == "deleted" or kind == "a byte flipped":
        path.unlink()
        kind = "deleted"
    elif kind == "another JSON type":
        path.write_text(rng.choice(["[1, 2]", "42", '"text"', "null", "{}", "true", '{"step": "x"}']) + "\n")
    elif kind == "last line cut short":
        path.write_bytes(data.rstrip(b"\n")[: -max(1, len(data.rstrip(b"\n").splitlines()[-1]) // 2)] if data.strip() else b"{")
    else:
        lines = data.splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:1]) + rng.choice([b"garbage\n", b"[1, 2]\n", b'{"loss": 1.0}\n', b"\n\n"]) + b"".join(lines[1:]))
    return f"{kind}: {name}"


def restored_or_as_before(before: dict, after: dict, pristine: dict, folder: str) -> list[str]:
    """A success's rule for a folder it repairs: every path in ``folder`` as before the command or as
    ``pristine`` (before the damage); nothing outside it changed."""
    return changes(before, after, repaired=pristine, prefix=f"{folder}/")


def as_pristine(after: dict, pristine: dict, folder: str, names: list[str]) -> list[str]:
    return [f"{folder}/{name} not as before the damage" for name in names
            if {k: v for k, v in pristine.items() if k == name or k.startswith(name + "/")}
            != {k.removeprefix(f"{folder}/"): v for k, v in after.items() if k.removeprefix(f"{folder}/") == name or k.startswith(f"{folder}/{name}/")}]


DERIVED = ("scores.csv", "summary.json", "summary.md", "grid.png", "reward_hist.png")  # written from every sample's scores


def eval_rerun_problems(before: dict, after: dict, pristine: dict, folder: Path, intact: Path) -> list[str]:
    """A successful eval re-run's rule: each path as before the command or before the damage; a
    damaged or missing sample generated again is a whole image, equal to the lost one up to the
    rounding of a differently batched generation, so that only its own scores (and the files
    summing up the scores) may differ from before the damage: every other row of scores.csv may not."""
    from sspo.commands.eval import read_scores
    from sspo.errors import SSPOError
    from sspo.io import check_image

    regenerated = {k for k in pristine if k.startswith("images/") and k.endswith(".png") and before.get(f"eval/{k}") != pristine[k]}
    if not regenerated:
        return restored_or_as_before(before, after, pristine, "eval") + as_pristine(after, pristine, "eval", ["summary.json", "scores.csv"])
    problems = [c for c in restored_or_as_before(before, after, pristine, "eval") if c.split()[0].removeprefix("eval/") not in {*DERIVED, *regenerated}]
    for key in sorted(regenerated):
        try:
            check_image(folder / key, what="sample", fix="-")
        except SSPOError as exc:
            problems.append(f"not generated again: {exc}")
    _, now = read_scores(folder / "scores.csv")
    _, then = read_scores(intact / "scores.csv")
    for key, row in then.items():
        model, *_, prompt_index, seed = key
        if f"images/{model}/{prompt_index}-{seed}.png" not in regenerated and now.get(key) != row:
            problems.append(f"scores.csv row {key} not as before the damage")
    return problems


def test_random_damage_to_a_finished_run(stash, quick_base, capsys):
    """``train --resume``, ``eval --lora RUN/final`` and ``sample --lora RUN/final`` after damage to a copy of a finished run."""
    rng = random.Random(f"run-damage-{SEED}")
    verdicts = Verdicts("damaged run folder")
    pristine = snapshot(stash / "run")
    for number in range(RUN_DAMAGE_CASES):
        work = restore(stash, ("run",))
        run, out = work / "run", work / "out"
        command = rng.choice(["resume", "resume", "eval", "sample"])
        damages = [damage(run, rng, prefer=None if command == "resume" else "final") for _ in range(rng.choice([1, 1, 1, 2]))]
        argv = {
            "resume": ["train", str(DEMO), *tiny_overrides(run, quick_base), *FINISHED, "--resume"],
            "eval": ["eval", "--model", quick_base, "--lora", str(run / "final"), "--prompts-per-split", "1", "--seeds", "0", "--steps", "1", "--out", str(out)],
            "sample": ["sample", "--model", quick_base, "--lora", str(run / "final"), "--prompt", PROMPT, "--rows", "1", "--steps", "1", "--out", str(out / "grid.png")],
        }[command]
        before = snapshot(work)
        outcome = run_cli(argv, capsys)
        after = snapshot(work)
        problems = output_problems(outcome)
        if outcome.code != 0:
            problems += changes(before, after)
        elif command == "resume":
            problems += restored_or_as_before(before, after, pristine, "run")
            problems += as_pristine(after, pristine, "run", ["final"])
        else:
            problems += changes(before, after, allowed_under="out")
        verdicts.judge({"number": number, "command": command, "damage": damages, "exit": outcome.code}, outcome, problems)
    verdicts.check()
    assert snapshot(stash / "run") == pristine


def test_random_damage_to_an_eval_folder(stash, quick_base, capsys):
    """An ``eval`` re-run (same models, prompts and seeds) after damage to a copy of an eval folder."""
    rng = random.Random(f"eval-damage-{SEED}")
    verdicts = Verdicts("damaged eval folder")
    pristine = snapshot(stash / "eval")
    for number in range(EVAL_DAMAGE_CASES):
        work = restore(stash, ("eval",))
        damages = [damage(work / "eval", rng) for _ in range(rng.choice([1, 1, 1, 2]))]
        before = snapshot(work)
        outcome = run_cli(eval_argv(quick_base, stash / "run" / "final", work / "eval"), capsys)
        after = snapshot(work)
        problems = output_problems(outcome)
        if outcome.code != 0:
            problems += changes(before, after)
        else:
            problems += eval_rerun_problems(before, after, pristine, work / "eval", stash / "eval")
        verdicts.judge({"number": number, "command": "eval re-run", "damage": damages, "exit": outcome.code}, outcome, problems)
    verdicts.check()
    assert snapshot(stash / "eval") == pristine


# ------------------------------------------------------------------------------------------------
# sspo sample's flags


def sample_flag(flag: str, rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:  # valid and small: a sample that runs takes a second
        return {"--steps": lambda: str(rng.randint(1, 2)), "--rows": lambda: str(rng.randint(1, 2)),
                "--guidance-scale": lambda: rng.choice(["0", "1", "7.5", "0.0"]), "--frames": lambda: str(rng.randint(1, 8))}[flag]()
    if kind < 0.8:
        return rng.choice(["0", "-1", "-999999999999", "nan"] if flag != "--guidance-scale" else ["-1", "-0.5", "nan", "-1e308"])
    return rng.choice(["", "x", "1.5", "1e3", "ü", "0x10", " 1", "1,2", "--", "-inf", "inf"] if flag == "--guidance-scale" else ["", "x", "1.5", "1e3", "ü", "0x10", "1,2", "--"])


def test_random_sample_flags(quick_base, tmp_path, monkeypatch, capsys):
    rng = random.Random(f"sample-{SEED}")
    verdicts = Verdicts("sample flags")
    for number in range(SAMPLE_CASES):
        folder = user_files(tmp_path / "case", monkeypatch)
        # --frames with this image model is refused whatever its value: rarely, so that most cases sample.
        flags = [item for flag in ("--steps", "--rows", "--guidance-scale", "--frames") if rng.random() < (0.6 if flag != "--frames" else 0.1)
                 for item in (flag, sample_flag(flag, rng))]
        out = rng.choice(["out/grid.png"] * 6 + ["grid.png", "user", "", "a-file.txt/grid.png", "out/grid.gif", "out/ü 日本.png"])
        model = quick_base if rng.random() < 0.85 else "./missing-model"
        prompts = [item for prompt in rng.sample([PROMPT, "", "ü日本", "a,b", "a large blue hexagon"], rng.choice([1, 1, 2])) for item in ("--prompt", prompt)]
        argv = ["sample", "--model", model, *prompts, *flags, *(["--shapes-check"] if rng.random() < 0.2 else []), "--out", out]
        before = snapshot(folder)
        outcome = run_cli(argv, capsys)
        written = Path(out).parts[0] if out.strip() else None
        verdicts.judge({"number": number, "argv": argv, "exit": outcome.code}, outcome,
                       output_problems(outcome) + changes(before, snapshot(folder), allowed_under=written if outcome.code == 0 else None))
    verdicts.check()


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps: got 0, expected an integer >= 1"),
    (["--rows", "0"], "--rows: got 0, expected an integer >= 1"),
    (["--rows", "-3"], "--rows: got -3, expected an integer >= 1"),
    (["--guidance-scale", "-0.5"], "--guidance-scale: got -0.5, expected a number >= 0"),
    (["--guidance-scale", "nan"], "--guidance-scale: got nan, expected a number >= 0"),
    (["--frames", "0"], "--frames: got 0, expected an integer in [1, 4096]"),
    (["--frames", "100000"], "--frames: got 100000, expected an integer in [1, 4096]"),
])
def test_sample_refuses_an_out_of_range_flag_before_loading_a_model(flags, message, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--prompt", PROMPT, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("sspo: error:")] == [f"sspo: error: {message}"] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("{tmp}", "--out '{tmp}' is a folder, not a file; name the grid's file, e.g. --out {tmp}/grid.png"),
    ("", "--out '' is a folder, not a file; name the grid's file, e.g. --out grid.png"),
    ("{tmp}/notes.txt/grid.png", "--out {tmp}/notes.txt/grid.png: {tmp}/notes.txt is a file, not a folder; choose another --out"),
    ("{tmp}/grids/", "--out '{tmp}/grids/' is a folder, not a file; name the grid's file, e.g. --out {tmp}/grids/grid.png"),
])
def test_sample_refuses_an_out_that_cannot_be_the_grids_file(out, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--prompt", PROMPT, "--out", out.format(tmp=tmp_path)]) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("sspo: error:")] == [f"sspo: error: {message.format(tmp=tmp_path)}"]
    assert snapshot(tmp_path) == before


def test_sample_takes_the_smallest_allowed_flags(quick_base, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", quick_base, "--prompt", PROMPT, "--steps", "1", "--rows", "1", "--guidance-scale", "0", "--out", str(out)]) == 0
    assert out.is_file()


# ------------------------------------------------------------------------------------------------
# What the fuzz test found, one reproducer each, so that none comes back unnoticed.


def one_clear_error(outcome: Outcome) -> None:
    assert outcome.code == 2 and output_problems(outcome) == [], outcome.err


@pytest.mark.parametrize("value", ["[", "%x", "!!python/object:os.system", "="])
def test_an_override_value_that_is_not_yaml_is_one_error(value, tmp_path, capsys):
    one_clear_error(run_cli(["train", str(DEMO), f"beta={value}", f"output_dir={tmp_path / 'run'}", "--dry-run"], capsys))


def test_an_integer_too_large_for_a_float_key_is_one_error(tmp_path, capsys):
    one_clear_error(run_cli(["train", str(DEMO), "optim.weight_decay=1" + "0" * 400, f"output_dir={tmp_path / 'run'}", "--dry-run"], capsys))


def test_a_refused_resume_without_its_pool_folder_leaves_the_folder_as_it_was(stash, quick_base, capsys):
    run = restore(stash, ("run",)) / "run"
    shutil.rmtree(run / "pool")
    before = snapshot(run)
    one_clear_error(run_cli(["train", str(DEMO), *tiny_overrides(run, quick_base), *FINISHED, "--resume"], capsys))
    assert snapshot(run) == before


def test_a_resume_writes_no_log_the_run_did_not_keep(stash, quick_base, capsys):
    run = restore(stash, ("run",)) / "run"
    before = snapshot(run)
    assert run_cli(["train", str(DEMO), *tiny_overrides(run, quick_base), *FINISHED, "--resume"], capsys).code == 0
    assert snapshot(run).keys() == before.keys()


@pytest.mark.parametrize("name", ["shapes-base:nope", "moving-shapes-base:nope"])
def test_the_dry_run_refuses_an_unknown_shapes_base_size(name, tmp_path, capsys):
    one_clear_error(run_cli(["train", str(DEMO), f"model.pretrained={name}", f"output_dir={tmp_path / 'run'}", "--dry-run"], capsys))


@pytest.mark.parametrize("name", ["shapes-basement", "shapes-base-v2", "moving-shapes-base2"])
def test_a_name_that_only_starts_like_a_base_is_not_that_base(name, tmp_path, monkeypatch):
    from sspo.errors import ConfigError
    from sspo.worlds.names import resolve_model
    from sspo.worlds.registry import base_world

    assert base_world(name) is None
    with pytest.raises(ConfigError, match="is neither a folder nor a world's base; did you mean"):
        resolve_model(name)  # no folder, no hub id ("org/name"): a misspelt base
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    assert resolve_model(name) == name  # a folder of that name is loaded (or refused) as such


def test_an_override_without_equals_after_an_option_is_named_alone(tmp_path, capsys):
    outcome = run_cli(["train", str(DEMO), "--dry-run", f"output_dir={tmp_path / 'run'}", "beta"], capsys)
    one_clear_error(outcome)
    assert "output_dir" not in message_lines(outcome.err)[0]


def test_overrides_before_the_config_name_say_it_comes_first(tmp_path, capsys):
    outcome = run_cli(["train", "beta=5", "demo-shapes", "--dry-run"], capsys)
    one_clear_error(outcome)
    assert message_lines(outcome.err)[0] == "sspo: error: the config name comes before the overrides: sspo train demo-shapes beta=5 ..."


def test_an_override_given_twice_is_said_and_the_last_one_used(tmp_path, capsys):
    outcome = run_cli(["train", "demo-shapes", "optim.learning_rate=1e-3", "--dry-run", f"output_dir={tmp_path / 'run'}",
                       "optim.learning_rate=2e-3"], capsys)
    assert outcome.code == 0
    assert ("override optim.learning_rate is given twice (optim.learning_rate=1e-3, then optim.learning_rate=2e-3): "
            "the last one is used") in outcome.err


def test_a_config_file_that_is_not_yaml_is_one_error_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("method: sspo\ndata:\n  source: shapes\n}\n")
    one_clear_error(run_cli(["train", str(config), f"output_dir={tmp_path / 'run'}", "--dry-run"], capsys))


def test_a_config_file_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xcc\xff\x00method: sspo\n")
    one_clear_error(run_cli(["train", str(config), f"output_dir={tmp_path / 'run'}", "--dry-run"], capsys))


def test_an_eval_rerun_refused_for_a_damaged_manifest_changes_nothing(stash, quick_base, capsys):
    work = restore(stash, ("eval",))
    (work / "eval" / "images" / "base" / "0-1.png").unlink()
    (work / "eval" / "images" / "tuned" / "manifest.json").write_text("")
    before = snapshot(work)
    one_clear_error(run_cli(eval_argv(quick_base, stash / "run" / "final", work / "eval"), capsys))
    assert snapshot(work) == before
