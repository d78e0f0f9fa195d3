import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sspo.commands.eval as bench_eval
import sspo.evaluation.evaluate
from sspo.cli import main
from sspo.commands.eval import ModelSpec, model_specs, run_eval
from sspo.evaluation.evaluate import EvalConfig

# The tiny random CLIP builders of the scorer tests (a module, not a conftest, so it can be imported).
from scorer_models import clip_model_dir, clip_processor_dir  # noqa: E402,F401


def _argv(base, clip_model_dir, clip_processor_dir, out):
    return [
        "eval", "--model", base, "--name", "base", "--model", base, "--name", "again",
        "--prompts", "shapes", "--prompts-per-split", "2", "--seeds", "0", "--steps", "2", "--batch-size", "3",
        "--metrics", "shapes,pickscore", "--scorer-path", f"pickscore={clip_model_dir}",
        "--scorer-option", f"pickscore.processor={clip_processor_dir}", "--out", str(out),
    ]


@pytest.fixture(scope="module")
def first_run(quick_base, clip_model_dir, clip_processor_dir, tmp_path_factory):
    """Two names for the quick base, 4 shapes prompts (2 seen, 2 held out), 1 seed, shapes + tiny PickScore, via the CLI."""
    out = tmp_path_factory.mktemp("eval")
    assert main(_argv(quick_base, clip_model_dir, clip_processor_dir, out)) == 0
    return out


def _rows(out):
    with (out / "scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_writes_images_scores_summary_and_plots(first_run):
    out = first_run
    for name in ("base", "again"):
        pngs = sorted(p.name for p in (out / "images" / name).glob("*.png"))
        assert len(pngs) == 4 and all(p.endswith("-0.png") for p in pngs)
    rows = _rows(out)
    shapes_parts = ["shapes.background", "shapes.color", "shapes.shape", "shapes.size", "shapes.position"]  # the shapes metric's components
    assert list(rows[0])[:7] == ["model", "prompt_set", "category", "prompt_index", "seed", "prompt", "shapes"]
    assert set(shapes_parts) < set(list(rows[0])[7:-1]) and list(rows[0])[-1] == "pickscore"
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "again"}
    assert [r["category"] for r in rows[:4]] == ["seen", "seen", "heldout", "heldout"]
    assert all(0 <= float(r["shapes"]) <= 1 for r in rows)
    # Same weights, same seeds: the two names must score identically image for image.
    by_key = {(r["model"], r["prompt_index"]): (r["shapes"], r["pickscore"]) for r in rows}
    assert all(by_key[("base", i)] == by_key[("again", i)] for _, i in by_key)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["shapes", "pickscore"] and summary["n_prompts"] == 4
    assert summary["columns"][0] == "shapes" and "shapes.color" in summary["columns"]
    stats = summary["results"]["base"]
    assert list(stats) == ["all", "seen", "heldout"]
    for group, n in (("all", 4), ("seen", 2), ("heldout", 2)):
        assert set(stats[group]["pickscore"]) == {"mean", "ci95_low", "ci95_high", "n"} and stats[group]["pickscore"]["n"] == n
        low, high = stats[group]["pickscore"]["ci95_low"], stats[group]["pickscore"]["ci95_high"]
        assert low <= stats[group]["pickscore"]["mean"] <= high
    md = (out / "summary.md").read_text()
    assert "## seen (2 prompts)" in md and "## heldout (2 prompts)" in md and "| model | shapes | shapes." in md and "| pickscore |" in md
    assert "| base |" in md and "| again |" in md and "±" in md

    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 96 and grid.height >= 2 * 96
    assert Image.open(out / "reward_hist.png").width > 400


