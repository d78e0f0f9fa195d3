"""The method table is the one place a method is defined: a new row trains, is carded, compared and benched."""

import json

import pytest

from sspo.benchmark.config import BenchConfig, arm_overrides
from sspo.commands import compare
from sspo.training.config import resolved
from sspo.training.losses import sft_loss, sspo_loss
from sspo.training.methods import METHODS, Method, register
from sspo.training.model_card import run_settings
from sspo.training.trainer import train

from test_trainer import metrics, tiny_config

LOSS_CALLS = []


def counted_sspo_loss(*args):
    LOSS_CALLS.append(args)
    return sspo_loss(*args)


THROWAWAY = Method("sspo_last_indicator", "SSPO against the latest checkpoint, indicator switch", uses_reference=True,
                   generates_negatives=True, needs_dataset_losers=False, loss=counted_sspo_loss, erd="last", ssr="indicator")


@pytest.fixture
def throwaway():
    register(THROWAWAY)
    yield THROWAWAY
    del METHODS[THROWAWAY.name]


def test_a_registered_method_trains_and_every_reader_knows_it(throwaway, quick_base, tmp_path):
    cfg = tiny_config(tmp_path / "run", quick_base, f"method={throwaway.name}", "iterations=3", "steps_per_iteration=1", "erd=uniform")
    LOSS_CALLS.clear()
    final = train(cfg)
    assert len(LOSS_CALLS) == 3  # the row's loss, once a step
    rows = metrics(tmp_path / "run")
    assert [r["pool_size"] for r in rows] == [1, 2, 3]
    assert [r["reference_checkpoint"] for r in rows] == [0, 1, 2]  # erd "last" wins over the config's uniform
    assert [call[5] for call in LOSS_CALLS] == ["indicator"] * 3  # the row's switch, not the config's
    assert throwaway.description in (final / "README.md").read_text()
    assert run_settings(resolved(cfg), 1)["reference"].startswith("pool checkpoint drawn 'last'")
    assert compare.arms()[throwaway.name] == [f"method={throwaway.name}"] and throwaway.name in compare.table1()
    assert f"{throwaway.name}-pregenerated" in arm_overrides()
    assert BenchConfig(arms=(f"{throwaway.name}-pregenerated",)).arms == (f"{throwaway.name}-pregenerated",)
    assert json.loads((tmp_path / "run" / "pool" / "pool.json").read_text())["entries"][-1]["step"] == 3


def test_an_inconsistent_row_is_refused():
    with pytest.raises(ValueError, match="reference"):
        register(Method("broken", "losers without a reference", uses_reference=False, generates_negatives=True, needs_dataset_losers=False, loss=sft_loss))
    assert "broken" not in METHODS
