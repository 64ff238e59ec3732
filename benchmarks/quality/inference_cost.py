"""What a trained adapter costs per token at inference: the FLOPs of its forward pass on the scored split's rows.

DLO's efficiency claim is about inference. A trained router skips a layer's MLP for the tokens it scores at or below
0.5, so a routed stack spends fewer FLOPs per token than the dense expansion of the same depth. Its *training* runs
every token's MLP (the cosine labels need each token's MLP output, as in the official code), so training FLOPs are
equal by design and cannot show the claim. The verdict of a ``fewer_flops`` claim compares these instead.

The first ``INFERENCE_ROWS`` rows of the scored split are run one at a time, without padding, so no method is
credited for skipping padding that another computes: FLOPs summed over the rows / their tokens. Decoders run
prompt + correct answer (what scoring runs); encoders run the sentence pair.

Runs recorded before this field existed get it from their kept adapter (dev runs, and the test run of seed
``grid_seed``, which reuses the dev adapter): ``quality.py inference-flops --suite S`` writes a side ledger,
``<suite>-inference.jsonl``, keyed by (run key, split), so the sweep's own ledger is never rewritten.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel

from .budget import task_arms
from .data import choice_examples, load_splits, pair_examples
from .flops import forward_flops
from .ledger import append_record, read_records
from .models import CAUSAL, ModelSpec, load_model, load_tokenizer
from .provenance import git_state
from .train_causal import compute_precision
from .train_encoder import encode_pairs

if TYPE_CHECKING:  # sweep.py imports the runner, which imports this module; only the types are needed here
    from .runner import RunRequest
    from .sweep import Suite

__all__ = [
    "INFERENCE_ROWS",
    "FIELD",
    "inference_flops_per_token",
    "inference_ledger_path",
    "with_inference_flops",
    "backfill_inference_flops",
]

#: Rows of the scored split counted per run: one row's routing varies, 16 rows' mean does not by much.
INFERENCE_ROWS = 16
FIELD = "inference_flops_per_token"
_SIDE_FIELDS = ("run_key", "split", "suite", FIELD, "inference_rows")


def _token_rows(request: RunRequest, tokenizer, rows: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    if request.model.family == CAUSAL:
        from peft_depth.tasks import encode_answer_only

        encoded = encode_answer_only(choice_examples(request.task, rows), tokenizer)
        encoded = [{"input_ids": r["input_ids"][: request.settings.max_length]} for r in encoded]
    else:
        encoded = encode_pairs(pair_examples(request.task, rows), tokenizer, request.settings.max_length)
    names = ("input_ids", "token_type_ids")
    return [{name: torch.tensor([row[name]]) for name in names if name in row} for row in encoded]


def inference_flops_per_token(request: RunRequest, model, tokenizer, rows: int = INFERENCE_ROWS) -> float:
    """FLOPs per token of ``model``'s forward (eval mode, the run's arithmetic) over the first ``rows`` rows of the
    request's split, each run alone."""
    split_rows = getattr(request.splits, request.split)[:rows]
    if not split_rows:
        raise ValueError(f"Task {request.task!r} has no {request.split} rows to count inference FLOPs on.")
    model.eval()
    flops = tokens = 0
    with compute_precision(request.settings):
        for batch in _token_rows(request, tokenizer, split_rows):
            flops += forward_flops(lambda batch=batch: model(**batch))
            tokens += batch["input_ids"].numel()
    return flops / tokens


def inference_ledger_path(suite: str, results: Path) -> Path:
    return Path(results) / f"{suite}-inference.jsonl"


def with_inference_flops(records: list[dict[str, Any]], side: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with ``FIELD`` filled from the side ledger where a record lacks it (matched by run key and split;
    the latest side record wins). Records that have the field keep their own."""
    found = {(s["run_key"], s["split"]): s[FIELD] for s in side}
    merged = []
    for record in records:
        value = found.get((record.get("run_key"), record.get("split")))
        if record.get(FIELD) is None and value is not None:
            record = {**record, FIELD: value}
        merged.append(record)
    return merged


def backfill_inference_flops(
    suite: Suite,
    spec: ModelSpec,
    results: Path,
    adapters: Path,
    arms: tuple[str, ...],
    splits_of=load_splits,
) -> list[dict[str, Any]]:
    """Count ``FIELD`` for every finished run of ``arms`` that lacks it and whose adapter is kept; appends each to
    the side ledger and returns the new side records. Runs whose adapter is gone are left out (and stay unmeasured).
    """
    from .runner import RunRequest  # the runner imports this module, and the sweep imports the runner
    from .sweep import ledger_path

    records = read_records(ledger_path(suite.name, results))
    side_path = inference_ledger_path(suite.name, results)
    measured = with_inference_flops(records, read_records(side_path))
    wanted = {(r["run_key"], r["split"]) for r in measured if r["arm"] in arms and r.get(FIELD) is None}
    new: list[dict[str, Any]] = []
    for task in suite.tasks:
        splits = None
        for arm in task_arms(spec, task, arms)[0]:
            if arm.name not in arms:
                continue
            for record in (r for r in records if r["task"] == task and r["arm"] == arm.name):
                pending = (record["run_key"], record["split"])
                folder = adapters / record["run_key"]
                if pending not in wanted or not (folder / "adapter_config.json").is_file():
                    continue
                splits = splits or splits_of(task)
                request = RunRequest(
                    suite=suite.name,
                    model=spec,
                    task=task,
                    splits=splits,
                    arm=arm,
                    lr=record["lr"],
                    seed=record["seed"],
                    settings=suite.settings_for(task),
                    split=record["split"],
                    scorer=record["scorer"],
                )
                if request.run_key != record["run_key"]:
                    raise ValueError(
                        f"Run {record['run_key']} ({task}, {arm.name}) no longer matches the suite's configuration; "
                        "its adapter cannot be measured as that run."
                    )
                start = time.perf_counter()
                model = PeftModel.from_pretrained(load_model(spec), str(folder))
                value = inference_flops_per_token(request, model, load_tokenizer(spec))
                side = {
                    "run_key": record["run_key"],
                    "split": record["split"],
                    "suite": suite.name,
                    "task": task,
                    "arm": arm.name,
                    "seed": record["seed"],
                    FIELD: value,
                    "inference_rows": INFERENCE_ROWS,
                    "wall_s": time.perf_counter() - start,
                    **git_state(),
                }
                append_record(side_path, side, required=_SIDE_FIELDS)
                wanted.discard(pending)
                new.append(side)
    return new