def test_rerun_reuses_images_and_scores(first_run, quick_base, clip_model_dir, clip_processor_dir, monkeypatch):
    out = first_run
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    before = _rows(out)

    def no_generation(*args, **kwargs):
        raise AssertionError("an image on disk was generated again")

    def no_scorer(*args, **kwargs):
        raise AssertionError("a cached score was computed again")

    monkeypatch.setattr(bench_eval, "generate", no_generation)
    monkeypatch.setattr(sspo.evaluation.evaluate, "build_scorer", no_scorer)
    assert main(_argv(quick_base, clip_model_dir, clip_processor_dir, out)) == 0
    assert _rows(out) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes

    # A new seed generates and scores only its own images.
    monkeypatch.undo()
    calls = []
    real = bench_eval.generate

    def counting(pipe, prompts, seeds, **kwargs):
        calls.extend(seeds)
        return real(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(bench_eval, "generate", counting)
    run_eval([ModelSpec("base", quick_base)], EvalConfig(metrics=("shapes",), seeds=(0, 1), steps=2, batch_size=3, prompts_per_split=2), out)
    assert sorted(calls) == [1, 1, 1, 1]
    rows = _rows(out)
    assert [r["model"] for r in rows] == ["base"] * 8 + ["again"] * 4  # this call's rows first, the others' kept
    assert [r for r in rows if r["model"] == "again"] == [r for r in before if r["model"] == "again"]
    assert [r["shapes"] for r in rows if r["model"] == "base" and r["seed"] == "0"] == [r["shapes"] for r in before if r["model"] == "base"]
    # pickscore was not asked for: the cached scores stay, the new seed's are empty
    base = [r for r in rows if r["model"] == "base"]
    assert [r["pickscore"] for r in base if r["seed"] == "0"] == [r["pickscore"] for r in before if r["model"] == "base"]
    assert [r["pickscore"] for r in base if r["seed"] == "1"] == [""] * 4


def test_other_settings_in_the_same_folder_are_an_error(first_run, quick_base):
    with pytest.raises(bench_eval.SSPOError, match="other settings.*steps: 2 -> 3"):
        run_eval([ModelSpec("base", quick_base)], EvalConfig(metrics=("shapes",), seeds=(0,), steps=3, prompts_per_split=2), first_run)


def test_a_model_retrained_into_the_same_folder_is_not_served_stale_images(quick_base, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(quick_base, tmp_path / "model")
    cfg = EvalConfig(metrics=("shapes",), seeds=(0,), steps=2, prompts_per_split=2)
    run_eval([ModelSpec("mine", str(model))], cfg, tmp_path / "eval")
    weights = next((model / "unet").glob("*.safetensors"))
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)  # trained on
    with pytest.raises(bench_eval.SSPOError, match=r"images made with other settings \(the model's or LoRA's weight files, rewritten since the images were made\)"):
        run_eval([ModelSpec("mine", str(model))], cfg, tmp_path / "eval")


def test_weights_or_options_of_a_metric_not_computed_are_a_warning(quick_base, tmp_path, caplog):
    cfg = EvalConfig(metrics=("shapes",), seeds=(0,), steps=1, prompts_per_split=1)
    with caplog.at_level("WARNING", logger="sspo"):
        summary = run_eval([ModelSpec("base", quick_base)], cfg, tmp_path / "eval", scorer_options={"pickscore": {"processor": "x"}})
    assert "--scorer-path / --scorer-option given for pickscore, which is not among the metrics computed (shapes): ignored" in caplog.text
    assert summary["metrics"] == ["shapes"]


def test_prompt_file_with_categories_and_a_limit(quick_base, tmp_path):
    prompts = {
        "red": ["a large red circle on the left, white background", "a small red square at the top, black background"],
        "blue": ["a large blue diamond on the right, gray background", "a small blue triangle at the bottom, white background"],
    }
    (tmp_path / "mine.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    summary = run_eval([ModelSpec("base", quick_base)], EvalConfig(prompts=str(tmp_path / "mine.json"), metrics=("shapes",), seeds=(3,), steps=2, limit=1, grid_prompts=5), out)
    assert summary["prompt_set"] == "mine.json" and summary["n_prompts"] == 2
    assert list(summary["results"]["base"]) == ["all", "red", "blue"]
    assert sorted(p.name for p in (out / "images" / "base").glob("*.png")) == ["0-3.png", "2-3.png"]
    assert [r["prompt_index"] for r in _rows(out)] == ["0", "2"]
    assert json.loads((out / "summary.json").read_text())["results"]["base"]["red"]["shapes"]["ci95_low"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "shapes", "--metrics", "shapes,pickscor"], "got 'pickscor', expected one of 'pickscore', 'hpsv2'"),
        (["--prompts", "nope"], "unknown prompt set 'nope'"),
        (["--prompts", "shapes", "--lora", "a", "--lora", "b"], "1 --model but 2 --lora"),
        (["--prompts", "shapes", "--scorer-path", "pickscore"], "--scorer-path takes METRIC=PATH"),
        (["--prompts", "shapes", "--seeds", "0,x"], "--seeds takes comma-separated integers"),
        (["--prompts", "shapes", "--metrics", "pickscore", "--scorer-path", "pickscore=/nonexistent/ps"], "no such file or folder: /nonexistent/ps"),
        (["--prompts", "parti", "--metrics", "shapes", "--prompt-source", "{prompts}"], "metric 'shapes' scores its world's prompts only (use --prompts shapes)"),
        (["--prompts", "shapes", "--limit", "0"], "--limit: got 0, expected an integer >= 1"),
        (["--prompts", "shapes", "--lora", "{missing}"], "does not exist; pass a LoRA folder (a run's final/) or its .safetensors file"),
        (["--prompts", "shapes", "--metrics", "shapes", "--scorer-path", "shapes=p.txt"], "metric 'shapes' is its world's exact evaluator and loads no weights"),
        (["--prompts", "shapes", "--metrics", "shapes", "--scorer-option", "shapes.x=1"], "metric 'shapes' takes no option 'x'; its only option is batch_size"),
    ],
)
def test_bad_arguments_are_one_clear_error(extra, message, quick_base, tmp_path, capsys):
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nan astronaut riding a horse\tPeople\n")
    extra = [a.format(prompts=tmp_path / "parti.tsv", missing=tmp_path / "no-lora") for a in extra]
    assert main(["eval", "--model", quick_base, "--out", str(tmp_path / "e"), *extra]) == 2
    err = capsys.readouterr().err
    assert "sspo: error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()  # refused before anything was made


