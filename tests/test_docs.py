"""The repository's text holds: every reference points inside it (a clone has no dangling links),
and every command of the README runs."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sspo.config import find_config

# The tiny scorer models of the scorer tests stand in for the README's reward-model weights.
sys.path.insert(0, str(Path(__file__).parent / "scorers"))
from scorer_models import (  # noqa: E402,F401
    EMBED,
    bert_tokenizer_dir,
    clip_model_dir,
    clip_processor_dir,
    hps_checkpoint,
    imagereward_dir,
    linear_mlp_state_dict,
)

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)")  # markdown link targets


def text_files() -> list[Path]:
    """The project's own text: the README, docs, package, configs and tests."""
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("docs", "sspo", "configs", "tests"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".md", ".py", ".yaml") and "__pycache__" not in p.parts]
    return files


def test_no_link_or_citation_points_outside_the_repository():
    outside = []
    for path in text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if "SPEC.md" in text and path.name != "test_docs.py":
            outside.append(f"{path.relative_to(ROOT)}: cites SPEC.md")
        for target in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if ROOT not in resolved.parents and resolved != ROOT:
                outside.append(f"{path.relative_to(ROOT)}: links {target}")
    assert outside == []


def test_method_doc_cites_the_paper():
    text = (ROOT / "docs" / "method.md").read_text()
    assert "2410.05255" in text and all(f"eq. {n}" in text for n in (2, 8, 9))


def test_reliability_doc_names_tests_that_exist():
    cases = re.findall(r"\[(tests/[\w/]+\.py)::(\w+)\]", (ROOT / "docs" / "reliability.md").read_text())
    assert len(cases) >= 30
    missing = [f"{file}::{name}" for file, name in cases if f"def {name}(" not in (ROOT / file).read_text()]
    assert missing == []


# --------------------------------------------------------------------------------------------------
# Every command of the README's ```bash blocks runs, in the README's order, in an empty folder, as
# written up to one mechanical rewrite that puts it on CI's budget (quick_version). Not run: the
# commands that make, or are, the environment these tests run in (ENVIRONMENT).

README = ROOT / "README.md"
ENVIRONMENT = [
    ["python3", "-m", "venv", ".venv"],
    [".", ".venv/bin/activate"],
    ["pip", "install", "-e", ".[test]", "torch==2.13.0"],
    ["python", "-m", "pytest", "-n", "2", "-q"],
]
# Run settings that shrink any training config to seconds (the README's models and sizes, tiny).
TINY_RUN = [
    "report_to=none", "iterations=1", "steps_per_iteration=2", "optim.batch_size=2", "optim.gradient_accumulation_steps=1",
    "negatives.steps=2", "negatives.batch_size=4", "validation.every_iterations=0",
]


