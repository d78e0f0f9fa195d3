import dataclasses

import pytest

from sspo.training.config import TrainConfig
from sspo.training.run_state import HARMLESS_KEYS, _harmless, config_differences, disk_to_come, flatten, manifest, manifest_problems, saves_after


def test_result_changing_keys_are_named_and_harmless_ones_pass():
    saved = {"optim": {"learning_rate": 1e-3, "batch_size": 4}, "log_every": 1, "validation": {"seed": 0}, "iterations": 4}
    current = {"optim": {"learning_rate": 2e-3, "batch_size": 4}, "log_every": 10, "validation": {"seed": 3}, "iterations": 8}
    assert config_differences(saved, current) == ["optim.learning_rate: 0.001 -> 0.002"]


def test_the_negatives_sampler_and_its_steps_are_result_changing():
    saved = {"negatives": {"scheduler": "ddim", "steps": 20, "batch_size": 64}}
    current = {"negatives": {"scheduler": "dpm++", "steps": 8, "batch_size": 64}}
    assert config_differences(saved, current) == ["negatives.scheduler: 'ddim' -> 'dpm++'", "negatives.steps: 20 -> 8"]


def test_tuples_and_lists_compare_equal_and_new_keys_count():
    saved = {"model": {"lora_targets": ["to_q", "to_k"]}}
    assert config_differences(saved, {"model": {"lora_targets": ("to_q", "to_k")}}) == []
    assert config_differences(saved, {"model": {"lora_targets": ("to_q",)}}) == ["model.lora_targets: ['to_q', 'to_k'] -> ['to_q']"]
    assert config_differences({}, {"ssr_draws": 8}) == ["ssr_draws: None -> 8"]


def test_a_data_path_spelled_another_way_is_the_same_and_another_folder_is_not(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"data": {"path": "images"}, "model": {"pretrained": "images"}}
    for spelling in ("./images/", str(tmp_path / "images"), "other/../images"):
        assert config_differences(saved, {"data": {"path": spelling}, "model": {"pretrained": spelling}}) == []
    assert config_differences(saved, {"data": {"path": "other"}, "model": {"pretrained": "images"}}) == ["data.path: 'images' -> 'other'"]
    assert config_differences({"optim": {"seed": "./x"}}, {"optim": {"seed": "x"}}) == ["optim.seed: './x' -> 'x'"]  # only path keys


def test_manifest_detects_truncated_corrupted_and_missing_files(tmp_path):
    files = []
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / name).write_bytes(name.encode() * 100)
        files.append(tmp_path / name)
    recorded = manifest(tmp_path, files)
    assert manifest_problems(tmp_path, recorded) == []
    (tmp_path / "a.bin").write_bytes(b"a.bin" * 50)
    b = bytearray((tmp_path / "b.bin").read_bytes())
    b[7] ^= 1
    (tmp_path / "b.bin").write_bytes(bytes(b))
    (tmp_path / "c.bin").unlink()
    problems = manifest_problems(tmp_path, recorded)
    assert len(problems) == 3
    assert "a.bin has 250 bytes, 500 were saved (truncated?)" in problems[0]
    assert "b.bin differs from what was saved (corrupted)" in problems[1]
    assert "c.bin is missing" in problems[2]


def test_a_key_saved_before_it_existed_counts_as_its_default():
    defaults = {"negatives": {"fuse_lora": False, "steps": 20}}
    saved = {"negatives": {"steps": 20}}  # written before negatives.fuse_lora existed: it sampled unfused
    assert config_differences(saved, {"negatives": {"steps": 20, "fuse_lora": False}}, defaults) == []
    assert config_differences(saved, {"negatives": {"steps": 20, "fuse_lora": True}}, defaults) == ["negatives.fuse_lora: False -> True"]


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, "x"]
    return f"{value}x" if isinstance(value, str) else "x"


DEFAULTS = flatten(dataclasses.asdict(TrainConfig()))


@pytest.mark.parametrize("key", sorted(key for key in DEFAULTS if not _harmless(key)))
def test_every_key_but_the_harmless_ones_stops_a_resume(key):
    assert config_differences(DEFAULTS, {**DEFAULTS, key: _changed(DEFAULTS[key])}) == [f"{key}: {DEFAULTS[key]!r} -> {_changed(DEFAULTS[key])!r}"]


def test_the_harmless_keys_are_the_documented_ones():
    # docs/reliability.md lists them; another key there would let a resume change a result silently.
    assert set(HARMLESS_KEYS) == {"iterations", "output_dir", "report_to", "tracker_project", "tracker_run_name", "log_every", "save_every_steps",
                                  "checkpoints_total_limit", "validation", "diagnostics", "data.cache_dir", "data.num_workers", "data.prefetch_factor",
                                  "nonfinite", "model.gradient_checkpointing", "process_timeout_s"}


@pytest.mark.parametrize("step, total, per_iteration, every, expected", [
    (2, 8, 2, 0, (3, 3)),  # iteration ends 4, 6, 8
    (0, 8, 4, 3, (4, 2)),  # 3, 4 (an end), 6, 8 (an end)
    (4, 12, 4, 2, (4, 2)),  # 6, 8 (an end), 10, 12 (an end): 8 and 12 saved once
    (8, 8, 4, 3, (0, 0)),  # finished
])
def test_the_saves_still_to_come_count_each_step_once(step, total, per_iteration, every, expected):
    assert saves_after(step, total, per_iteration, every) == expected


@pytest.mark.parametrize("kept, saves_left, pool_adds_left, expected", [
    (1, 4, 2, 2 * 10 + 2 * 3),  # grows to the limit of 2, plus the one written before the oldest goes
    (1, 1, 1, 1 * 10 + 1 * 3),  # one more state, under the limit
    (2, 3, 3, 1 * 10 + 3 * 3),  # at the limit: one state more at a time
    (1, 0, 0, 0),
])
def test_the_disk_to_come_counts_pool_checkpoints_and_the_states_held_at_once(kept, saves_left, pool_adds_left, expected):
    assert disk_to_come(state_bytes=10, pool_bytes=3, kept=kept, limit=2, saves_left=saves_left, pool_adds_left=pool_adds_left) == expected
