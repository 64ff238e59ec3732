"""What one forward of a DLO model decides and records, kept with that forward rather than on shared modules.

Two threads running one model must not see each other's decisions, so nothing of a forward lives on a module:

- A routed layer's *plan* (which tokens execute, their scale) belongs to one call of that layer: ``running_plan``
  makes it visible to the layer's MLP and norm shadows for the duration of the call, through a ``ContextVar`` (per
  thread and per asyncio task). Activation checkpointing replays the layer in backward, possibly on another thread
  (CUDA's autograd worker), which sees none of this thread's context; ``PlanCarryingCheckpoint`` therefore hands the
  replay the plans in effect when the layer was checkpointed.
- What the tuner reads afterwards (a ``DLORecord`` per routed layer, the router loss) lives in the forward's
  ``ForwardContext`` (``core.forward_context``: one per thread, kept until that thread's next forward) under
  ``context.state["dlo"]``, stamped with the *installation* of the expanded stack that wrote it: after
  ``set_adapter``, ``disable_adapter()`` or a reinstall, records of earlier forwards are not read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ...core.forward_context import ForwardContext

__all__ = [
    "DLOForwardState",
    "DLORecord",
    "FORWARD_STATE_KEY",
    "PlanCarryingCheckpoint",
    "RoutingPlan",
    "carry_plans_into_checkpointing",
    "read_forward_state",
    "running_plan",
    "running_plan_of",
    "stop_carrying_plans",
    "write_forward_state",
]

#: Key of DLO's entry in ``ForwardContext.state``.
FORWARD_STATE_KEY = "dlo"


@dataclass
class RoutingPlan:
    """What one routed layer does with the tokens of the current forward (flattened to ``[N]``)."""

    training: bool
    selected: torch.Tensor  # [N] bool
    index: torch.Tensor | None  # [k] positions the router chose (eval); None: every token runs
    base_index: torch.Tensor | None  # [j] positions on the base path (non-finite score); None when index is None
    scale: torch.Tensor  # [N] fp32, 1 + scale_gap·(s − 0.5)
    want_cos: bool
    residual: torch.Tensor | None = None  # h' entering the MLP (set by ResidualTap)
    cos: torch.Tensor | None = None  # [N] cosine(h', h' + MLP(h')) (set by SkipMLP / the block)
    # what the layer multiplies its branch by when adding it to the residual (Granite's residual_multiplier)
    residual_multiplier: float = 1.0


@dataclass
class DLORecord:
    """One routed layer's routing in a forward, for the router loss and the statistics."""

    logits: torch.Tensor  # [N] fp32 router logits (carry gradient in training)
    valid: torch.Tensor | None  # [N] real-token mask (None: all real)
    selected: torch.Tensor  # [N] bool
    cos: torch.Tensor | None  # [N] or None (eval, or no labels wanted)
    capacity: float | None  # training capacity used (None in eval threshold mode)
    training: bool
    nonfinite: torch.Tensor  # [N] bool: score NaN or infinite, so the token took the base path

    @property
    def counted(self) -> torch.Tensor:
        """``[N]`` tokens that enter batch statistics, labels and the loss: real, with a finite router score."""
        finite = ~self.nonfinite
        return finite if self.valid is None else self.valid & finite


@dataclass
class DLOForwardState:
    """What DLO's layers recorded during one top-level forward, by position in the expanded stack.

    Attributes:
        installation: the installation of the expanded stack that ran this forward.
        records: each routed layer's routing, published when the layer's forward completes.
        router_loss: the router loss of this forward (training with labels), set after the forward.
    """

    installation: int
    records: dict[int, DLORecord] = field(default_factory=dict)
    router_loss: torch.Tensor | None = None


def read_forward_state(context: ForwardContext | None, installation: int) -> DLOForwardState | None:
    """The DLO state ``context`` holds for ``installation``, or None (no forward yet, or an earlier installation)."""
    if context is None:
        return None
    state = context.state.get(FORWARD_STATE_KEY)
    return state if state is not None and state.installation == installation else None


def write_forward_state(context: ForwardContext, installation: int) -> DLOForwardState:
    """The DLO state of ``context`` for ``installation``, made by the first routed layer of the forward."""
    state = read_forward_state(context, installation)
    if state is None:
        state = context.state[FORWARD_STATE_KEY] = DLOForwardState(installation)
    return state


# The plans of the routed-layer calls in progress on this thread (or task), by block. Always replaced, never mutated.
_RUNNING_PLANS: ContextVar[Mapping[nn.Module, RoutingPlan]] = ContextVar(
    "peft_depth_dlo_running_plans", default=MappingProxyType({})
)


@contextlib.contextmanager
def running_plan(block: nn.Module, plan: RoutingPlan) -> Iterator[None]:
    """Make ``plan`` the plan of ``block`` for the call inside the ``with``, on this thread only."""
    token = _RUNNING_PLANS.set(MappingProxyType({**_RUNNING_PLANS.get(), block: plan}))
    try:
        yield
    finally:
        _RUNNING_PLANS.reset(token)


def running_plan_of(block: nn.Module) -> RoutingPlan | None:
    """The plan of ``block``'s call in progress on this thread (None outside one)."""
    return _RUNNING_PLANS.get().get(block)


class PlanCarryingCheckpoint:
    """Stands in for a decoder layer's ``_gradient_checkpointing_func`` (transformers' checkpoint function).

    Called when the layer is checkpointed, in the forward's thread, it captures the plans in effect; the function it
    hands to the real checkpoint sets them again before running the layer, so the replay in backward finds them on
    whatever thread it runs.

    The plans' scales carry the routers' gradient into the layer's output, so they go through the checkpoint as
    arguments: reentrant checkpointing (``use_reentrant=True``) connects its replay to the rest of the graph only
    through its arguments, and a replay that read the forward's scale tensor directly would backpropagate the
    router's part of the graph a second time.
    """

    def __init__(self, checkpoint: Callable[..., Any]) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        plans = _RUNNING_PLANS.get()
        blocks = list(plans)
        num_args = len(args)

        def with_plans(*inner_args: Any, **inner_kwargs: Any) -> Any:
            scales = inner_args[num_args:]
            # the forward gets the plans' own scales (and its shadows write into those plans); a reentrant replay gets
            # detached copies, connected to the router through the checkpoint
            current = {
                block: plan if scale is plan.scale else replace(plan, scale=scale)
                for block, plan, scale in zip(blocks, (plans[block] for block in blocks), scales)
            }
            token = _RUNNING_PLANS.set(MappingProxyType(current))
            try:
                return function(*inner_args[:num_args], **inner_kwargs)
            finally:
                _RUNNING_PLANS.reset(token)

        return self.checkpoint(with_plans, *args, *(plans[block].scale for block in blocks), **kwargs)


def carry_plans_into_checkpointing(layer: nn.Module) -> None:
    """Wrap the checkpoint function transformers gave ``layer`` (if any) in a ``PlanCarryingCheckpoint``."""
    checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
    if checkpoint is not None and not isinstance(checkpoint, PlanCarryingCheckpoint):
        layer._gradient_checkpointing_func = PlanCarryingCheckpoint(checkpoint)


def stop_carrying_plans(layer: nn.Module) -> None:
    """Give ``layer`` back the checkpoint function ``carry_plans_into_checkpointing`` wrapped."""
    checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
    if isinstance(checkpoint, PlanCarryingCheckpoint):
        layer._gradient_checkpointing_func = checkpoint.checkpoint
