import functools
import os

import pytest

from sspo.commands.parallel import run_all
from sspo.errors import SSPOError
from sspo.io import DamagedFileError


def threads_and_bars(value):
    import torch

    return value, torch.get_num_threads(), os.environ.get("TQDM_DISABLE")


def fails(value):
    if value == 2:
        raise DamagedFileError("the index /x is damaged (empty)", "delete it")
    return value


def test_tasks_run_in_one_thread_workers_without_bars_and_return_in_order():
    results = run_all([functools.partial(threads_and_bars, v) for v in range(5)], jobs=2, desc="test")
    assert results == [(v, 1, "1") for v in range(5)]
    assert "TQDM_DISABLE" not in os.environ or os.environ["TQDM_DISABLE"] != "1"  # the caller's environment is restored


def test_one_job_runs_here():
    results = run_all([functools.partial(threads_and_bars, v) for v in range(2)], jobs=1, desc="test")
    assert [r[0] for r in results] == [0, 1] and results[0][2] == os.environ.get("TQDM_DISABLE")


def test_a_worker_s_user_error_arrives_with_its_message():
    with pytest.raises(SSPOError, match=r"^the index /x is damaged \(empty\); delete it$"):
        run_all([functools.partial(fails, v) for v in range(4)], jobs=2, desc="test")
