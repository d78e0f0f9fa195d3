"""``scripts/bench-evaluators``: a table of each world evaluator's rate."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench-evaluators"


def test_prints_a_rate_for_each_worlds_evaluator():
    done = subprocess.run([sys.executable, str(SCRIPT), "--images", "3", "--clips", "2", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {m[1]: (m[2], float(m[3])) for m in re.finditer(r"^\| ([\w-]+) \| (\d+ \w+) \| [\d.]+ \| (\d+) \|$", done.stdout, re.M)}
    assert {name: samples for name, (samples, _) in rows.items()} == {"shapes": "3 images", "moving-shapes": "2 clips"}
    assert all(rate > 0 for _, rate in rows.values())
