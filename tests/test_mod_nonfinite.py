"""MoD's non-finite routing policy (``nonfinite_routing``): a row whose routing scores are NaN or infinite takes the
base model's own final-layer path, is left out of the statistics and counted, and never changes another row."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, clone_model, tiny_llama

import peft_depth
from peft_depth import MoDConfig
from peft_depth.core.nonfinite import NonFiniteRoutingError


def _nontrivial(base=None, **kwargs):
    kwargs.setdefault("num_late_layers", 3)
    model = get_peft_model(base or tiny_llama(), MoDConfig(task_type="CAUSAL_LM", **kwargs))
    generator = torch.Generator().manual_seed(0)
    ensemble = model.base_model.mod_ensemble["default"]
    with torch.no_grad():
        for param in ensemble.router.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2)
        ensemble.gate.fill_(0.7)
        for norm in ensemble.norms.values():
            norm.weight.mul_(1.5)
    return model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _stats(model):
    return peft_depth.routing_stats(model)["mod"]["default"]


def _poison_router_input(model, row: int, from_position: int = 0):
    """A pre-hook on the router making one row's input NaN (a request whose activations overflowed)."""

    def hook(module, args):
        router_input = args[0].clone()
        router_input[row, from_position:] = float("nan")
        return (router_input, *args[1:])

    return model.base_model.mod_ensemble["default"].router.register_forward_pre_hook(hook)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(router_granularity="sequence"), dict(router_granularity="static"), dict(mix_space="log_probs")],
    ids=["token", "sequence", "static", "log_probs"],
)
def test_nan_router_weights_give_the_base_model_exactly_and_are_counted(kwargs):
    base = tiny_llama()
    inputs = batch()  # 2 x 7, row 0 left-padded by 2: 12 real tokens
    expected = _logits(clone_model(base), inputs)
    model = _nontrivial(clone_model(base), **kwargs)
    with torch.no_grad():
        model.base_model.mod_ensemble["default"].router.bias[1] = float("nan")
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)
    stats = _stats(model)
    granularity = kwargs.get("router_granularity", "token")
    assert stats["nonfinite_rows"] == (2 if granularity == "sequence" else 12)
    assert stats["num_tokens"] == 0
    assert stats["mean_weight"] == [0.0, 0.0, 0.0]  # no row entered the statistic, and it is not NaN


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_one_nan_request_leaves_the_other_rows_bitwise_unchanged(granularity):
    model = _nontrivial(router_granularity=granularity)
    inputs = batch(batch_size=3, seq_len=7, left_pad=2)
    clean = _logits(model, inputs)
    clean_stats = _stats(model)
    others = {name: value[1:] for name, value in inputs.items()}
    alone = _logits(model, others)
    alone_stats = _stats(model)
    with model.disable_adapter():
        base = _logits(model, inputs)
    handle = _poison_router_input(model, row=0)
    try:
        poisoned = _logits(model, inputs)
    finally:
        handle.remove()
    stats = _stats(model)
    assert torch.equal(poisoned[1:], clean[1:])  # the same batch without the bad request, bit for bit
    # and what those rows give on their own (a smaller batch may take other matmul kernels in the backbone, so
    # bit-equality is asserted against the same-shape batch above)
    torch.testing.assert_close(poisoned[1:], alone, rtol=0, atol=1e-6)
    assert torch.equal(poisoned[0], base[0])  # the bad request gets the base model's own output
    assert not torch.equal(clean[0], base[0])
    assert stats["nonfinite_rows"] == (1 if granularity == "sequence" else 5)
    assert stats["num_tokens"] == alone_stats["num_tokens"] == clean_stats["num_tokens"] - 5 == 14
    assert stats["mean_weight"] == pytest.approx(alone_stats["mean_weight"], abs=1e-6)
    assert clean_stats["nonfinite_rows"] == 0


def test_a_sequence_takes_the_base_path_from_its_first_nonfinite_position_on():
    """The running mean carries a NaN hidden state forward: those positions fall back, earlier ones keep the mix."""
    model = _nontrivial(router_granularity="sequence")
    inputs = batch(left_pad=0)
    clean = _logits(model, inputs)
    final_block = model.base_model.model.model.layers[-1]

    def nan_at_position_3_of_row_0(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, 3] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = final_block.register_forward_hook(nan_at_position_3_of_row_0)
    try:
        with model.disable_adapter():
            poisoned_base = _logits(model, inputs)
        poisoned = _logits(model, inputs)
    finally:
        handle.remove()
    assert torch.equal(poisoned[1], clean[1])
    assert torch.equal(poisoned[0, :3], clean[0, :3])
    assert torch.isnan(poisoned[0, 3]).all()  # the bad position itself: the base path is NaN there too
    assert torch.equal(poisoned[0, 4:], poisoned_base[0, 4:]) and torch.isfinite(poisoned[0, 4:]).all()
    assert not torch.equal(poisoned[0, 4:], clean[0, 4:])
    assert _stats(model)["nonfinite_rows"] == 1


def test_cached_generation_with_a_nan_request_keeps_the_other_rows():
    model = _nontrivial(router_granularity="sequence")
    inputs = batch(batch_size=2, seq_len=5, left_pad=2)
    generate = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        clean = model.generate(**inputs, **generate)
        with model.disable_adapter():
            base = model.generate(**inputs, **generate)
        handle = _poison_router_input(model, row=0)  # at every step: the request stays bad
        try:
            poisoned = model.generate(**inputs, **generate)
        finally:
            handle.remove()
    assert torch.equal(poisoned[1], clean[1])
    assert torch.equal(poisoned[0], base[0])  # the bad request decodes as the base model would
    assert not torch.equal(clean[0], base[0])


def test_raise_policy_names_the_adapter_and_layers():
    model = _nontrivial(nonfinite_routing="raise")
    inputs = batch()
    _logits(model, inputs)  # finite scores: no error
    handle = _poison_router_input(model, row=1, from_position=6)
    try:
        with pytest.raises(NonFiniteRoutingError, match=r"MoD adapter 'default' \(router over layers \[1, 2, 3\]\)"):
            _logits(model, inputs)
    finally:
        handle.remove()


def test_overflowing_scores_train_without_nan_gradients():
    """Infinite scores of one row (finite input, a huge router weight) give finite gradients to every parameter."""
    model = _nontrivial()
    model.train()
    ensemble = model.base_model.mod_ensemble["default"]
    inputs = batch()

    def overflow_row_0(module, args):
        router_input = args[0].clone()
        router_input[0] = router_input[0] * 1e38  # finite in float32; the scores overflow to inf
        return (router_input, *args[1:])

    handle = ensemble.router.register_forward_pre_hook(overflow_row_0)
    try:
        out = model(**inputs, labels=inputs["input_ids"])
        (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    finally:
        handle.remove()
    assert _stats(model)["nonfinite_rows"] > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads
