"""A forward of a model started inside one of its own forwards (a reference pass run from a layer hook) keeps its own
per-forward state: the outer forward's remaining layers read the outer call's mask and record into its state, so its
outputs, auxiliary losses and gradients are those of the same forward without the inner call. A forward run between a
training forward and the read of its auxiliary losses replaces their records, and says so."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_llama

import peft_depth

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=2, lora_dropout=0.0),
    "molex": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=2, lora_dropout=0.0),
    "mod": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM", num_late_layers=2),
    # capacity below 1 from the first step, so that the router chooses tokens
    "dlo": lambda: peft_depth.DLOConfig(
        task_type="CAUSAL_LM", expand_every=2, capacity=0.6, capacity_annealing_steps=0
    ),
}


def _trained_looking(method: str):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[method]())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # zero-initialised parts (LoRA B, MoD's gate) would hide a difference
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.train()


def _step(model, inputs) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**inputs, labels=inputs["input_ids"])
    aux = peft_depth.aux_losses(model)
    (output.loss + sum(aux.values())).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach(), {name: float(value) for name, value in aux.items()}, grads


@pytest.mark.parametrize(
    ("method", "inner_adapters"),
    # DLO refuses to switch its stack inside a running forward (the next test)
    [(method, "enabled") for method in sorted(CONFIGS)]
    + [(method, "disabled") for method in ("mod", "mola", "molex")],
)
def test_a_forward_nested_in_a_layer_hook_leaves_the_outer_forward_unchanged(method, inner_adapters):
    outer, inner = batch(seed=1), batch(batch_size=3, seq_len=5, seed=9, left_pad=1)
    expected = _step(_trained_looking(method), outer)  # a twin: DLO's cos_global capacities move after each step
    model = _trained_looking(method)

    def reference_pass(module, args, output):
        handle.remove()
        with torch.no_grad():
            if inner_adapters == "disabled":
                with model.disable_adapter():
                    model(**inner)
            else:
                model(**inner)

    handle = model.get_base_model().model.layers[1].register_forward_hook(reference_pass)
    logits, aux, grads = _step(model, outer)
    assert handle.id not in model.get_base_model().model.layers[1]._forward_hooks  # the inner call ran
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=0)
    assert aux == pytest.approx(expected[1], rel=1e-6) and aux  # the outer records were overwritten or lost
    assert grads.keys() == expected[2].keys()  # DLO's router got no gradient
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-5, atol=1e-7, msg=name)


def test_dlo_refuses_to_swap_its_stack_inside_a_running_forward_and_recovers_from_an_interrupt():
    """Switching DLO's adapters swaps the installed layer stack: inside a running forward, that forward ran its
    remaining MLPs unrouted and lost its router loss. A forward stopped by KeyboardInterrupt (no post-hook runs) must
    not be taken for a running one afterwards."""
    model = _trained_looking("dlo")
    inputs = batch()
    layer = model.get_base_model().model.layers[1]

    def toggle(module, args, output):
        handle.remove()
        with model.disable_adapter():
            pass

    handle = layer.register_forward_hook(toggle)
    with pytest.raises(RuntimeError, match="while a forward of this model is running"):
        model(**inputs)

    def interrupt(module, args, output):
        handle.remove()
        raise KeyboardInterrupt

    handle = layer.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(**inputs)
    with model.disable_adapter():  # no forward runs now
        base = model(**inputs).logits
    fresh = _trained_looking("dlo")
    with fresh.disable_adapter():
        torch.testing.assert_close(base, fresh(**inputs).logits)
    torch.testing.assert_close(_step(model, inputs)[0], _step(fresh, inputs)[0])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_forward_between_the_training_forward_and_the_aux_read_warns(method):
    """A reference pass after the policy forward replaced the records the auxiliary losses come from: the read found
    nothing and the loss went without them, silently."""
    model, inputs = _trained_looking(method), batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read right after the forward, then a reference pass: no warning
        for _ in range(2):
            model(**inputs)
            assert peft_depth.aux_losses(model)
            peft_depth.trainer.set_training_step(model, 1)
            with torch.no_grad(), model.disable_adapter():
                model(**inputs)
    model(**inputs)
    with pytest.warns(UserWarning, match="started after a training forward and before that forward's auxiliary"):
        with torch.no_grad(), model.disable_adapter():
            model(**inputs)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_nested_pass_inside_a_checkpointed_layer_leaves_the_replay_unchanged(method, use_reentrant):
    """A hook inside a checkpointed layer runs again in the layer's replay during backward, after the outer forward
    returned: the nested pass must hand the replay its context back (MoLA's router gradients were 9% off)."""

    def checkpointed():
        model = _trained_looking(method)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.enable_input_require_grads()
        return model

    outer, inner = batch(seed=1), batch(batch_size=3, seq_len=5, seed=9, left_pad=1)
    expected = _step(checkpointed(), outer)
    model = checkpointed()
    running = []

    def reference_pass(module, args, output):
        if running:  # the nested pass runs this attention too
            return
        running.append(True)
        try:
            with torch.no_grad():
                model(**inner)
        finally:
            running.pop()

    model.get_base_model().model.layers[1].self_attn.register_forward_hook(reference_pass)
    logits, aux, grads = _step(model, outer)
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=0)
    assert aux == pytest.approx(expected[1], rel=1e-6)
    assert grads.keys() == expected[2].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_forward_in_another_thread_does_not_count_as_replacing_the_records():
    """Records are per thread: an inference request served by another thread between this thread's training forward
    and its read replaces nothing, and must not use up the one warning a loop that drops the losses gets."""
    model, inputs = _trained_looking("mola"), batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs)

        def serve() -> None:
            with torch.no_grad():
                model(**batch(batch_size=3, seq_len=5, seed=9))

        worker = threading.Thread(target=serve)
        worker.start()
        worker.join()
        assert peft_depth.aux_losses(model)
    with pytest.warns(UserWarning, match="this training loop drops"):
        for _ in range(2):
            model(**inputs)  # never read
