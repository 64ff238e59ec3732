"""What one forward of a MoD model carries from hook to hook, and what it leaves behind for the statistics.

All of it lives in the forward's own ``ForwardContext`` (``core.forward_context``: per thread, kept until that
thread's next forward), never on the tuner: two threads running inference on one model each see their own captured
block outputs, call arguments and records, and ``routing_stats`` reads the calling thread's last forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.forward_context import ForwardContext
from .sequence_router import SequenceRouterState

__all__ = ["CallInfo", "MoDForwardState", "MoDRecord", "begin_forward_state", "forward_state"]

#: Key of MoD's entry in ``ForwardContext.state`` (the context is already per model, so one key per method).
_STATE_KEY = "mod"


@dataclass
class CallInfo:
    """What the pre-hook on the top-level model saw for the current forward."""

    labels: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None
    past_length: int = 0
    cache: Any = None  # the KV cache object this forward continues (None: none passed in)
    fused_lm_head: bool = False
    logits_to_keep: Any = 0
    position_ids: Any = None  # restarts mark the sequences of a padding-free (packed) row


@dataclass
class MoDRecord:
    """One adapter's record of the last forward (tensors detached except ``distill_loss``)."""

    layers: list[int]
    mean_weight: torch.Tensor
    num_tokens: torch.Tensor | int
    gate: torch.Tensor
    distill_loss: torch.Tensor | None = None
    distill_kl: torch.Tensor | None = None
    distill_positions: int = 0
    #: [B, T] real positions whose routing scores were not finite (they took the base path); counted when read
    nonfinite: torch.Tensor | None = None
    #: whether ``nonfinite_rows`` counts sequences (router_granularity='sequence') rather than tokens
    rows_are_sequences: bool = False

    def nonfinite_rows(self) -> int:
        if self.nonfinite is None:
            return 0
        flags = self.nonfinite.any(dim=1) if self.rows_are_sequences else self.nonfinite
        return int(flags.sum())

    def as_stats(self) -> dict[str, Any]:
        """The record as plain Python numbers (the device sync happens here, when statistics are read)."""
        mean_weight = self.mean_weight.float().tolist()
        return {
            "layers": self.layers,
            "mean_weight": mean_weight,
            "final_layer_weight": mean_weight[-1],
            "gate": float(self.gate),
            "num_tokens": int(self.num_tokens),
            "distill_kl": None if self.distill_kl is None else self.distill_kl.float().tolist(),
            "distill_kl_sum": None if self.distill_kl is None else float(self.distill_kl.sum()),
            "distill_positions": self.distill_positions,
            "nonfinite_rows": self.nonfinite_rows(),
        }


@dataclass
class MoDForwardState:
    """One forward's MoD state, from the top-level pre-hook to the statistics read after it.

    Attributes:
        call: what the top-level call said (labels, cache, fused head, logits_to_keep).
        captured: block index -> output hidden state of the earlier late blocks, filled while the forward runs and
            set to None once the final norm has mixed them, so activation-checkpoint recomputation of a block during
            backward neither keeps its output (and graph) alive nor passes it off as this forward's.
        pending_log_probs: ``mix_space="log_probs"`` mixes waiting for the LM head (``ensemble_head``).
        pending_sequence_state: the sequence router's state for a cache the model creates in this forward.
        records: adapter name -> its record of this forward (read by ``routing_stats`` / ``aux_losses``).
    """

    call: CallInfo = field(default_factory=CallInfo)
    captured: dict[int, torch.Tensor] | None = field(default_factory=dict)
    pending_log_probs: list[Any] | None = None
    pending_sequence_state: SequenceRouterState | None = None
    records: dict[str, MoDRecord] = field(default_factory=dict)


def begin_forward_state(context: ForwardContext, call: CallInfo) -> MoDForwardState:
    """Start MoD's state of the forward that ``context`` belongs to."""
    state = context.state[_STATE_KEY] = MoDForwardState(call=call)
    return state


def forward_state(context: ForwardContext) -> MoDForwardState | None:
    """MoD's state of the forward that ``context`` belongs to (None if MoD saw no call in it)."""
    return context.state.get(_STATE_KEY)
