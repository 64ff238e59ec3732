"""Non-finite routing scores: the row takes the base path, is flagged, and never changes another row.

A NaN gate used to send every MoLEx layer to layer 0 (not even a candidate), and one NaN request in a ``batch_vote``
batch moved every row's choice. Scores are made non-finite with a forward hook on the router/gate output, for chosen
batch rows only, so the rest of the model (and the base path itself) stays finite.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_invariants import adapted
from tiny_models import batch, tiny_llama

import peft_depth
from peft_depth import NonFiniteRoutingError


def _poison_rows(rows: list[int], batch_size: int, seq: int):
    """A forward hook that makes the ``[N, E]`` scores of the given batch rows NaN."""

    def hook(module, args, output):
        if output.shape[0] != batch_size * seq:
            return output
        poisoned = output.clone().view(batch_size, seq, -1)
        poisoned[rows] = float("nan")
        return poisoned.view_as(output)

    return hook


def _rows(inputs: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in inputs.items()}


def _molex_gates(model):
    return list(model.base_model.molex_gate["default"].values())


def _mola_routers(model):
    return [m for n, m in model.named_modules() if n.endswith("mola_router.default")]


ROUTERS = {"molex": _molex_gates, "mola": _mola_routers}
CASES = ["molex_batch_vote", "molex_sequence", "molex_token", "mola"]


@pytest.mark.parametrize("case", CASES)
def test_a_nonfinite_row_changes_no_other_row_and_is_flagged(case):
    model = adapted(case, "llama")
    inputs = batch(batch_size=3, seq_len=6, left_pad=0, seed=4)
    with torch.no_grad():
        clean_rows = model(**_rows(inputs, [1, 2])).logits
    handles = [router.register_forward_hook(_poison_rows([0], 3, 6)) for router in ROUTERS[case.split("_")[0]](model)]
    try:
        with torch.no_grad():
            poisoned = model(**inputs).logits
        stats = peft_depth.routing_stats(model)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(poisoned).all(), "the poisoned row must take the finite base path"
    torch.testing.assert_close(poisoned[1:], clean_rows, rtol=0, atol=0)
    method = "molex" if case.startswith("molex") else "mola"
    rows = stats[method]["default"]
    # the poisoned row's 6 tokens, once per router that saw them (MoLA: q_proj and v_proj in each block)
    per_layer = 6 if method == "molex" else 12
    assert all(row["nonfinite_rows"] == per_layer for row in rows), rows
    # real tokens with finite scores only: 2 rows of 6
    assert all(row["num_tokens"] == 12 for row in rows), rows


@pytest.mark.parametrize("case", CASES)
def test_nonfinite_scores_take_exactly_the_base_path(case):
    """With every score non-finite, each routed layer computes what it computes with no routing at all."""
    model = adapted(case, "llama")
    inputs = batch(batch_size=2, seq_len=5, left_pad=1, seed=5)
    handles = [
        router.register_forward_hook(lambda m, a, o: torch.full_like(o, float("nan")))
        for router in ROUTERS[case.split("_")[0]](model)
    ]
    try:
        with torch.no_grad():
            nan_logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        if case == "mola":
            # MoLA's base path: no expert delta anywhere
            with model.disable_adapter():
                expected = model(**inputs).logits
        else:
            # MoLEx's base path: each layer's own (LoRA-adapted) output, unmixed: the MoLEx layers run plain
            plans = model.base_model._plans
            saved = {name: plan.candidates for name, plan in plans.items()}
            for plan in plans.values():
                plan.candidates = {}
            try:
                expected = model(**inputs).logits
            finally:
                for name, plan in plans.items():
                    plan.candidates = saved[name]
    torch.testing.assert_close(nan_logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [
        peft_depth.MoLAConfig(num_experts=2, top_k=1, nonfinite_routing="raise", target_modules=["q_proj"]),
        peft_depth.MoLExConfig(
            routing="token", molex_layers=[1, 2], nonfinite_routing="raise", target_modules=["q_proj"]
        ),
    ],
)
def test_raise_policy_names_the_layer(config):
    model = get_peft_model(tiny_llama(), config)
    routers = _mola_routers(model) if isinstance(config, peft_depth.MoLAConfig) else _molex_gates(model)
    routers[-1].register_forward_hook(lambda m, a, o: torch.full_like(o, float("inf")))
    with pytest.raises(NonFiniteRoutingError, match=r"layer \d"):
        with torch.no_grad():
            model(**batch())


def test_nonfinite_routing_is_validated():
    with pytest.raises(ValueError, match="nonfinite_routing.*'base_path', 'raise'"):
        peft_depth.MoLAConfig(nonfinite_routing="skip")
