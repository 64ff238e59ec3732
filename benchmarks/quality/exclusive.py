"""One process at a time on this machine for a memory-heavy phase of a run (a file lock that every shard shares).

Why: lm-eval's scoring of BoolQ's 2,000 test rows peaks at 12-15 GB per run (batches of long passages, each with its
49k-word logits), against about 10 GB for training. Two shards scoring at once on a 24 GB machine were killed for
memory four times in one session. Taking turns changes no number (each run scores alone as before); it only keeps
the two peaks apart. The kernel releases a ``flock`` when its holder exits, so a killed run never leaves the lock held.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["one_at_a_time"]


@contextmanager
def one_at_a_time(name: str, folder: str | Path | None = None) -> Iterator[None]:
    """Runs the block while holding the machine-wide lock ``name``; another process asking for it waits."""
    path = Path(folder or tempfile.gettempdir()) / f"peft-depth-quality-{name}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
