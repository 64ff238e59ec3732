"""What one forward of a DLO model decides and records, kept with that forward rather than on shared modules.

A routed layer decides which tokens execute (a ``RoutingPlan``), its MLP shadow reads that decision, and the tuner
later reads what happened (a ``DLORecord`` per layer, the router loss). Two threads running one model must not see
each other's decisions, so all of it lives in the forward's ``ForwardContext`` (``core.forward_context``: one per
thread, made when the model's top-level forward starts and kept until that thread's next forward, so that
activation-checkpoint recomputation in backward finds the same plans), under ``context.state["dlo"]``.

Each state is stamped with the *installation* of the expanded stack that wrote it: after ``set_adapter``,
``disable_adapter()`` or a reinstall, records of earlier forwards no longer describe the model and are not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.forward_context import ForwardContext

__all__ = [
    "DLOForwardState",
    "DLORecord",
    "FORWARD_STATE_KEY",
    "RoutingPlan",
    "read_forward_state",
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
    """Everything DLO's layers wrote during one top-level forward, by position in the expanded stack.

    Attributes:
        installation: the installation of the expanded stack that ran this forward.
        plans: each routed layer's plan, read by its MLP and norm shadows (again when checkpointing recomputes).
        records: each routed layer's routing, published when the layer's forward completes.
        router_loss: the router loss of this forward (training with labels), set after the forward.
    """

    installation: int
    plans: dict[int, RoutingPlan] = field(default_factory=dict)
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
