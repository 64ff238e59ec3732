"""The machine-wide lock that keeps two sweep shards from scoring (their memory peak) at the same time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from quality.exclusive import one_at_a_time  # noqa: E402

HOLDER = """
import sys, time
sys.path.insert(0, {benchmarks!r})
from quality.exclusive import one_at_a_time
with one_at_a_time("test", {folder!r}):
    print(time.time(), flush=True)
    time.sleep({hold_s})
    print(time.time(), flush=True)
"""


def _holder(folder: Path, hold_s: float) -> subprocess.Popen:
    code = HOLDER.format(benchmarks=str(BENCHMARKS), folder=str(folder), hold_s=hold_s)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_two_processes_take_turns(tmp_path):
    holders = [_holder(tmp_path, 1.0) for _ in range(2)]
    spans = []
    for holder in holders:
        out, _ = holder.communicate(timeout=60)
        assert holder.returncode == 0
        spans.append([float(line) for line in out.split()])
    (first_in, first_out), (second_in, second_out) = sorted(spans)
    assert first_out - first_in >= 1.0 and second_out - second_in >= 1.0
    assert second_in >= first_out  # never inside the block together


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = _holder(tmp_path, 600.0)
    assert holder.stdout.readline()  # it holds the lock now
    entered = threading.Event()

    def enter():
        with one_at_a_time("test", tmp_path):
            entered.set()

    waiter = threading.Thread(target=enter, daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert not entered.is_set()  # it waits while the holder lives
    os.kill(holder.pid, signal.SIGKILL)  # what the kernel's out-of-memory killer sends
    holder.wait(timeout=30)
    assert entered.wait(timeout=30)
