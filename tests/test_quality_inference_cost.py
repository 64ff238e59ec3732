# ruff: noqa: F811  (test arguments name the fixtures imported from test_quality_harness)
"""Inference FLOPs per token (benchmarks/quality/inference_cost.py): what DLO's efficiency claim is judged on.

DLO trains every token's MLP (its labels need them), so its training FLOPs equal the dense expansion's; its router
saves compute only when the trained model runs. These tests pin that the sweep counts that saving, that rows are
counted alone (padding cannot be credited), and that a count backfilled from a kept adapter equals the one the run
recorded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from test_quality_harness import SETTINGS, choice_task, tiny_causal  # noqa: F401  (their fixtures, shared)
from tiny_models import tiny_llama, word_tokenizer

from peft_depth.tasks import encode_answer_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality.arms import arm_by_name, arms_for, build_config  # noqa: E402
from quality.data import choice_examples, load_splits  # noqa: E402
from quality.flops import forward_flops  # noqa: E402
from quality.inference_cost import (  # noqa: E402
    FIELD,
    backfill_inference_flops,
    inference_flops_per_token,
    inference_ledger_path,
    with_inference_flops,
)
from quality.ledger import read_records  # noqa: E402
from quality.models import resolve_model  # noqa: E402
from quality.runner import OURS, RunRequest  # noqa: E402
from quality.sweep import Suite, ledger_path, run_suite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def request_for(spec, task: str, arm_name: str) -> RunRequest:
    arm = arm_by_name(arms_for(spec), arm_name)
    return RunRequest("tiny", spec, task, load_splits(task), arm, 1e-3, 0, SETTINGS, "test", OURS)


def adapted(spec, request: RunRequest, **overrides):
    config = build_config(request.arm, spec, request.task, SETTINGS.steps)
    for name, value in overrides.items():
        setattr(config, name, value)
    return get_peft_model(tiny_llama(), config).eval()


def test_the_mlps_a_dlo_router_skips_are_not_counted(tiny_causal, choice_task):
    """A fresh router scores every token 0.5 and runs every MLP (s >= 0.5), as the dense expansion of the same depth
    does; a router that executes half of each row's tokens (``inference_selection="capacity"``, ``inference_capacity=0.5``) costs less per token."""
    spec = resolve_model(str(tiny_causal))
    tokenizer = word_tokenizer()
    dlo, dense = request_for(spec, choice_task, "dlo"), request_for(spec, choice_task, "dense")
    full = inference_flops_per_token(dense, adapted(spec, dense), tokenizer)
    fresh = inference_flops_per_token(dlo, adapted(spec, dlo), tokenizer)
    half = inference_flops_per_token(
        dlo, adapted(spec, dlo, inference_selection="capacity", inference_capacity=0.5), tokenizer
    )
    assert fresh == pytest.approx(full, rel=0.01)  # the same layers, plus d -> 1 routers
    assert half < 0.9 * full


def test_rows_are_counted_alone_so_padding_is_never_counted(tiny_causal, choice_task):
    spec = resolve_model(str(tiny_causal))
    request = request_for(spec, choice_task, "lora")
    model = adapted(spec, request)
    tokenizer = word_tokenizer()
    rows = load_splits(choice_task).test[:3]
    encoded = encode_answer_only(choice_examples(choice_task, rows), tokenizer)
    alone = [forward_flops(lambda r=r: model(input_ids=torch.tensor([r["input_ids"]]))) for r in encoded]
    tokens = sum(len(r["input_ids"]) for r in encoded)
    assert inference_flops_per_token(request, model, tokenizer, rows=3) == pytest.approx(sum(alone) / tokens)
    assert len({len(r["input_ids"]) for r in encoded}) > 1  # rows of different lengths: a batch would have padded


def test_a_count_from_a_kept_adapter_equals_the_recorded_one(tiny_causal, choice_task, tmp_path):
    """Runs older than the field get it from their kept adapter, into a side ledger; the sweep's ledger is never
    rewritten. Here the sweep records the field, it is then removed (an older ledger), and the backfill must give
    the same counts for every run whose adapter was kept (the dev runs and seed 0's test run)."""
    spec = resolve_model(str(tiny_causal))
    suite = Suite("tiny", str(tiny_causal), (choice_task,), (0, 1), SETTINGS, test_scorer=OURS)
    arms = ("dlo", "dense")
    list(run_suite(suite, spec, tmp_path, tmp_path / "adapters", only=arms, progress=False))
    ledger = ledger_path("tiny", tmp_path)
    recorded = read_records(ledger)
    assert all(r[FIELD] > 0 and r["inference_rows"] == 16 for r in recorded)
    ledger.write_text("".join(json.dumps({k: v for k, v in r.items() if k != FIELD}) + "\n" for r in recorded))

    side = backfill_inference_flops(suite, spec, tmp_path, tmp_path / "adapters", arms)
    kept = [r for r in recorded if r["arm"] in arms and (r["split"] == "dev" or r["seed"] == 0)]
    assert sorted((s["run_key"], s["split"]) for s in side) == sorted((r["run_key"], r["split"]) for r in kept)
    expected = {(r["run_key"], r["split"]): r[FIELD] for r in kept}
    for entry in side:
        assert entry[FIELD] == pytest.approx(expected[(entry["run_key"], entry["split"])], rel=1e-12)
    assert read_records(inference_ledger_path("tiny", tmp_path)) == [json.loads(json.dumps(s)) for s in side]
    # a second backfill finds nothing left to count; seed 1's test runs (no kept adapter) stay unmeasured
    assert backfill_inference_flops(suite, spec, tmp_path, tmp_path / "adapters", arms) == []
    merged = with_inference_flops(read_records(ledger), read_records(inference_ledger_path("tiny", tmp_path)))
    assert sorted(r.get(FIELD) is None for r in merged if r["arm"] in arms) == [False] * len(kept) + [True] * 2


def test_a_backfill_refuses_a_run_the_suite_no_longer_describes(tiny_causal, choice_task, tmp_path):
    spec = resolve_model(str(tiny_causal))
    suite = Suite("tiny", str(tiny_causal), (choice_task,), (0,), SETTINGS, test_scorer=OURS)
    list(run_suite(suite, spec, tmp_path, tmp_path / "adapters", only=("dense",), progress=False))
    ledger = ledger_path("tiny", tmp_path)
    records = [{k: v for k, v in r.items() if k != FIELD} for r in read_records(ledger)]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in records))
    changed = replace(suite, settings=replace(SETTINGS, steps=3))  # the adapters were trained for 2 steps
    with pytest.raises(ValueError, match="no longer matches"):
        backfill_inference_flops(changed, spec, tmp_path, tmp_path / "adapters", ("dense",))
