"""``sspo bench``'s arm configs: the realistic setting's scale, and the model it names."""

import pytest

from sspo.benchmark.config import BenchConfig, train_config
from sspo.errors import ConfigError


def test_realistic_sets_the_scale_and_explicit_flags_win(tmp_path):
    b = BenchConfig(model="quick", realistic=True, overrides=("optim.batch_size=2",))
    assert train_config(b, "sspo-pregenerated", tmp_path).optim.batch_size == 2  # an explicit override wins
    b = BenchConfig(model="quick", realistic=True, overrides=("negatives.batch_size=48",))
    cfg = train_config(b, "sspo-pregenerated", tmp_path)
    negatives = cfg.steps_per_iteration * cfg.optim.batch_size
    assert cfg.optim.batch_size >= 8 and negatives >= 64 and negatives >= b.pool_size * 48
    assert (cfg.steps_per_iteration - 1) * cfg.optim.batch_size < max(64, b.pool_size * 48)  # the smallest such K_updates
    assert train_config(BenchConfig(model="quick", realistic=True, steps_per_iteration=7), "dpo", tmp_path).steps_per_iteration == 7


def test_a_folder_that_is_not_a_pipeline_is_refused_as_the_model(tmp_path):
    (tmp_path / "run").mkdir()  # a training run's folder, say: no model_index.json
    (tmp_path / "run" / "config.yaml").write_text("method: sspo\n")
    with pytest.raises(ConfigError, match=r"'model': got '.*run': expected one of .* or a diffusers pipeline folder \(one holding model_index.json\)"):
        BenchConfig(model=str(tmp_path / "run"))


def test_the_world_base_names_other_commands_take_name_the_tiny_models():
    assert BenchConfig(model="shapes-base").model == "tiny" and BenchConfig(model="shapes-base:quick").model == "quick"
