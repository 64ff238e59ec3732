"""Cross-check: this repository's scorer (``peft_depth.tasks.multiple_choice_accuracy``) against
lm-evaluation-harness (``lm_eval_scorer``) on the same rows, per row.

Per row, our scorer is run on that row alone (its prediction cannot depend on other rows), and lm-eval scores all
rows in one call. The report counts rows where the two disagree, the accuracy of each (ours also batched, as the
sweep runs it), and rows whose token ids differ between the two ways of splitting prompt and choice (see
``lm_eval_scorer``), which is the one way their inputs can differ for a plain causal LM.
"""

from __future__ import annotations

import time
from typing import Any

from .data import choice_examples
from .lm_eval_scorer import lm_eval_score

__all__ = ["crosscheck", "boundary_mismatches", "render_crosscheck"]


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
    start = time.process_time()
    ours_batched = multiple_choice_accuracy(model, tokenizer, examples, batch_size=batch_size)
    ours_cpu = time.process_time() - start
    start = time.process_time()
    harness = lm_eval_score(model, tokenizer, task, rows, batch_size=batch_size)
    harness_cpu = time.process_time() - start
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
        "ours_batched_cpu_s": ours_cpu,
        "lm_eval_cpu_s": harness_cpu,
    }


def render_crosscheck(results: list[dict[str, Any]], model_note: str) -> str:
    """Markdown table of cross-check results (one row per model / adapter / task)."""
    lines = [
        "# Scorer cross-check: peft_depth.tasks vs lm-evaluation-harness",
        "",
        f"Model: {model_note}. Adapter: random non-zero weights (`init_lora_weights=False`), so the PeftModel's outputs "
        "differ from the base model's. Same test rows, same prompts (lm-eval renders them from the YAML configs in "
        "`benchmarks/quality/lm_eval_tasks/`); ours per row = each row scored alone.",
        "",
        "| adapter | task | rows | ours (batched) | ours (per row) | lm-eval | rows disagreeing | rows whose token ids "
        "differ at the prompt/choice boundary | CPU-s ours (batched) | CPU-s lm-eval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['arm']} | {r['task']} | {r['rows']} | {r['ours_accuracy_batched']:.4f} | "
            f"{r['ours_accuracy_per_row']:.4f} | {r['lm_eval_accuracy']:.4f} | {r['rows_disagreeing']} | "
            f"{r['rows_with_boundary_token_difference']} | {r['ours_batched_cpu_s']:.1f} | {r['lm_eval_cpu_s']:.1f} |"
        )
    lines += [
        "",
        "Reading it: for a model whose prediction on a row depends only on that row (the base model, LoRA, MoLA, MoD, "
        "DLO), the two scorers must agree on every row: where the boundary column is 0 they run the same token ids, "
        "so any disagreement would be a bug. MoLEx with `routing='batch_vote'` picks one expert layer per *batch* by "
        "majority vote, so its prediction on a row depends on which rows share its batch: ours batches 16 rows sorted "
        "shortest first with an attention mask, lm-eval batches longest first *without* a mask (its right padding "
        "votes too), and ours per row lets each row vote alone. Disagreements there measure that dependence, not a "
        "scorer error; a MoLEx accuracy is only defined together with its evaluation batching.",
    ]
    return "\n".join(lines) + "\n"
