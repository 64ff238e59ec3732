"""An adapter saved under one dependency set loads under another with identical logits, in both directions.

``scripts/test.sh`` runs the suite on the newest releases and on the floor set, pointing PEFT_DEPTH_CROSS_PYTHON at
the other set's interpreter; run alone, the other interpreter is this one (still a separate, fresh process).
"""

import os
import subprocess
import sys
from pathlib import Path

from cross_version import check, save

TESTS = Path(__file__).parent


def _run_other(command: str, folder: Path) -> subprocess.CompletedProcess:
    python = os.environ.get("PEFT_DEPTH_CROSS_PYTHON") or sys.executable
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [python, str(TESTS / "cross_version.py"), command, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_adapters_saved_here_load_in_the_other_set_with_identical_logits(tmp_path):
    save(tmp_path)
    result = _run_other("check", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical logits" in result.stdout


def test_adapters_saved_in_the_other_set_load_here_with_identical_logits(tmp_path):
    result = _run_other("save", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert check(tmp_path) == []
