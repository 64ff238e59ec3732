"""Activation checkpointing, reentrant or not, changes no loss and no gradient of any method.

As peft users (and TRL, with PEFT + DeepSpeed ZeRO-3) enable it: ``gradient_checkpointing_enable(
gradient_checkpointing_kwargs={"use_reentrant": ...})`` plus ``enable_input_require_grads()``. Reentrant
checkpointing runs each decoder layer under ``no_grad`` in the forward and again, with gradients, in backward: what a
layer records during the forward carries no gradient, and tensors that enter the layer other than through its
arguments are not connected to the replay. For every method and routing mode, against the same model without
checkpointing: the loss and auxiliary losses, the gradients of every adapter parameter from the LM loss, from the
auxiliary losses (``0 * lm_loss + aux``: one backward through the whole graph, so that checkpointed layers replay, in
which only the auxiliary losses send gradient) and from their sum (a training step).
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from test_invariants import _left_padded, adapted

import peft_depth

#: Every method and routing mode in training (DLO's capacity selection is the training selection of dlo_mlp).
CASES = [
    "mola",
    "molex_token",
    "molex_batch_vote",
    "molex_sequence",
    "mod_token",
    "mod_sequence",
    "dlo_mlp",
    "dlo_block",
]
CHECKPOINTING = {"reentrant": True, "non_reentrant": False}
#: What is backpropagated: the LM loss, the auxiliary losses alone (in a backward through the LM graph too), both.
LOSSES = {
    "lm": lambda lm, aux: lm,
    "aux": lambda lm, aux: 0 * lm + aux,
    "lm+aux": lambda lm, aux: lm + aux,
}


def _model(case: str, use_reentrant: bool | None) -> torch.nn.Module:
    model = adapted(case, "llama").train()
    if case.startswith("dlo"):
        # past the capacity annealing (which starts at 1.0): the routers choose which tokens the layers skip
        peft_depth.trainer.set_training_step(model, 10**6)
    if use_reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.enable_input_require_grads()
    return model


def _forward(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = _left_padded([7, 5])
    torch.manual_seed(0)
    out = model(**batch, labels=batch["input_ids"])
    return out.loss, peft_depth.aux_losses(model)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if param.grad is None else param.grad.clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _step(model: torch.nn.Module, loss_kind: str, backward=lambda loss: loss.backward()) -> dict[str, object]:
    model.zero_grad(set_to_none=True)
    lm, aux = _forward(model)
    assert aux and all(value.requires_grad for value in aux.values()), "an auxiliary loss carries no gradient"
    stats = peft_depth.routing_stats(model)
    backward(LOSSES[loss_kind](lm, sum(aux.values())))
    aux = {name: value.detach() for name, value in aux.items()}
    return {"lm": lm.detach(), "aux": aux, "grads": _grads(model), "stats": stats}


def _assert_same(got: dict[str, object], expected: dict[str, object]) -> None:
    torch.testing.assert_close(got["lm"], expected["lm"], atol=1e-6, rtol=1e-6)
    assert got["aux"].keys() == expected["aux"].keys()
    for name in expected["aux"]:
        torch.testing.assert_close(got["aux"][name], expected["aux"][name], atol=1e-7, rtol=1e-5)
    assert got["grads"].keys() == expected["grads"].keys()
    reached = 0
    for name, ref in expected["grads"].items():
        grad = got["grads"][name]
        if ref is None or not ref.any():
            assert grad is None or not grad.any(), f"{name}: a gradient where checkpointing-free training has none"
            continue
        assert grad is not None, f"{name}: no gradient under checkpointing"
        reached += 1
        # recomputation reorders float sums: equal up to float32 rounding, relative to the tensor's scale
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert reached, "no parameter received a gradient"


@functools.cache
def _without_checkpointing(case: str, loss_kind: str) -> dict[str, object]:
    return _step(_model(case, None), loss_kind)


@pytest.mark.parametrize("loss_kind", list(LOSSES))
@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("case", CASES)
def test_checkpointing_changes_no_loss_and_no_gradient(case, checkpointing, loss_kind):
    expected = _without_checkpointing(case, loss_kind)
    got = _step(_model(case, CHECKPOINTING[checkpointing]), loss_kind)
    _assert_same(got, expected)
    if case.startswith("dlo"):  # the layers skipped tokens, in both runs alike
        assert got["stats"]["dlo"]["default"]["executed_fraction"] < 1
        assert got["stats"]["dlo"] == expected["stats"]["dlo"]


def test_mola_reentrant_gradient_reaches_the_routers_when_backward_runs_on_another_thread():
    """On CUDA the autograd engine replays checkpointed layers on its own device thread, which sees none of the
    forward thread's context: the replay must still find the forward's routing records."""
    expected = _without_checkpointing("mola", "lm+aux")

    def on_another_thread(loss: torch.Tensor) -> None:
        failures: list[BaseException] = []

        def run() -> None:
            try:
                loss.backward()
            except BaseException as error:  # reported on the test's thread
                failures.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if failures:
            raise failures[0]

    _assert_same(_step(_model("mola", True), "lm+aux", backward=on_another_thread), expected)


@pytest.mark.parametrize("order", ["aux_only", "lm_then_aux"], ids=["aux alone", "aux after the LM loss's backward"])
def test_mola_reentrant_balance_loss_outside_the_lm_backward_is_refused(order):
    """Under reentrant checkpointing the routers' balance-loss gradient travels with the layers' recomputation, which
    only a backward through the LM loss runs: a backward of the auxiliary loss without it, or after it, would drop
    that gradient, and raises instead."""
    model = _model("mola", True)
    lm, aux = _forward(model)
    if order == "lm_then_aux":
        lm.backward()
    with pytest.raises(RuntimeError, match=r'use_reentrant": False') as error:
        sum(aux.values()).backward()
    assert "MoLA adapter 'default'" in str(error.value)
