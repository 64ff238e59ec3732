"""The untrained base model's test accuracy, scored as the suite scores its arms (same rows, scorer and precision).

A method comparison says whether an arm beats LoRA; it does not say whether either learned anything the base model
did not already know. The base decoder answers multiple-choice prompts zero-shot, so its score is the floor an arm
must clear to have been worth training (the majority class is the other floor, see ``stats.clears_majority``). An
encoder's classifier head is new and random, so encoders have no base score.

Records go to their own ledger, ``<suite>-base.jsonl``, one per (model, task data, scorer, precision), so a running
sweep's ledger never sees them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import TaskSplits, load_splits
from .ledger import append_record, read_records, run_key
from .models import CAUSAL, ModelSpec, load_model, load_tokenizer, run_device
from .provenance import git_state, hardware, model_device, versions
from .runner import LM_EVAL
from .train_causal import compute_precision

if TYPE_CHECKING:  # sweep.py imports the runner, as this module does; only the type is needed here
    from .sweep import Suite

__all__ = ["base_ledger_path", "base_accuracies", "score_base", "run_base"]

#: Fields of a base record (checked on append, as the sweep's ledger does).
_BASE_FIELDS = ("base_key", "suite", "model", "task", "split", "scorer", "precision", "split_fingerprint", "accuracy")


def base_ledger_path(suite: str, results: Path) -> Path:
    return Path(results) / f"{suite}-base.jsonl"


def _base_key(spec: ModelSpec, task: str, splits: TaskSplits, scorer: str, precision: str) -> str:
    return run_key({"model": spec.name, "task": task, "data": splits.fingerprint, "scorer": scorer, "p": precision})


def _require_decoder(spec: ModelSpec) -> None:
    if spec.family != CAUSAL:
        raise ValueError(f"{spec.name} is an encoder: its classifier head is untrained, so it has no base score.")


def score_base(suite: Suite, spec: ModelSpec, task: str, splits: TaskSplits) -> dict[str, Any]:
    """Score the base model on ``task``'s test split with the suite's test scorer and precision; returns a record."""
    _require_decoder(spec)
    settings = suite.settings_for(task)
    start = time.perf_counter()
    model, tokenizer = load_model(spec).to(run_device()).eval(), load_tokenizer(spec)
    with compute_precision(settings):
        if suite.test_scorer == LM_EVAL:
            from .lm_eval_scorer import lm_eval_score

            result = lm_eval_score(model, tokenizer, task, splits.test, suite.eval_batch_size)
            accuracy, correct = result.accuracy, "".join("1" if c else "0" for c in result.correct)
        else:
            from peft_depth.tasks import multiple_choice_accuracy

            from .data import choice_examples

            examples = choice_examples(task, splits.test)
            accuracy = multiple_choice_accuracy(model, tokenizer, examples, batch_size=suite.eval_batch_size)
            correct = None
    return {
        "base_key": _base_key(spec, task, splits, suite.test_scorer, settings.precision),
        "suite": suite.name,
        "model": spec.name,
        "task": task,
        "split": "test",
        "scorer": suite.test_scorer,
        "precision": settings.precision,
        "eval_batch_size": suite.eval_batch_size,
        "split_sizes": splits.sizes,
        "split_fingerprint": splits.fingerprint,
        "accuracy": accuracy,
        "correct": correct,
        "wall_s": time.perf_counter() - start,
        "hardware": hardware(model_device(model)),
        "versions": versions(),
        **git_state(),
    }


def run_base(suite: Suite, spec: ModelSpec, results: Path, splits_of=load_splits) -> list[dict[str, Any]]:
    """Score the base on every task of the suite not yet in ``<suite>-base.jsonl``; returns the new records."""
    _require_decoder(spec)  # before any data is read
    path = base_ledger_path(suite.name, results)
    done = {record["base_key"] for record in read_records(path)}
    new = []
    for task in suite.tasks:
        splits = splits_of(task)
        key = _base_key(spec, task, splits, suite.test_scorer, suite.settings_for(task).precision)
        if key in done:
            continue
        record = score_base(suite, spec, task, splits)
        append_record(path, record, required=_BASE_FIELDS)
        new.append(record)
    return new


def base_accuracies(records: list[dict[str, Any]], tests: list[dict[str, Any]]) -> dict[str, float]:
    """task -> the base accuracy that matches the suite's test records (same data, scorer and precision; the latest
    such record). Tasks whose base was scored differently from their test runs are left out, never mixed."""
    wanted = {(t["task"], t["split_fingerprint"], t["scorer"], t.get("precision") or "fp32") for t in tests}
    found: dict[str, float] = {}
    for record in records:
        if (record["task"], record["split_fingerprint"], record["scorer"], record["precision"]) in wanted:
            found[record["task"]] = record["accuracy"]
    return found