def test_a_resolution_the_model_cannot_take_is_one_error_before_anything_is_written(tiny_sd3, tmp_path, capsys):
    # The tiny SD3 takes sides up to 64 px (its position embedding's 8 patches of 2 latent pixels, its VAE's 4).
    assert main(["eval", "--model", tiny_sd3, "--prompts", "shapes", "--metrics", "shapes", "--limit", "1", "--steps", "1",
                 "--resolution", "72", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "sspo: error: --resolution: sd3's position embedding covers image sides up to 64 px, not 72x72" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "images").exists()


def test_a_second_eval_into_a_folder_being_written_is_refused(quick_base, tmp_path, capsys):
    from filelock import FileLock

    from sspo.paths import build_lock

    out = tmp_path / "e"
    with FileLock(build_lock(out)):  # as another sspo eval into --out holds it
        assert main(["eval", "--model", quick_base, "--limit", "1", "--steps", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"sspo: error: --out {out} is being written by another sspo eval right now; "
                                               "wait for it to end, or choose another --out")
    assert not out.exists()
    assert main(["eval", "--model", quick_base, "--limit", "1", "--steps", "1", "--out", str(out)]) == 0  # once it has ended


def test_model_specs_names_and_loras():
    specs = model_specs(["m", "m"], ["none", "runs/x/final"])
    assert specs == [ModelSpec("m", "m"), ModelSpec("m + runs/x/final", "m", "runs/x/final")]
    assert specs[1].folder == "m_+_runs_x_final"
    with pytest.raises(bench_eval.SSPOError, match="share the name 'm'"):
        model_specs(["m", "m"])


def test_a_video_model_is_scored_clip_by_clip_and_kept_for_resume(tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--model", "moving-shapes-base:quick", "--name", "video", "--prompts", "moving-shapes", "--prompts-per-split", "1",
            "--seeds", "0", "--steps", "2", "--metrics", "moving-shapes", "--out", str(out)]
    assert main(argv) == 0
    clips = sorted((out / "images" / "video").glob("*.tiff"))
    assert len(clips) == 2 and not list((out / "images" / "video").glob("*.png"))
    from sspo.video_io import decode_clip

    assert decode_clip(clips[0]).shape == (8, 32, 32, 3)
    rows = _rows(out)
    assert len(rows) == 2 and all(0 <= float(r["moving-shapes"]) <= 1 and r["moving-shapes.direction"] != "" for r in rows)
    assert Image.open(out / "grid.png").width > 0
    mtimes = {p: p.stat().st_mtime_ns for p in clips}
    assert main(argv) == 0  # resumed: nothing generated again
    assert {p: p.stat().st_mtime_ns for p in clips} == mtimes


def test_a_clip_metric_on_an_image_model_is_a_clear_error(quick_base, tmp_path, capsys):
    argv = ["eval", "--model", quick_base, "--name", "image", "--prompts", "moving-shapes", "--prompts-per-split", "1", "--seeds", "0", "--steps", "2",
            "--metrics", "moving-shapes", "--out", str(tmp_path / "eval")]
    assert main(argv) == 2
    assert "metric 'moving-shapes' scores clips, but model 'image' makes images: pick an image metric" in capsys.readouterr().err


# --- re-runs add to the folder; damaged files are named or made again -----------------------------


def _shapes_argv(base, out, models=("a", "b"), seeds="0"):
    names = [arg for name in models for arg in ("--model", base, "--name", name)]
    return ["eval", *names, "--prompts", "shapes", "--prompts-per-split", "2", "--seeds", seeds, "--steps", "2", "--metrics", "shapes", "--out", str(out)]


@pytest.fixture(scope="module")
def shapes_eval(quick_base, tmp_path_factory):
    """Models "a" and "b" (both the quick base), 4 shapes prompts, seed 0, the shapes metric."""
    out = tmp_path_factory.mktemp("shapes-eval") / "eval"
    assert main(_shapes_argv(quick_base, out)) == 0
    return out


@pytest.fixture
def eval_copy(shapes_eval, tmp_path):
    import shutil

    return Path(shutil.copytree(shapes_eval, tmp_path / "eval"))


def _files(folder, *skip):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def test_a_rerun_with_fewer_models_and_other_seeds_keeps_every_other_row(eval_copy, quick_base):
    before = _rows(eval_copy)
    assert main(_shapes_argv(quick_base, eval_copy, models=("a",), seeds="1")) == 0
    rows = _rows(eval_copy)
    assert [(r["model"], r["seed"]) for r in rows] == [("a", "1")] * 4 + [("a", "0")] * 4 + [("b", "0")] * 4
    assert rows[4:] == before  # model b's rows and model a's seed-0 rows, as they were
    summary = json.loads((eval_copy / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["a"] and list(summary["results"]) == ["a"] and summary["seeds"] == [1]
    assert main(_shapes_argv(quick_base, eval_copy, models=("b",))) == 0
    assert {(r["model"], r["seed"]) for r in _rows(eval_copy)} == {("a", "1"), ("a", "0"), ("b", "0")}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(b"\x00\xffgarbage")


@pytest.mark.parametrize("damage", [_truncate, _garbage, Path.unlink], ids=["truncated", "garbage", "deleted"])
def test_a_damaged_sample_is_generated_again_and_scored_again(damage, eval_copy, quick_base, caplog):
    sample = eval_copy / "images" / "a" / "1-0.png"
    pixels = np.asarray(Image.open(sample))
    before, files = _rows(eval_copy), _files(eval_copy / "images", "1-0.png")
    damage(sample)
    assert main(_shapes_argv(quick_base, eval_copy)) == 0
    assert np.array_equal(np.asarray(Image.open(sample)), pixels)
    assert _rows(eval_copy) == before and _files(eval_copy / "images", "1-0.png") == files
    if damage is not Path.unlink:
        assert f"sample {sample} is damaged" in caplog.text and "generating it again" in caplog.text


def _a_list(path):
    path.write_text("[1, 2]")


def _without_prompts(path):
    record = json.loads(path.read_text())
    del record["prompts"]
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "not valid JSON (cut short?)"), (_garbage, "not UTF-8 text at byte 1"), (_a_list, "the top level is a list, not a mapping"),
    (_without_prompts, "prompts is missing"),
], ids=["truncated", "garbage", "a list", "no prompts"])
def test_a_damaged_image_manifest_is_named_and_nothing_changes(damage, problem, eval_copy, quick_base, capsys):
    manifest = eval_copy / "images" / "b" / "manifest.json"
    damage(manifest)
    files = _files(eval_copy)
    capsys.readouterr()
    assert main(_shapes_argv(quick_base, eval_copy)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sspo: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"sspo: error: the image manifest {manifest} is damaged ({problem}")
    assert lines[0].endswith("delete that folder to generate them again, or use another --out") and str(manifest.parent) in lines[0]
    assert _files(eval_copy) == files


def _cut_inside_a_row(path):
    text = path.read_text()
    path.write_text(text[: text.index("\n", len(text) // 2) - 5])


def _garbage_row(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_bytes("".join(lines[:3]).encode() + b"\xff\x00,,garbage\r\n" + "".join(lines[3:]).encode())


def _not_a_number(path):
    rows = path.read_text().splitlines(keepends=True)
    fields = rows[2].split(",")
    fields[6] = "0.5x"  # the shapes column
    path.write_text("".join([*rows[:2], ",".join(fields), *rows[3:]]))


@pytest.mark.parametrize("file, damage", [
    ("scores.csv", _cut_inside_a_row), ("scores.csv", _garbage_row), ("scores.csv", _not_a_number), ("scores.csv", _garbage),
    ("scorers.json", _garbage), ("scorers.json", _a_list),
], ids=["scores cut", "scores garbage row", "scores not a number", "scores garbage", "scorers garbage", "scorers a list"])
def test_damaged_cached_scores_are_computed_again(file, damage, eval_copy, quick_base, monkeypatch):
    before, images = _rows(eval_copy), _files(eval_copy / "images")
    record = (eval_copy / "scorers.json").read_text()
    damage(eval_copy / file)
    monkeypatch.setattr(bench_eval, "generate", lambda *a, **k: pytest.fail("an intact image was generated again"))
    assert main(_shapes_argv(quick_base, eval_copy)) == 0
    assert _rows(eval_copy) == before and _files(eval_copy / "images") == images
    assert (eval_copy / "scorers.json").read_text() == record


def test_a_video_eval_rerun_keeps_the_other_models_rows(tmp_path):
    from sspo.video_io import write_clip

    clip = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "prompts.txt").write_text("a red square turning green\na blue square growing\n")
    for folder, names in (("ref", ["0", "1"]), ("x", ["0-0", "1-0"]), ("y", ["0-0", "1-0"])):
        for k, name in enumerate(names):
            write_clip(tmp_path / folder / f"{name}.tiff", clip + 40 * k + (20 if folder == "y" else 0))

    def videos(*models):
        names = [arg for m in models for arg in ("--videos", str(tmp_path / m), "--name", m)]
        return ["eval", *names, "--reference-videos", str(tmp_path / "ref"), "--prompts", str(tmp_path / "prompts.txt"),
                "--seeds", "0", "--metrics", "psnr", "--out", str(tmp_path / "out")]

    assert main(videos("x", "y")) == 0
    scores = tmp_path / "out" / "video_scores.csv"
    with scores.open(newline="") as f:
        before = list(csv.DictReader(f))
    assert main(videos("x")) == 0
    with scores.open(newline="") as f:
        assert list(csv.DictReader(f)) == before
    assert list(json.loads((tmp_path / "out" / "video_summary.json").read_text())["results"]) == ["x"]


def test_eval_statistics_are_over_prompts_each_the_mean_of_its_seeds():
    from sspo.commands.eval import stats_by_category
    from sspo.evaluation.scorers.stats import mean_ci

    rows = [{"model": "m", "category": None, "prompt_index": p, "seed": s, "r": v} for p, s, v in [(0, 0, 1.0), (0, 1, 3.0), (1, 0, 5.0), (1, 1, 9.0)]]
    assert stats_by_category(rows, [ModelSpec("m", "x")], ["r"])["m"]["all"]["r"] == mean_ci([2.0, 7.0])  # not over the 4 images
