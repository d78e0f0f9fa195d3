import signal
import subprocess
import sys

import pytest

from sspo.training import faults

PROGRAM = "from sspo.training.faults import fault_point\nfor i in range(5):\n    fault_point('step')\n    print(i, flush=True)\n"


def _run(env_value):
    env = {"PATH": "", faults.ENV: env_value} if env_value else {"PATH": ""}
    return subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env)


def test_kills_on_the_nth_visit_of_the_named_point():
    proc = _run("step:3")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["0", "1"]


def test_other_points_and_no_setting_run_through():
    assert _run("pool_write:1").stdout.split() == ["0", "1", "2", "3", "4"]
    assert _run(None).returncode == 0


@pytest.mark.parametrize("value", ["step", "step:0", "nowhere:2", "step:x"])
def test_bad_settings_name_the_expected_form(value):
    with pytest.raises(ValueError, match="expected <point>:<n>"):
        faults.parse(value)
