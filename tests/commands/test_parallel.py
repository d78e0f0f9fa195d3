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


STOPPED_ALONE = """
import functools, os, signal, sys, threading, time
from sspo.commands.parallel import run_all

threading.Timer(float(sys.argv[1]), lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # this process only, as kill -INT sends it
try:
    run_all([functools.partial(time.sleep, 120)] * 3, jobs=2, desc="test")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_ctrl_c_sent_to_the_parent_alone_stops_the_workers_runs_at_once():
    import signal
    import subprocess
    import sys
    import time

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STOPPED_ALONE, "8"], capture_output=True, text=True, timeout=100,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.stdout.strip() == "interrupted", done.stderr
    assert time.monotonic() - started < 40  # not the 120 s of the runs under way
    assert "Traceback" not in done.stderr
