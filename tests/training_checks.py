"""Training steps the method tests share: a short optimisation on one batch, and one backward pass with or without
gradient checkpointing (whose loss and gradients must not depend on the switch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tiny_models import batch

import peft_depth


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, torch.Tensor],
    steps: int = 15,
    before_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Runs `steps` optimizer steps on `inputs` (LM loss plus every aux loss) and returns each step's losses:
    ``{"lm": ..., <aux name>: ...}`` as floats. `before_step(step)` runs first in each step (e.g. DLO's schedule)."""
    history = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        out = model(**inputs, labels=inputs["input_ids"])
        aux = peft_depth.aux_losses(model)
        (out.loss + sum(aux.values())).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"lm": out.loss.item(), **{name: value.item() for name, value in aux.items()}})
    return history


def backward_once(
    model: torch.nn.Module, checkpointing: bool, aux_weights: dict[str, float] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """One training forward and backward on `batch()`, with gradient checkpointing on or off. Returns the loss
    (LM + aux), the trainable parameters' gradients by name, and `routing_stats` after the backward (so a
    recomputing checkpoint that appended instead of overwriting would show)."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    inputs = batch()
    out = model(**inputs, labels=inputs["input_ids"])
    loss = out.loss + sum(peft_depth.aux_losses(model, aux_weights).values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, peft_depth.routing_stats(model)


def assert_same_loss_and_gradients(
    run_a: tuple[torch.Tensor, dict[str, torch.Tensor], dict],
    run_b: tuple[torch.Tensor, dict[str, torch.Tensor], dict],
) -> None:
    """Two `backward_once` results agree: the same loss, the same trainable parameters, close gradients."""
    loss_a, grads_a, _ = run_a
    loss_b, grads_b, _ = run_b
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
