"""Which sweep process runs which (task, arm) group: the group is claimed when a process starts it.

Shards split a task's arms by their run counts (``sweep.shard_of_arms``), but the work left is rarely split as evenly:
an arm's dev runs may be in the ledger already, a DLO run costs twice a LoRA run, a killed shard leaves its groups
half done. So a shard runs its own groups first and then takes over any group no live process has started. A claim is
a file the claimer holds an exclusive ``flock`` on for as long as it runs the group (the file also names its process
id, for people). The kernel drops the lock when the process dies, so a claim whose process is gone (killed mid-group)
is taken over, and the ledger makes the newcomer skip every run already recorded. A process id alone could not tell:
ids are reused, and a claim left by a killed process would have been honoured for whatever process got its id.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["claims_folder", "claim_group", "claim_holder"]


def claims_folder(ledger: Path) -> Path:
    return ledger.with_name(f".{ledger.stem}.claims")


def _claim_path(folder: Path, task: str, arm: str) -> Path:
    return folder / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task}--{arm}")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # Taking a claim and giving one up (unlink, then unlock) are each one step for every process sharing the ledger:
    # otherwise a process could lock a claim file another one has just unlinked while a third creates a new one.
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def claim_holder(folder: Path, task: str, arm: str) -> int | None:
    """The process id written in the group's claim file (None: no claim, or unreadable)."""
    try:
        return int(_claim_path(folder, task, arm).read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def claim_group(folder: Path, task: str, arm: str) -> Iterator[bool]:
    """Claim (task, arm) for this process while the block runs; yields False (and claims nothing) when a live
    process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _claim_path(folder, task, arm)
    with _folder_lock(folder):
        descriptor: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process holds it
            os.close(descriptor)
            descriptor = None
        else:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, str(os.getpid()).encode())
    try:
        yield descriptor is not None
    finally:
        if descriptor is not None:
            with _folder_lock(folder):
                path.unlink(missing_ok=True)
                os.close(descriptor)
