"""Score a causal LM (a ``PeftModel`` included) with EleutherAI's lm-evaluation-harness, in-process and offline.

The task configs are the YAML files in ``lm_eval_tasks/``: each renders ``peft_depth.tasks``' prompt for one task
with lm-eval's own templating, over a local JSON-lines file of the test rows that this module writes and points
``dataset_kwargs.data_files`` at. The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)``: no
download, no second copy of the weights. Accuracy is lm-eval's ``acc`` (the choice with the highest summed
log-likelihood), the same rule as ``peft_depth.tasks.multiple_choice_accuracy``.

Two places where lm-eval and ``multiple_choice_accuracy`` may legitimately differ on the same prompts:

- lm-eval tokenizes context + continuation together and splits the ids where the context's tokens end; ours
  tokenizes prompt and choice separately. The ids differ only if a BPE merge crosses the boundary.
- lm-eval runs the model without an attention mask on right-padded batches sorted longest first; ours passes the
  mask and sorts shortest first. A plain causal LM ignores right padding either way (up to float round-off between
  batch shapes), but a method whose routing pools over the batch (MoLEx ``batch_vote``) sees different batches, and
  lm-eval's padding tokens, so its predictions can differ.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["LmEvalScore", "lm_eval_available", "task_config", "lm_eval_score", "export_rows", "TASK_DIR"]

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
#: Fields each task's YAML reads, per harness task name; "label" is derived for BoolQ (its rows carry "answer").
_JSONL_TASK = "jsonl_choice"


@dataclass(frozen=True)
class LmEvalScore:
    """lm-eval's accuracy, and per test row (in the given order) whether it was right and each choice's log-lik."""

    accuracy: float
    correct: list[bool]
    loglikelihoods: list[list[float]]


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _yaml_name(task: str) -> str:
    return _JSONL_TASK if task.startswith("jsonl:") else task


def task_config(task: str, data_file: str | Path) -> dict[str, Any]:
    """The task's lm-eval config (from its YAML) reading the test rows from ``data_file``."""
    path = TASK_DIR / f"{_yaml_name(task)}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))
        raise ValueError(f"No lm-eval task config for {task!r} (shipped: {shipped}).")
    config = yaml.safe_load(path.read_text())
    config["dataset_kwargs"] = {"data_files": {config["test_split"]: str(data_file)}}
    return config


def export_rows(task: str, rows: list[dict[str, Any]], folder: str | Path) -> Path:
    """Write the test rows as JSON lines in the fields the task's YAML reads; returns the file."""
    path = Path(folder) / f"{_yaml_name(task)}_test.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            row = dict(row)
            if task == "boolq":
                row["label"] = int(bool(row["answer"]))
            handle.write(json.dumps(row) + "\n")
    return path


def _ambient_autocast_dtype(model):
    """The autocast dtype the caller runs under on the model's device, or None.

    Why: lm-eval wraps every forward in its own ``torch.autocast(..., enabled=mixed_precision_dtype is not None)``,
    which switches a caller's autocast *off*; handing it the caller's dtype keeps scoring in the caller's arithmetic
    (a bf16-mixed run is scored as it trained).
    """
    import torch

    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def lm_eval_score(model, tokenizer, task: str, rows: list[dict[str, Any]], batch_size: int = 16) -> LmEvalScore:
    """lm-eval's zero-shot accuracy of ``model`` on ``rows`` of ``task``, plus per-row results, computed under the
    caller's autocast if one is active (lm-eval's own autocast would otherwise turn it off)."""
    if not lm_eval_available():
        raise ImportError(
            "Scoring with lm-evaluation-harness needs `lm-eval`: pip install 'peft-depth[eval]' (or lm-eval)."
        )
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        add_bos_token=False,
        mixed_precision_dtype=_ambient_autocast_dtype(model),
    )
    with tempfile.TemporaryDirectory(prefix="quality-lm-eval-") as folder:
        config = task_config(task, export_rows(task, rows, folder))
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[config],
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    model.train(was_training)
    name = config["task"]
    samples = sorted(results["samples"][name], key=lambda sample: sample["doc_id"])
    if len(samples) != len(rows):
        raise RuntimeError(f"lm-eval scored {len(samples)} of {len(rows)} rows of {task!r}.")
    loglikelihoods = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
    correct = [bool(sample["acc"]) for sample in samples]
    return LmEvalScore(float(results["results"][name]["acc,none"]), correct, loglikelihoods)
