"""The JSONL ledger of finished runs: stable run keys, crash-safe appends, and reading back what is done.

One line per (training run, scored split). A line is written only once the run's score exists, in a single
``write`` followed by ``fsync``, so a sweep killed at any moment leaves every complete line intact; a line cut short
by a kill during that write is skipped (with a warning) when read back, and the next append starts on a new line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_key", "record_key", "append_record", "read_records", "finished_keys", "to_jsonable"]

#: Fields every record carries (checked on append, so a record with a gap never reaches the ledger).
REQUIRED_FIELDS = (
    "run_key",
    "split",
    "scorer",
    "suite",
    "model",
    "task",
    "arm",
    "method",
    "config",
    "seed",
    "lr",
    "steps",
    "batch_size",
    "split_sizes",
    "split_fingerprint",
    "accuracy",
    "trainable_params",
    "train_flops",
    "train_wall_s",
    "hardware",
    "versions",
    "git_commit",
)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for configs: sets become sorted lists, enums their value, other objects their string."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))


def run_key(spec: Mapping[str, Any]) -> str:
    """A stable hash of everything that determines a training run (model, data, arm config, lr, seed, steps, ...)."""
    canonical = json.dumps(to_jsonable(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def record_key(run: str, split: str, scorer: str) -> str:
    """What one ledger line stands for: a training run scored on one split by one scorer."""
    return f"{run}/{split}:{scorer}"


def append_record(path: str | Path, record: Mapping[str, Any], required: Iterable[str] = REQUIRED_FIELDS) -> None:
    """Append one finished run as a JSON line; refuses a record that lacks a ``required`` field."""
    missing = [name for name in required if name not in record]
    if missing:
        raise ValueError(f"Run record lacks field(s) {missing}; nothing was written.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), sort_keys=True) + "\n"
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # shards of one sweep append to the same ledger
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a previous writer was killed mid-line: start a fresh line
                line = "\n" + line
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of the ledger (none if it does not exist); cut-off lines are skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(
                    f"{path}:{number} is not a complete JSON record (a run killed while writing); skipped.",
                    stacklevel=2,
                )
    return records


def finished_keys(records: Iterable[Mapping[str, Any]]) -> set[str]:
    return {record_key(r["run_key"], r["split"], r["scorer"]) for r in records}
