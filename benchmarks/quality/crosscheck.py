"""Cross-check: this repository's scorer (``peft_depth.tasks.multiple_choice_accuracy``) against
lm-evaluation-harness (``lm_eval_scorer``) on the same rows, per row.

Per row, our scorer is run on that row alone (its prediction cannot depend on other rows), and lm-eval scores all
rows in one call. The report counts rows where the two disagree, the accuracy of each (ours also batched, as the
sweep runs it), and rows whose token ids differ between the two ways of splitting prompt and choice (see
``lm_eval_scorer``), which is the one way their inputs can differ for a plain causal LM.
"""

from __future__ import annotations

from typing import Any

from .data import choice_examples
from .lm_eval_scorer import lm_eval_score

__all__ = ["crosscheck", "boundary_mismatches"]


def boundary_mismatches(tokenizer, examples) -> list[int]:
    """Rows where tokenizing prompt and choice apart gives other ids than tokenizing them together (any choice)."""
    rows = []
    for index, example in enumerate(examples):
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        for choice in example.choices:
            apart = prompt + tokenizer(choice, add_special_tokens=False)["input_ids"]
            together = tokenizer(example.prompt + choice, add_special_tokens=False)["input_ids"]
            if apart != together:
                rows.append(index)
                break
    return rows


def crosscheck(model, tokenizer, task: str, rows: list[dict[str, Any]], batch_size: int = 16) -> dict[str, Any]:
    from peft_depth.tasks import multiple_choice_accuracy

    examples = choice_examples(task, rows)
    ours_each = [multiple_choice_accuracy(model, tokenizer, [example], batch_size=1) == 1.0 for example in examples]
    ours_batched = multiple_choice_accuracy(model, tokenizer, examples, batch_size=batch_size)
    harness = lm_eval_score(model, tokenizer, task, rows, batch_size=batch_size)
    disagreements = [i for i, (a, b) in enumerate(zip(ours_each, harness.correct)) if a != b]
    return {
        "task": task,
        "rows": len(rows),
        "ours_accuracy_batched": ours_batched,
        "ours_accuracy_per_row": sum(ours_each) / len(rows),
        "lm_eval_accuracy": harness.accuracy,
        "rows_disagreeing": len(disagreements),
        "disagreeing_rows": disagreements[:20],
        "rows_with_boundary_token_difference": len(boundary_mismatches(tokenizer, examples)),
        "disagreeing_loglikelihoods": {i: harness.loglikelihoods[i] for i in disagreements[:5]},
    }
