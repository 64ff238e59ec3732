"""What one forward of a MoD model carries from hook to hook, and what it leaves behind for the statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CallInfo", "MoDRecord"]


@dataclass
class CallInfo:
    """What the pre-hook on the top-level model saw for the current forward."""

    labels: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None
    past_length: int = 0
    cache: Any = None  # the KV cache object this forward continues (None: none passed in)
    fused_lm_head: bool = False
    logits_to_keep: Any = 0


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
        }
