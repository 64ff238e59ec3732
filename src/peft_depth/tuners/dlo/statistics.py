"""DLO's routing statistics: per routed layer, how many real tokens it executed and how its router scored them.

Computed from the forward's records only when they are read (``peft_depth.routing_stats``), so the forward itself
never waits for the device.
"""

from __future__ import annotations

from typing import Any

import torch

from .forward_state import DLORecord

__all__ = ["routing_summary"]


def routing_summary(
    records: dict[int, DLORecord], layout: list[tuple[str, int]], capacity_target: float | None, step: int
) -> dict[str, Any]:
    """``{"layers": [...], "executed_fraction", "executed_fraction_by_kind", "nonfinite_rows", "capacity_target",
    "step"}`` of one adapter's last forward.

    Per layer: ``num_tokens`` (real tokens with a finite router score), ``executed_fraction`` (the share of them the
    router executed; 0.0 when there are none, so that token-weighted merges stay finite), ``nonfinite_rows`` (real
    tokens whose score was NaN or infinite: they took the base path, i.e. the layer ran on them unscaled, and are in
    no other number), ``capacity`` (None in eval threshold mode) and ``mean_score``.

    Overall: ``executed_fraction`` is token-weighted over the routed layers; ``executed_fraction_by_kind`` splits it
    into ``"original"`` (the base's pretrained layers) and ``"new"`` (the inserted copies), None for a kind without
    routed layers; ``capacity_target`` is the annealed training capacity at ``step`` (None while a
    ``capacity_annealing_fraction`` adapter does not know its run's length).
    """
    rows = []
    executed_total, tokens_total, nonfinite_total = 0, 0, 0
    by_kind = {"original": [0, 0], "new": [0, 0]}  # executed, tokens
    for position in sorted(records):
        record = records[position]
        counted = record.counted
        real = record.valid if record.valid is not None else torch.ones_like(counted)
        tokens = int(counted.sum())
        executed = int((record.selected & counted).sum())
        nonfinite = int((record.nonfinite & real).sum())
        mean_score = float(torch.sigmoid(record.logits.detach())[counted].mean()) if tokens else 0.0
        executed_total += executed
        tokens_total += tokens
        nonfinite_total += nonfinite
        kind = by_kind["new" if layout[position][0] == "new" else "original"]
        kind[0] += executed
        kind[1] += tokens
        rows.append(
            {
                "layer": position,
                "new": layout[position][0] == "new",
                "num_tokens": tokens,
                "executed_fraction": executed / tokens if tokens else 0.0,
                "capacity": record.capacity,  # None in eval threshold mode
                "mean_score": mean_score,
                "nonfinite_rows": nonfinite,
            }
        )
    return {
        "layers": rows,
        "executed_fraction": executed_total / tokens_total if tokens_total else 0.0,
        # the same over the routed original layers only and the routed new layers only (None: no such routed layer)
        "executed_fraction_by_kind": {
            kind: executed / tokens if tokens else None for kind, (executed, tokens) in by_kind.items()
        },
        "nonfinite_rows": nonfinite_total,
        "capacity_target": capacity_target,  # None: anneals over a fraction of an unknown run
        "step": step,
    }
