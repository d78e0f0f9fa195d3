import os

import pytest
import torch

# Two pytest-xdist workers on two cores: one intra-op thread each, or OpenMP threads fight.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quick_base() -> str:
    """The quick-size shapes-world base pipeline (built once, cached in $SSPO_CACHE)."""
    from sspo.base import BaseConfig, build_base

    return str(build_base(BaseConfig.preset("quick")))
