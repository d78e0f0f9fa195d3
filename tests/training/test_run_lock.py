import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sspo.errors import ConfigError
from sspo.training.run_lock import RunLock

HOLD = textwrap.dedent(
    """
    import sys, time
    from sspo.training.run_lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()  # held while referenced
    print("held", flush=True)
    time.sleep(60)
    """
)


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_held_folder_is_refused_with_the_holders_pid(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"in use by a running sspo train \(pid {proc.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RunLock(tmp_path) as lock:
        assert lock.holder() == str(os.getpid())


def test_released_lock_can_be_taken_again_and_leaves_no_file(tmp_path):
    RunLock(tmp_path).acquire().release()
    RunLock(tmp_path).acquire().release()
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match=r"cannot write output_dir .*file/run: .*; choose a folder you can write to"):
        RunLock(tmp_path / "file" / "run").acquire()


def test_a_linked_pid_file_is_replaced_not_written_through(tmp_path):
    (tmp_path / "notes.txt").write_text("a user's file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".sspo.pid").symlink_to(tmp_path / "notes.txt")
    with RunLock(run) as lock:
        assert lock.holder() == str(os.getpid())
    assert (tmp_path / "notes.txt").read_text() == "a user's file\n"
