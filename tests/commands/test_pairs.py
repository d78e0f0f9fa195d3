"""``sspo pairs``: G trained, its samples ranked into Pick-a-Pic-shaped pairs, end to end on the quick base."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sspo.cli import main
from sspo.commands.pairs import build_pairs
from sspo.config import load_config
from sspo.data.config import DataConfig
from sspo.data.dataset import load_dataset_from_config
from sspo.errors import SSPOError
from sspo.paths import CONFIGS
from sspo.training.config import TrainConfig
from sspo.worlds.pairs import PairsConfig
from sspo.worlds.shapes.evaluator import evaluate_batch
from sspo.worlds.shapes.world import parse_prompt

QUICK = PairsConfig(steps=2, base="shapes-base:quick", max_prompts=16)  # what `sspo pairs --quick` builds


@pytest.fixture(scope="module")
def quick_pairs(tmp_path_factory, quick_base) -> tuple:
    """`sspo pairs --quick` written to a folder: (folder, its stdout)."""
    folder = tmp_path_factory.mktemp("pairs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pairs", "--quick", "--out", str(folder)]) == 0
    return folder, out.getvalue()


def read_rows(folder) -> list[dict]:
    return pq.read_table(folder / "pairs.parquet").to_pylist()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# Built pairs (quick base)


def test_pairs_are_tie_free_and_their_winners_outscore_their_losers_on_the_exact_evaluator(quick_pairs):
    folder, stdout = quick_pairs
    rows = read_rows(folder)
    record = json.loads((folder / "pairs.json").read_text())
    assert rows and len(rows) == record["pairs"] == record["pairs_drawn"] - record["ties_dropped"]
    assert record["pairs_drawn"] == 16 and record["config"]["steps"] == 2
    labels = [row["label_0"] for row in rows]
    assert set(labels) <= {0.0, 1.0}
    winners, losers = [], []
    for row in rows:
        spec = parse_prompt(row["caption"])
        scores = [s.reward for s in evaluate_batch([png(row["jpg_0"]), png(row["jpg_1"])], [spec, spec])]
        assert scores == pytest.approx([row["reward_0"], row["reward_1"]])  # PNG is lossless: the stored rewards are the images'
        win, lose = (scores[0], scores[1]) if row["label_0"] == 1.0 else (scores[1], scores[0])
        assert win - lose >= 0.02
        winners.append(win)
        losers.append(lose)
    assert record["R_win_stored"] == pytest.approx(np.mean(winners)) and record["R_lose_stored"] == pytest.approx(np.mean(losers))
    assert all(0 < record[k] <= 1 for k in ("R_win", "R_lose", "R_base", "R_ceil"))
    assert "wrote" in stdout and f"R_win {record['R_win']:.3f}" in stdout


def test_the_printed_training_command_runs_from_any_folder(quick_pairs, tmp_path, monkeypatch, capsys):
    _, stdout = quick_pairs
    command = stdout.split("train on it: ")[1].split()
    assert command[:2] == ["sspo", "train"] and "model.pretrained=shapes-base:quick" in command  # the base --quick pairs were made from
    assert command[-1].startswith("output_dir=runs/shapes-pairs-")  # its own folder, not the config's default another run may hold
    monkeypatch.chdir(tmp_path)  # not a checkout: a shipped config is found by its name
    assert main([*command[1:], "--dry-run"]) == 0
    assert "config, data and model OK" in capsys.readouterr().out


def test_quick_pairs_of_a_level_do_not_claim_its_target(quick_base, tmp_path, capsys):
    assert main(["pairs", "--level", "mid", "--quick", "--out", str(tmp_path / "pairs")]) == 0
    assert "(level mid, --quick: a smoke test on the small base, not the level's pairs)" in capsys.readouterr().out
    record = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert record["level"] == "mid" and record["level_target_R_win"] is None


def test_pairs_are_deterministic_and_a_built_folder_is_reused(quick_pairs, tmp_path):
    folder, _ = quick_pairs
    again, record, reused = build_pairs(QUICK, tmp_path / "again")
    assert not reused
    assert read_rows(again) == read_rows(folder)
    assert record == json.loads((folder / "pairs.json").read_text())
    assert build_pairs(QUICK, folder)[2]  # same settings: nothing is sampled again


def test_pairs_load_through_the_parquet_source_and_dpo_trains_on_them(quick_pairs, quick_base, tmp_path):
    from sspo.training.trainer import train

    folder, _ = quick_pairs
    rows = read_rows(folder)
    dataset = load_dataset_from_config(DataConfig(source="parquet", path=str(folder / "pairs.parquet"), resolution=32))
    assert dataset.has_losers and len(dataset) == len(rows)
    item = dataset[0]
    winner = rows[0]["jpg_0"] if rows[0]["label_0"] == 1.0 else rows[0]["jpg_1"]
    assert np.allclose(item["winner"].permute(1, 2, 0).numpy(), png(winner) / 127.5 - 1, atol=1e-5)
    assert load_dataset_from_config(DataConfig(source="parquet", path=str(folder / "pairs.parquet"), resolution=32, mode="random")).has_losers
    cfg = load_config(TrainConfig, CONFIGS / "demo-shapes.yaml", [
        "method=dpo", f"model.pretrained={quick_base}", "data.source=parquet", f"data.path={folder / 'pairs.parquet'}",
        "iterations=1", "steps_per_iteration=2", "optim.batch_size=2", "validation.every_iterations=0", "report_to=none", f"output_dir={tmp_path / 'dpo'}",
    ])
    assert (train(cfg) / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["pairs"], "give one of --level, --steps or --sweep"),
    (["pairs", "--level", "mid", "--steps", "3"], "give one of --level, --steps or --sweep"),
    (["pairs", "--steps", "0", "--quick"], "must not be the model being trained"),
    (["pairs", "--steps", "3", "--tie-threshold", "-1", "--quick"], "--tie-threshold: got -1.0, expected a number in [0, 1)"),
])
def test_bad_pairs_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sspo: error:") and message in err and "\n" not in err


def test_a_build_stopped_before_its_record_is_built_again(quick_pairs, tmp_path):
    folder, _ = quick_pairs
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "pairs.building").write_text("{}")  # the build's mark, written first
    (stopped / "pairs.parquet").write_bytes((folder / "pairs.parquet").read_bytes())  # pairs.json is written last
    (stopped / ".pairs.json.x1y2z3a4.tmp").write_text("{")  # a killed write's temporary file
    again, record, reused = build_pairs(QUICK, stopped)
    assert not reused and record == json.loads((folder / "pairs.json").read_text())
    assert sorted(p.name for p in stopped.iterdir()) == ["pairs.json", "pairs.parquet"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pairs.parquet").write_bytes(b"my own pairs")  # no mark: not a stopped build's
    with pytest.raises(SSPOError, match="holds files that are not sspo pairs"):
        build_pairs(QUICK, mine)
    assert (mine / "pairs.parquet").read_bytes() == b"my own pairs"


def test_pairs_whose_parquet_is_not_the_recorded_one_are_built_again(quick_pairs, tmp_path, caplog):
    folder, _ = quick_pairs
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    whole = (damaged / "pairs.parquet").read_bytes()
    (damaged / "pairs.parquet").write_bytes(whole[: len(whole) // 2])  # cut short
    with caplog.at_level("WARNING"):
        _, record, reused = build_pairs(QUICK, damaged)
    assert not reused and "is not the file its pairs.json records" in caplog.text
    assert (damaged / "pairs.parquet").read_bytes() == whole and record == json.loads((folder / "pairs.json").read_text())


def test_built_pairs_leave_nothing_beside_their_folder(quick_pairs):
    folder, _ = quick_pairs
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name)] == [folder.name]


def test_a_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path, quick_base, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["pairs", "--quick", "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sspo: error:") and "not sspo pairs" in err and "\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"


def test_a_build_that_fails_leaves_no_folder_and_no_lock(tmp_path, quick_base, capsys):
    # No two of G's samples differ in reward by 0.999 (of at most 1): every pair is a tie, and the
    # build fails after G has sampled, where the folder used to be made already.
    assert main(["pairs", "--quick", "--tie-threshold", "0.999", "--out", str(tmp_path / "pairs")]) == 2
    err = capsys.readouterr().err.strip().rpartition("\r")[2]  # after G's progress bar
    assert err.startswith("sspo: error:") and "lower --tie-threshold" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Clips (the shipped moving-shapes base: the quick one's clips all score about 0, every pair a tie)


@pytest.fixture(scope="module")
def quick_clip_pairs(tmp_path_factory) -> tuple:
    """Clip pairs of 16 prompts from G after 2 SFT steps on the shipped video base: (folder, record)."""
    folder = tmp_path_factory.mktemp("clip-pairs") / "pairs"
    cfg = PairsConfig(steps=2, base="moving-shapes-base", max_prompts=16, sampler_steps=10)
    _, record, reused = build_pairs(cfg, folder)
    assert not reused
    return folder, record


def test_clip_pairs_hold_clips_whose_winners_outscore_their_losers_on_the_exact_evaluator(quick_clip_pairs):
    from sspo.video_io import read_clip
    from sspo.worlds.moving_shapes.evaluator import evaluate_clip

    folder, record = quick_clip_pairs
    rows = read_rows(folder)
    assert rows and len(rows) == record["pairs"] and record["pairs_drawn"] == 16
    assert set(rows[0]) == {"caption", "video_0", "video_1", "label_0", "reward_0", "reward_1"}
    for row in rows:
        clips = [read_clip(row[column], "pair") for column in ("video_0", "video_1")]
        assert all(clip.shape == (8, 32, 32, 3) for clip in clips)
        scores = [evaluate_clip(clip, row["caption"]).reward for clip in clips]
        assert scores == pytest.approx([row["reward_0"], row["reward_1"]])  # the clip bytes are lossless
        win, lose = scores if row["label_0"] == 1.0 else scores[::-1]
        assert win - lose >= 0.02
    assert all(0 <= record[k] <= 1 for k in ("R_win", "R_lose", "R_base", "R_ceil")) and record["R_win"] > record["R_lose"]


def test_clip_pairs_load_as_clips_and_sft_trains_on_their_winners(quick_clip_pairs, tmp_path):
    from sspo.training.trainer import train
    from sspo.worlds.names import resolve_model

    folder, _ = quick_clip_pairs
    path = folder / "pairs.parquet"
    data = DataConfig(source="parquet", path=str(path), resolution=32, frames=8, image_0_column="video_0", image_1_column="video_1")
    dataset = load_dataset_from_config(data)
    assert dataset.has_losers and len(dataset) == len(read_rows(folder)) and dataset[0]["winner"].shape == (8, 3, 32, 32)
    cfg = load_config(TrainConfig, CONFIGS / "demo-moving-shapes.yaml", [
        "method=sft", f"model.pretrained={resolve_model('moving-shapes-base:quick')}", "data.source=parquet", f"data.path={path}",
        "data.image_0_column=video_0", "data.image_1_column=video_1", "iterations=1", "steps_per_iteration=1", "optim.batch_size=2",
        "validation.every_iterations=0", "report_to=none", f"output_dir={tmp_path / 'sft'}",
    ])
    assert (train(cfg) / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["pairs", "--world", "moving-shapes", "--level", "low"], "--level low: world moving-shapes has levels mid"),
    (["pairs", "--world", "nowhere", "--level", "mid"], "unknown world 'nowhere'"),
    (["pairs", "--world", "nowhere"], "--world: unknown world 'nowhere'"),
    (["pairs", "--world", "moving-shapes", "--sweep", "0", "--max-prompts", "0"], "--max-prompts: got 0"),
])
def test_a_level_or_world_without_pairs_is_a_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sspo: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("quick_preset, base", [("quick", "shapes-base:quick"), ("64px", "shapes-base:64px"), (None, "shapes-base")])
def test_quick_pairs_sample_with_the_worlds_smaller_base(quick_preset, base, monkeypatch):
    import dataclasses

    from sspo.commands.pairs import pairs_config
    from sspo.worlds import WORLDS

    shapes = WORLDS["shapes"]
    monkeypatch.setitem(WORLDS, "shapes", dataclasses.replace(shapes, demo=dataclasses.replace(shapes.demo, quick_preset=quick_preset)))
    assert pairs_config("shapes", quick=True).base == base
    assert pairs_config("shapes").base == "shapes-base"


def test_the_cache_keys_of_g_and_its_pairs_stay_what_they_were():
    # Cached generators and pairs are found by these keys: a change rebuilds every user's cache. G trains
    # by SFT, so beta and the negatives' sampler (unset: its family's) and harmless keys leave them alone.
    from sspo.commands.pairs import generator_key, pairs_config, pairs_key

    cfg = pairs_config("shapes", steps=100)
    assert (generator_key(cfg), pairs_key(cfg)) == ("6194a8f6fb47", "44800ca78884")
