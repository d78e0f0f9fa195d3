import functools
import logging
import os
import sys
from pathlib import Path

import pytest

from sspo.commands.parallel import run_all
from sspo.errors import SSPOError
from sspo.io import DamagedFileError
from sspo.logs import BarSafeHandler, UserFormatter


def threads_and_bars(value):
    import torch
    from tqdm.auto import tqdm

    with tqdm(total=1, disable=False) as bar:  # as sspo's bars are made: disable given
        return value, torch.get_num_threads(), bar.disable


def fails(value):
    if value == 2:
        raise DamagedFileError("the index /x is damaged (empty)", "delete it")
    return value


def warns(value):
    import warnings

    logging.getLogger("sspo.test_parallel").warning("a worker's warning %d", value)
    warnings.warn(f"a worker's Python warning {value}", UserWarning, stacklevel=1)
    return value


def test_a_worker_s_warnings_are_printed_above_the_bar_not_inside_its_line(capfd, caplog):
    handler = BarSafeHandler(sys.stderr)
    handler.setFormatter(UserFormatter())
    logger = logging.getLogger("sspo.test_parallel")
    logger.addHandler(handler)
    try:
        assert run_all([functools.partial(warns, v) for v in range(2)], jobs=2, desc="test") == [0, 1]
    finally:
        logger.removeHandler(handler)
    printed = capfd.readouterr().err
    for value in range(2):
        at = printed.index(f"sspo: warning: a worker's warning {value}\n")
        assert printed[at - 1] in "\r\n", printed  # the bar's line was cleared first
        assert any(f"a worker's Python warning {value}" in r.getMessage() for r in caplog.records if r.name == "py.warnings")


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


ORPHANED = """
import functools, os, sys
from sspo.commands.parallel import run_all

run_all([functools.partial(os.system, f"echo $PPID >> {sys.argv[1]}; sleep 30")] * 2, jobs=2, desc="test")
"""


def test_workers_leave_when_their_parent_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    pids = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED, str(pids)], start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p) for p in pids.read_text().split()]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, workers))
