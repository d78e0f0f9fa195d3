import functools
import os

import pytest

from sspo.commands.parallel import run_all
from sspo.errors import SSPOError
from sspo.io import DamagedFileError


def threads_and_bars(value):
    import torch
    from tqdm.auto import tqdm

    with tqdm(total=1, disable=False) as bar:  # as sspo's bars are made: disable given
        return value, torch.get_num_threads(), bar.disable


def fails(value):
    if value == 2:
        raise DamagedFileError("the index /x is damaged (empty)", "delete it")
    return value


def test_tasks_run_in_one_thread_workers_without_bars_and_return_in_order():
    threads = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    results = run_all([functools.partial(threads_and_bars, v) for v in range(5)], jobs=2, desc="test")
    assert results == [(v, 1, True) for v in range(5)]
    assert {key: os.environ.get(key) for key in threads} == threads  # the caller's environment is restored


def test_one_job_runs_here():
    results = run_all([functools.partial(threads_and_bars, v) for v in range(2)], jobs=1, desc="test")
    assert [r[0] for r in results] == [0, 1] and results[0][2] is False


def test_a_worker_s_user_error_arrives_with_its_message():
    with pytest.raises(SSPOError, match=r"^the index /x is damaged \(empty\); delete it$"):
        run_all([functools.partial(fails, v) for v in range(4)], jobs=2, desc="test")
