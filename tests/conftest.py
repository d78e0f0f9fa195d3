import os
import signal
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and OpenMP threads spinning against other
# processes (xdist workers, anything else on a small machine) slow them down by orders of magnitude.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("SSPO_GPU_TESTS_ON_CPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu-check --smoke runs it on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def quick_base() -> str:
    """The quick-size shapes-world base pipeline (built once, cached in $SSPO_CACHE)."""
    from sspo.worlds.shapes.base_model import BaseConfig, build_base

    return str(build_base(BaseConfig.preset("quick")))


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    """Four shapes-world preference pairs as a parquet file: the data of the model families' and configs' tests."""
    from sspo.io import write_parquet
    from sspo.worlds.shapes.world import make_split, preference_pairs

    return write_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", preference_pairs(make_split().train[:4], per_spec=1, seed=0))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    """A tiny offline StableDiffusion3Pipeline (two CLIPs, no T5), built once per session."""
    from tiny_pipelines import build_sd3_pipeline

    return str(build_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline"))


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A hub at the discard port (nothing listens) and offline mode off."""
    from huggingface_hub import constants

    from sspo.models import pipeline

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    forget = pipeline.hub_reachable.cache_clear
    forget()
    yield
    forget()


@pytest.fixture
def bf16_runs():
    """For tests that train in bf16 (the rest of the suite trains in fp32): accelerate keeps the
    first run's mixed precision process-wide, so start from, and leave, a fresh state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture
def fails_rather_than_hangs():
    """The test fails at 20 s instead of hanging, as a read from a FIFO nobody writes would (SIGALRM
    interrupts the blocked open)."""
    def stop(*_):
        raise TimeoutError("still running after 20 s: blocked")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
