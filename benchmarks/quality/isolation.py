"""Each run of a sweep in a fresh process that runs the code the sweep started with.

Why a process per run: a long-lived sweep process grew to 9-12 GB over a dozen SmolLM2 runs (each run allocates and
frees gigabytes of weights, activations and logits, and the allocator keeps much of it), until two shards and a
scoring job together were killed for memory on a 24 GB machine. A child process per run hands everything back when it
exits, and a run that dies takes only itself down. Starting a child (imports, model load) costs seconds; a run costs
minutes.

Why a code snapshot: a sweep is credited to the commit it started from (``provenance.git_state``, read once), so its
runs must execute that code even when the working tree is edited or committed while it runs. The children import
``peft_depth`` and the harness from a copy taken when the sweep starts (put first on their ``PYTHONPATH``), and
are handed the parent's git state.

    python -m quality.isolation JOB   # the child's entry point (JOB: a pickled run, written by execute_in_child)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CodeSnapshot", "execute_in_child", "retry_when_killed"]


class CodeSnapshot:
    """A copy of the ``peft_depth`` package and of this harness, taken now; ``paths`` go first on a child's path."""

    def __init__(self) -> None:
        import peft_depth

        self._folder = tempfile.TemporaryDirectory(prefix="quality-code-")
        root = Path(self._folder.name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(Path(peft_depth.__file__).resolve().parent, root / "src" / "peft_depth", ignore=ignore)
        shutil.copytree(Path(__file__).resolve().parent, root / "harness" / "quality", ignore=ignore)
        self.paths = [str(root / "harness"), str(root / "src")]

    def close(self) -> None:
        self._folder.cleanup()


#: Exit codes of a child killed by SIGKILL (the kernel's out-of-memory killer sends it).
KILLED = (-9, 137)


def retry_when_killed(launch: Callable[[], int], attempts: int = 3, wait_s: float = 60.0) -> int:
    """``launch()`` (a child's exit code) again, up to ``attempts`` times in all, while the child was killed.

    Why: a SmolLM2 run at 8 × 320 tokens peaks near 10 GB (the 49k-word logits, their float32 copies and gradients),
    so two shards' peaks can meet on a 24 GB machine, and the kernel then kills the larger child. Peaks last seconds:
    the same run started again a minute later passes, and an unattended sweep keeps going. Any other failure is
    returned at once (it would fail again)."""
    code = launch()
    for _ in range(attempts - 1):
        if code not in KILLED:
            break
        print(f"quality: a run's process was killed (exit {code}), probably for memory; retrying in {wait_s:.0f} s")
        time.sleep(wait_s)
        code = launch()
    return code


def execute_in_child(
    request: Any,
    ledger: str | Path,
    adapters_dir: str | Path | None,
    trained_by: dict[str, dict[str, Any]] | None,
    snapshot: CodeSnapshot,
) -> dict[str, Any]:
    """``runner.execute`` of ``request`` in a child process running ``snapshot``'s code, with this process's torch
    thread count and git state; returns the record the child appended to ``ledger``."""
    import torch

    from .provenance import git_state

    with tempfile.TemporaryDirectory(prefix="quality-run-") as scratch:
        job, out = Path(scratch) / "job.pkl", Path(scratch) / "record.json"
        job.write_bytes(
            pickle.dumps(
                {
                    "request": request,
                    "ledger": str(ledger),
                    "adapters_dir": None if adapters_dir is None else str(adapters_dir),
                    "trained_by": trained_by,
                    "threads": torch.get_num_threads(),
                    "git_state": git_state(),
                    "out": str(out),
                }
            )
        )
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(snapshot.paths + inherited)}
        code = retry_when_killed(
            lambda: subprocess.run([sys.executable, "-m", "quality.isolation", str(job)], env=env).returncode
        )
        if code != 0 or not out.is_file():
            reason = " (killed: out of memory?)" if code in KILLED else ""
            raise RuntimeError(
                f"The run of arm {request.arm.name!r} (lr {request.lr:g}, seed {request.seed}, {request.split}) failed "
                f"in its own process with exit code {code}{reason}; its output is above. The ledger holds every run "
                "finished before it: rerun the sweep to resume."
            )
        return json.loads(out.read_text())


def _child(job_path: str) -> None:
    import torch

    from .ledger import to_jsonable
    from .provenance import pin_git_state
    from .runner import execute

    job = pickle.loads(Path(job_path).read_bytes())
    torch.set_num_threads(job["threads"])
    pin_git_state(job["git_state"])
    record = execute(job["request"], job["ledger"], job["adapters_dir"], job["trained_by"])
    Path(job["out"]).write_text(json.dumps(to_jsonable(record)))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _child(sys.argv[1])
