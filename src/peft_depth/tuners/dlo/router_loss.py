"""DLO's router loss: labels from how much each layer's MLP changes the residual stream, and the BCE against them.

A token is labelled "execute" at a layer when the cosine similarity between the residual stream before and after the
MLP is among the lowest (the MLP changes it most). ``loss_type='cos'`` ranks each layer's tokens at that layer's
capacity; ``'cos_global'`` (the paper's default) ranks every (layer, token) pair together at the annealed capacity
and returns each layer's share as its capacity for the next forward. As in the official code, every token tied with
the threshold similarity is labelled "execute" too (``select_top_fraction``'s ``keep_ties``).
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
            labels[position] = select_top_fraction(-record.cos, record.counted, record.capacity, sync, keep_ties=True)
        return labels, None
    # One ranking over every (layer, token): the lowest cosine similarities overall are labelled "execute"; each
    # layer's share becomes its capacity for the next forward.
    scores = torch.stack([-records[p].cos for p in positions])  # [layers, N]
    valid = torch.stack([records[p].counted for p in positions])  # a token with a non-finite score is never ranked
    chosen = select_top_fraction(scores, valid, capacity, sync, keep_ties=True)
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
    """Mean over routed layers of the BCE between router logits and labels, over the real tokens with a finite score
    (global batch). A layer where no token counts (every score non-finite) is left out of the mean."""
    losses, has_tokens = [], []
    for position in sorted(records):
        record = records[position]
        counted = record.counted
        target = labels[position].to(record.logits.dtype)
        # where, not a product with the mask: 0 · NaN would still be NaN, in the loss and in its gradient
        logits = torch.where(counted, record.logits, 0.0)
        per_token = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        total = torch.where(counted, per_token, 0.0).sum()
        count = counted.sum().to(per_token.dtype)
        if reduce is not None:
            total, count = reduce(total), reduce(count.detach())
        losses.append(total / count.clamp_min(1))
        has_tokens.append(count > 0)
    weights = torch.stack(has_tokens).to(losses[0].dtype)
    return (torch.stack(losses) * weights).sum() / weights.sum().clamp_min(1)
