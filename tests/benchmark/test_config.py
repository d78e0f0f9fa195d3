"""``sspo bench``'s arm configs: the realistic setting's scale."""

from sspo.benchmark.config import BenchConfig, train_config


def test_realistic_sets_the_scale_and_explicit_flags_win(tmp_path):
    b = BenchConfig(model="quick", realistic=True, overrides=("optim.batch_size=2",))
    assert train_config(b, "sspo-pregenerated", tmp_path).optim.batch_size == 2  # an explicit override wins
    b = BenchConfig(model="quick", realistic=True, overrides=("negatives.batch_size=48",))
    cfg = train_config(b, "sspo-pregenerated", tmp_path)
    negatives = cfg.steps_per_iteration * cfg.optim.batch_size
    assert cfg.optim.batch_size >= 8 and negatives >= 64 and negatives >= b.pool_size * 48
    assert (cfg.steps_per_iteration - 1) * cfg.optim.batch_size < max(64, b.pool_size * 48)  # the smallest such K_updates
    assert train_config(BenchConfig(model="quick", realistic=True, steps_per_iteration=7), "dpo", tmp_path).steps_per_iteration == 7
