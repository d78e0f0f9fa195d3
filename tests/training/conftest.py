from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def finished_run(quick_base, tmp_path_factory) -> Path:
    """A tiny SSPO run (2 iterations of 2 steps, a state saved after each; its pool holds 3
    checkpoints), trained once for every test that reads it: copy it before changing it."""
    from sspo.training.trainer import train

    from test_trainer import tiny_config

    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(run, quick_base))
    return run