def commands(markdown: Path) -> list[list[str]]:
    """The commands of ``markdown``'s bash blocks, as argument lists: continued lines joined, comments
    dropped, ``a && b`` two commands."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                found.append(words[:end])
                words = words[end + 1 :]
    return found


def quick_version(words: list[str], stand_ins: dict[str, str]) -> list[str]:
    """``words`` as this test runs them: the mechanical rewrite that puts a README command on CI's budget.

    - a path outside the repository (``/models/sd15``, ``/weights/...``, also as ``KEY=PATH``) -> a
      tiny stand-in of the same format (``stand_ins``); ``shapes-base`` -> ``shapes-base:quick``;
    - ``sspo demo`` -> ``sspo demo --quick``;
    - ``sspo train CONFIG`` -> CONFIG's model replaced by the quick base and, unless it is the shapes
      world's, its data by ``stand_ins["dataset"]``; fp32 (bf16 autocast on a CPU is slow or
      missing); plus ``TINY_RUN``;
    - ``sspo eval`` -> 2 sampler steps, the first prompt of each category (``--limit 1``);
    - ``accelerate launch --config_file <GPU config>`` -> accelerate's launcher on the CPU, one process.
    """
    stand_ins = {"shapes-base": "shapes-base:quick", **stand_ins}

    def stand_in(word: str) -> str:
        key, eq, value = word.rpartition("=")
        return f"{key}={stand_ins[value]}" if eq and value in stand_ins else stand_ins.get(word, word)

    words = [stand_in(w) for w in words]
    if words[:2] == ["accelerate", "launch"]:
        assert words[2] == "--config_file" and words[4:6] == ["-m", "sspo"], words
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "sspo"]
        return launch + quick_version(["sspo", *words[6:]], stand_ins)[1:]
    assert words[0] == "sspo", words
    if words[1] == "demo":
        return [*words, "--quick"]
    if words[1] == "train":
        config = yaml.safe_load(find_config(words[2]).read_text())
        quick = ["model.pretrained=shapes-base:quick", "data.resolution=32", "mixed_precision=no"]
        if config["data"]["source"] != "shapes":
            quick.append(f"data.path={stand_ins['dataset']}")
        return [*words[:3], *quick, *TINY_RUN, *words[3:]]
    if words[1] == "eval":
        if "--steps" in words:
            words[words.index("--steps") + 1] = "2"
        return [*words, "--limit", "1"]
    raise AssertionError(f"no quick version of README command {shlex.join(words)}: add one to quick_version")


def test_the_readme_commands_not_run_here_are_still_its_setup_and_test_commands():
    assert [c for c in ENVIRONMENT if c not in commands(README)] == []


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty folder, as the README's commands expect it: the repository's configs/ at hand."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_readme_command(words: list[str], stand_ins: dict[str, str], workspace: Path) -> None:
    from sspo.cli import main

    quick = quick_version(words, stand_ins)
    if quick[0] == "sspo":
        assert main(quick[1:]) == 0, shlex.join(quick)
    else:
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(quick, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{shlex.join(quick)}\n{done.stderr[-3000:]}"


def test_the_readme_demo_runs(quick_base, workspace):
    [demo] = [c for c in commands(README) if c[:2] == ["sspo", "demo"]]
    run_readme_command(demo, {}, workspace)
    assert (workspace / "runs" / "demo" / "results.md").is_file()


def test_every_other_readme_command_runs_in_order(quick_base, workspace, clip_model_dir, clip_processor_dir, hps_checkpoint,
                                                   imagereward_dir, bert_tokenizer_dir):
    from sspo.io import write_parquet
    from sspo.worlds.shapes.world import make_split, preference_pairs

    # What the README's real-model commands assume on disk, in the same formats, tiny.
    aesthetic = workspace / "stand-ins" / "sac+logos+ava1-l14-linearMSE.pth"
    aesthetic.parent.mkdir()
    torch.save(linear_mlp_state_dict(torch.Generator().manual_seed(0), EMBED), aesthetic)
    (workspace / "PartiPrompts.tsv").write_text("Prompt\tCategory\na large red circle on the left, white background\tshapes\n")
    stand_ins = {
        "/models/sd15": "shapes-base:quick",
        "/weights/PickScore_v1": str(clip_model_dir), "/weights/CLIP-ViT-H-14": str(clip_processor_dir),
        "/weights/HPS_v2_compressed.pt": str(hps_checkpoint[0]),
        "/weights/ImageReward": str(imagereward_dir), "/weights/bert-base-uncased": str(bert_tokenizer_dir),
        "/weights/sac+logos+ava1-l14-linearMSE.pth": str(aesthetic), "/weights/clip-vit-large-patch14": str(clip_model_dir),
        "dataset": str(write_parquet(workspace / "stand-ins" / "pairs.parquet", preference_pairs(make_split().train[:8], per_spec=1, seed=0))),
    }
    ran = []
    for words in commands(README):
        if words in ENVIRONMENT or words[:2] == ["sspo", "demo"]:
            continue
        run_readme_command(words, stand_ins, workspace)
        ran.append(words[:2])
    assert ran and (workspace / "runs" / "eval-shapes" / "summary.md").is_file() and (workspace / "runs" / "eval-parti" / "summary.md").is_file()
