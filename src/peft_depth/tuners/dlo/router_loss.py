"""DLO's router loss: labels from how much each layer's MLP changes the residual stream, and the BCE against them.

A token is labelled "execute" at a layer when the cosine similarity between the residual stream before and after the
MLP is among the lowest (the MLP changes it most). ``loss_type='cos'`` ranks each layer's tokens at that layer's
capacity; ``'cos_global'`` (the paper's default) ranks every (layer, token) pair together at the annealed capacity
and returns each layer's share as its capacity for the next forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import DLOConfig
from .forward_state import DLORecord
from .selection import CrossProcessGather, select_top_fraction

__all__ = ["router_labels", "router_loss"]


def router_labels(
    config: DLOConfig,
    records: dict[int, DLORecord],
    capacity: float,
    sync: CrossProcessGather | None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[dict[int, torch.Tensor], dict[int, float] | None]:
    """``(labels per position, next per-layer capacities or None)`` for the routed layers' ``records``.

    Args:
        capacity: the annealed training capacity (used by ``cos_global``; ``cos`` uses each record's own).
        sync / reduce: the cross-process gather and sum while routing statistics are synced, else None.
    """
    positions = sorted(records)
    labels: dict[int, torch.Tensor] = {}
    if config.loss_type == "cos":
        for position in positions:
            record = records[position]
            labels[position] = select_top_fraction(-record.cos, record.valid, record.capacity, sync)
        return labels, None
    # One ranking over every (layer, token): the lowest cosine similarities overall are labelled "execute"; each
    # layer's share becomes its capacity for the next forward.
    scores = torch.stack([-records[p].cos for p in positions])  # [layers, N]
    first_valid = records[positions[0]].valid
    valid = (
        torch.ones_like(scores, dtype=torch.bool)
        if first_valid is None
        else first_valid.unsqueeze(0).expand_as(scores)  # every layer sees the same tokens
    )
    chosen = select_top_fraction(scores, valid, capacity, sync)
    counts = torch.stack([chosen.sum(dim=1), valid.sum(dim=1)], dim=1).to(torch.float64)  # [layers, 2]
    if reduce is not None:
        counts = reduce(counts)
    capacities = {}
    for row, position in enumerate(positions):
        labels[position] = chosen[row]
        fraction = float(counts[row, 0] / counts[row, 1].clamp_min(1))
        capacities[position] = max(config.min_capacity, min(1.0, fraction))
    return labels, capacities


def router_loss(
    records: dict[int, DLORecord],
    labels: dict[int, torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Mean over routed layers of the BCE between router logits and labels, over real tokens (global batch)."""
    losses = []
    for position in sorted(records):
        record = records[position]
        target = labels[position].to(record.logits.dtype)
        per_token = F.binary_cross_entropy_with_logits(record.logits, target, reduction="none")
        if record.valid is not None:
            weight = record.valid.to(per_token.dtype)
            total, count = (per_token * weight).sum(), weight.sum()
        else:
            total = per_token.sum()
            count = torch.tensor(float(per_token.numel()), device=per_token.device)
        if reduce is not None:
            total, count = reduce(total), reduce(count.detach())
        losses.append(total / count.clamp_min(1))
    return torch.stack(losses).mean()
