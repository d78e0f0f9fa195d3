"""Installing sspo keeps the torch a user already has (a CUDA build of another version, say)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_keeps_an_installed_torch_of_another_version(tmp_path):
    # A torch 2.11.0 distribution (metadata only) placed first on the path stands in for a
    # user's CUDA build; pip's plan for `pip install -e .` must not replace it.
    dist = tmp_path / "site" / "torch-2.11.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    (dist / "RECORD").write_text("")
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet", "--report", str(report), "-e", str(ROOT)],
        env=env, check=True, capture_output=True, cwd=tmp_path,
    )
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert planned.keys() == {"sspo"}, f"pip would also install {planned}"
