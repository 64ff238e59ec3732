"""An adapter saved under one dependency set loads under another with identical logits, in both directions.

``scripts/test.sh`` runs the suite on the newest releases and on the floor set, pointing PEFT_DEPTH_CROSS_PYTHON at
the other set's interpreter; run alone, the other interpreter is this one (still a separate, fresh process).
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cross_version import check, save

TESTS = Path(__file__).parent
# the packages whose versions the two dependency sets differ in (constraints/floor.txt)
VERSIONED = ("transformers", "peft", "trl", "accelerate", "huggingface-hub", "datasets")


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


def test_the_other_interpreter_is_another_dependency_set():
    """Under scripts/test.sh the two tests above cross dependency sets only if the other interpreter really has other
    versions; a misconfigured PEFT_DEPTH_CROSS_PYTHON would turn them into same-version round trips unnoticed."""
    other = os.environ.get("PEFT_DEPTH_CROSS_PYTHON")
    if not other:
        pytest.skip("PEFT_DEPTH_CROSS_PYTHON is unset: the tests above load in a fresh process of this interpreter")
    code = f"import importlib.metadata as m; print([m.version(p) for p in {VERSIONED!r}])"
    result = subprocess.run([other, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    here = [importlib.metadata.version(p) for p in VERSIONED]
    assert result.stdout.strip() != str(here), f"{other} has the same versions as this interpreter: {here}"
