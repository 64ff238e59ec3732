"""Reentrant activation checkpointing: auxiliary-loss gradients of values a layer records in its no-grad pass.

With ``use_reentrant=True`` a checkpointed decoder layer runs twice: in the forward under ``torch.no_grad()``, and
again with gradients when backward reaches it (the *replay*, possibly on the autograd engine's device thread, which
sees none of the forward thread's ``contextvars``). A value that a layer inside records for an auxiliary loss (MoLA's
routing probabilities) is therefore recorded without gradient, and a balance loss built from it would train nothing.

Here such a value is *deferred* (``DeferredGradient``): the auxiliary loss built on it collects the gradient it
receives in backward, and the layer's replay sends exactly that gradient into the value it recomputes with
gradients, so the router, and every parameter upstream of the layer, gets the gradient it gets without
checkpointing. ``ReplayingCheckpoint`` stands in for the layer's checkpoint function: it tells the layers inside
which pass they run in (``checkpoint_pass``), runs the replay in the forward's context, and ties each deferred value
to the layer's node in the autograd graph.

The auxiliary loss's gradient must arrive before the replay, in the same backward: ``loss = lm_loss +
sum(aux_losses(model).values())`` (the autograd engine runs the nodes created last first, and the auxiliary loss is
built after the forward). A deferred value whose gradient would arrive in a backward without the replay, or after
it, raises ``RuntimeError`` naming ``use_reentrant=False`` instead of training on a wrong gradient.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "NO_GRAD_FORWARD",
    "REPLAY",
    "DeferredGradient",
    "ReplayingCheckpoint",
    "checkpoint_pass",
    "replay_checkpointed_layers",
]

#: ``checkpoint_pass()`` inside a checkpointed layer's forward under reentrant checkpointing (no gradients).
NO_GRAD_FORWARD = "no_grad_forward"
#: ``checkpoint_pass()`` inside a checkpointed layer's recomputation in backward (either kind of checkpointing).
REPLAY = "replay"

_PASS: contextvars.ContextVar[str | None] = contextvars.ContextVar("peft_depth_checkpoint_pass", default=None)
# The deferred values made inside the checkpointed call in progress, to be tied to its node in the graph.
_DEFERRED: contextvars.ContextVar[list[DeferredGradient] | None] = contextvars.ContextVar(
    "peft_depth_deferred_gradients", default=None
)

FIX = (
    "Backpropagate the auxiliary losses together with the LM loss in one backward (`loss = out.loss + "
    "sum(peft_depth.aux_losses(model).values()); loss.backward()`, as DepthSFTTrainer does), or enable non-reentrant "
    'checkpointing: `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`.'
)


def checkpoint_pass() -> str | None:
    """``NO_GRAD_FORWARD``, ``REPLAY``, or None (not inside a layer checkpointed through ``ReplayingCheckpoint``)."""
    return _PASS.get()


class DeferredGradient:
    """The gradient an auxiliary loss sends to a value recorded in a reentrant checkpoint's no-grad forward.

    ``attach`` gives the auxiliary loss a differentiable stand-in for the value, whose backward keeps the gradient
    here; ``inject`` hands it, in the layer's replay, to the recomputed value.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.grad: torch.Tensor | None = None
        self.replayed = False
        self.replay_node: Any = None  # the checkpointed layer's node in the autograd graph (set after its forward)
        calls = _DEFERRED.get()
        if calls is not None:
            calls.append(self)

    def attach(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (recorded without gradient) as a tensor whose gradient is kept for the replay."""
        anchor = torch.empty(0, device=value.device, requires_grad=True)  # makes the output require grad
        return _CollectGradient.apply(anchor, value, self)

    def inject(self, output: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """``output`` unchanged; in backward, ``live`` (the value recomputed with gradients) also receives the
        gradient the auxiliary loss sent to the recorded value."""
        return _InjectGradient.apply(output, live, self)

    def _receive(self, grad: torch.Tensor) -> None:
        node = self.replay_node
        if self.replayed or (node is not None and not _will_execute(node)):
            raise RuntimeError(
                f"The auxiliary loss of {self.where} was recorded under reentrant activation checkpointing "
                "(use_reentrant=True), where its gradient reaches the router only through the layer's recomputation, "
                f"and this backward {'runs after' if self.replayed else 'does not include'} that recomputation. " + FIX
            )
        self.grad = grad if self.grad is None else self.grad + grad

    def _take(self) -> torch.Tensor | None:
        self.replayed = True
        grad, self.grad = self.grad, None
        return grad


def _will_execute(node: Any) -> bool:
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    return True if will_execute is None else bool(will_execute(node))


class _CollectGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, value: torch.Tensor, deferred: DeferredGradient) -> torch.Tensor:
        ctx.deferred = deferred
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        ctx.deferred._receive(grad)
        return None, None, None


class _InjectGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, live: torch.Tensor, deferred: DeferredGradient) -> torch.Tensor:
        ctx.deferred = deferred
        ctx.live_meta = (live.shape, live.dtype, live.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        grad = ctx.deferred._take()
        if grad is not None:
            shape, dtype, device = ctx.live_meta
            grad = grad.to(device=device, dtype=dtype).reshape(shape)
        return grad_output, grad, None


class ReplayingCheckpoint:
    """Stands in for a checkpointed layer's ``_gradient_checkpointing_func`` (transformers' checkpoint function).

    The first call of the layer function is the forward: with gradients off (reentrant checkpointing) its layers see
    ``NO_GRAD_FORWARD``, and the deferred values they make are tied to the layer's node in the graph once the
    checkpoint returns. Every later call is a replay: it runs in a copy of the forward's context (whatever thread
    backward runs it on) and its layers see ``REPLAY``.
    """

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        forward_context = contextvars.copy_context()
        deferred: list[DeferredGradient] = []
        calls = 0

        def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                return forward_context.copy().run(_run_in_pass, REPLAY, None, function, inner_args, inner_kwargs)
            grad_pass = None if torch.is_grad_enabled() else NO_GRAD_FORWARD
            return _run_in_pass(grad_pass, deferred, function, inner_args, inner_kwargs)

        output = self.checkpoint(run, *args, **kwargs)
        if deferred:
            node = _first_grad_fn(output)
            for value in deferred:
                value.replay_node = node
        return output


def _run_in_pass(grad_pass, deferred, function, args, kwargs):
    pass_token, deferred_token = _PASS.set(grad_pass), _DEFERRED.set(deferred)
    try:
        return function(*args, **kwargs)
    finally:
        _PASS.reset(pass_token)
        _DEFERRED.reset(deferred_token)


def _first_grad_fn(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.grad_fn
    if isinstance(output, (tuple, list)):
        return next((t.grad_fn for t in output if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
    return None


def replay_checkpointed_layers(layers: Iterable[nn.Module]) -> None:
    """Wrap the checkpoint function transformers gave each of ``layers`` (if any) in a ``ReplayingCheckpoint``.

    Called at every forward: ``gradient_checkpointing_enable`` may run before or after the adapter was added, and
    replaces the function each time.
    """
    for layer in layers:
        checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, ReplayingCheckpoint):
            layer._gradient_checkpointing_func = ReplayingCheckpoint(checkpoint)
