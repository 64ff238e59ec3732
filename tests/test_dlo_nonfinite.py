"""DLO with non-finite router scores: the token takes the base path, is counted, and never moves another token.

A NaN router used to skip every MLP of its layer (``executed_fraction = 0.0``), and NaN scores ranked first in the
batch-wide capacity selection, taking the budget of the clean requests.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_invariants import adapted
from tiny_models import batch, tiny_llama

import peft_depth
from peft_depth import NonFiniteRoutingError
from peft_depth.core import raw_aux_losses
from peft_depth.tuners.dlo import DLOConfig

POISONED_LAYER = 2  # a new layer of the expanded 4 -> 6 stack (expand_every=2: new layers at positions 2 and 5)


def _routers(model):
    return model.base_model.dlo_routers["default"]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _rows(inputs, rows):
    return {k: v[rows] for k, v in inputs.items()}


def _poison_embeddings(model, row: int):
    """A forward hook making one request's input embeddings NaN (a poisoned request)."""

    def hook(module, args, output):
        poisoned = output.clone()
        poisoned[row] = float("nan")
        return poisoned

    return model.get_input_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("case", ["dlo_mlp", "dlo_block"])
def test_a_nan_router_runs_its_layer_as_the_base_model_does(case):
    model = adapted(case, "llama")
    inputs = batch(batch_size=2, seq_len=7, left_pad=2, seed=3)
    router = _routers(model)[f"l{POISONED_LAYER}"]
    with torch.no_grad():
        # a zero router scores s = 0.5: the layer runs on every token with scale 1, i.e. exactly the base path
        router.weight.zero_()
        expected = _logits(model, inputs)
        router.weight.fill_(float("nan"))
    nan_logits = _logits(model, inputs)
    torch.testing.assert_close(nan_logits, expected, rtol=0, atol=0)
    rows = {row["layer"]: row for row in peft_depth.routing_stats(model)["dlo"]["default"]["layers"]}
    real = int(inputs["attention_mask"].sum())
    assert rows[POISONED_LAYER]["nonfinite_rows"] == real and rows[POISONED_LAYER]["num_tokens"] == 0
    assert all(
        row["nonfinite_rows"] == 0 and row["num_tokens"] == real for p, row in rows.items() if p != POISONED_LAYER
    )
    assert peft_depth.routing_stats(model)["dlo"]["default"]["nonfinite_rows"] == real


@pytest.mark.parametrize("case, mode", [("dlo_capacity", "eval"), ("dlo_mlp", "train"), ("dlo_block", "train")])
def test_a_nan_request_changes_no_other_request(case, mode):
    """Capacity selection ranks the batch's tokens together; a poisoned request must not take the others' budget."""
    model = adapted(case, "llama").train(mode == "train")
    config = model.peft_config["default"]
    config.capacity, config.capacity_annealing_steps = 0.5, 0  # training keeps half the batch's tokens
    inputs = batch(batch_size=3, seq_len=6, left_pad=2, seed=4)
    absent = {k: v.clone() for k, v in inputs.items()}
    absent["attention_mask"][0] = 0  # the first request as padding: in no statistic, same shapes
    alone = _logits(model, _rows(inputs, [1, 2]))
    alone_stats = peft_depth.routing_stats(model)["dlo"]["default"]
    without = _logits(model, absent)
    handle = _poison_embeddings(model, row=0)
    try:
        poisoned = _logits(model, inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(poisoned[1:], without[1:], rtol=0, atol=0)
    # Block skipping packs a batch of another size when the requests run alone, and BLAS may round it differently.
    torch.testing.assert_close(poisoned[1:], alone, rtol=0, atol=1e-6 if case == "dlo_block" else 0)
    stats = peft_depth.routing_stats(model)["dlo"]["default"]
    real_in_row_0 = int(inputs["attention_mask"][0].sum())
    assert all(row["nonfinite_rows"] == real_in_row_0 for row in stats["layers"])
    # the clean requests alone decide, and are the only ones counted
    for row, alone_row in zip(stats["layers"], alone_stats["layers"]):
        assert (row["num_tokens"], row["executed_fraction"]) == (
            alone_row["num_tokens"],
            alone_row["executed_fraction"],
        )


def test_training_with_a_nan_router_keeps_the_router_loss_finite():
    model = adapted("dlo_mlp", "llama").train()
    inputs = batch(batch_size=2, seq_len=7, left_pad=2, seed=3)
    with torch.no_grad():
        _routers(model)[f"l{POISONED_LAYER}"].weight.fill_(float("nan"))
    out = model(**inputs, labels=inputs["input_ids"])
    router_loss = raw_aux_losses(model)["router"].value
    assert torch.isfinite(out.loss) and torch.isfinite(router_loss)
    (out.loss + router_loss).backward()
    # The layers above train normally. (Below it, gradients pass the NaN weight on their way to the residual stream
    # and are NaN: a NaN weight cannot train, and loads refuse one.)
    for name, router in _routers(model).items():
        if int(name[1:]) > POISONED_LAYER:
            assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0, name


def test_raise_policy_names_the_layer():
    model = get_peft_model(
        tiny_llama(num_layers=4), DLOConfig(task_type="CAUSAL_LM", expand_every=2, nonfinite_routing="raise")
    )
    inputs = batch()
    _logits(model, inputs)  # finite scores: no error
    with torch.no_grad():
        _routers(model)[f"l{POISONED_LAYER}"].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteRoutingError, match=rf"DLO layer {POISONED_LAYER} \(new\)"):
        _logits(model, inputs)
