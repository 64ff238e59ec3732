"""DLO's routing statistics: per routed layer, how many real tokens it executed and how its router scored them.

Computed from the forward's records only when they are read (``peft_depth.routing_stats``), so the forward itself
never waits for the device.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import DLOConfig
from .forward_state import DLORecord

__all__ = ["routing_summary"]


def routing_summary(
    records: dict[int, DLORecord], layout: list[tuple[str, int]], config: DLOConfig, step: int
) -> dict[str, Any]:
    """``{"layers": [...], "executed_fraction", "capacity_target", "step"}`` of one adapter's last forward."""
    rows = []
    executed_total, tokens_total = 0, 0
    for position in sorted(records):
        record = records[position]
        selected = record.selected
        if record.valid is not None:
            executed = int((selected & record.valid).sum())
            tokens = int(record.valid.sum())
            mean_score = float(torch.sigmoid(record.logits.detach())[record.valid].mean()) if tokens else 0.0
        else:
            executed, tokens = int(selected.sum()), selected.numel()
            mean_score = float(torch.sigmoid(record.logits.detach()).mean())
        executed_total += executed
        tokens_total += tokens
        rows.append(
            {
                "layer": position,
                "new": layout[position][0] == "new",
                "num_tokens": tokens,
                "executed_fraction": executed / tokens if tokens else 0.0,
                "capacity": record.capacity,  # None in eval threshold mode
                "mean_score": mean_score,
            }
        )
    return {
        "layers": rows,
        "executed_fraction": executed_total / tokens_total if tokens_total else 0.0,
        "capacity_target": config.capacity_at(step),
        "step": step,
    }
