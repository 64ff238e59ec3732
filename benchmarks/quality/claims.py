"""Which sweep process runs which (task, arm) group: the group is claimed when a process starts it.

Shards split a task's arms by their run counts (``sweep.shard_of_arms``), but the work left is rarely split as evenly:
an arm's dev runs may be in the ledger already, a DLO run costs twice a LoRA run, a killed shard leaves its groups
half done. So a shard runs its own groups first and then takes over any group no live process has started. A claim is
a file holding the claimer's process id, created under a lock; a claim whose process is gone (killed mid-group) is
taken over, and the ledger makes the newcomer skip every run already recorded.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["claims_folder", "claim_group"]


def claims_folder(ledger: Path) -> Path:
    return ledger.with_name(f".{ledger.stem}.claims")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def claim_group(folder: Path, task: str, arm: str) -> Iterator[bool]:
    """Claim (task, arm) for this process while the block runs; yields False (and claims nothing) when another live
    process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task}--{arm}")
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # check-and-claim is one step for every process sharing the ledger
        owner = _owner(path)
        claimed = owner is None or owner == os.getpid() or not _alive(owner)
        if claimed:
            path.write_text(str(os.getpid()))
    try:
        yield claimed
    finally:
        if claimed and _owner(path) == os.getpid():
            path.unlink(missing_ok=True)
