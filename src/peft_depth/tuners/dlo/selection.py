"""Batch-wide top-fraction token selection, optionally over the global batch of all processes.

DLO picks the top ``capacity`` fraction of a batch's real tokens by router score (training), and the lowest-cosine
fraction for its router labels. On one process that is ``topk``. When routing statistics are synced across processes
(``RoutingContext.sync_across_processes``), the fraction is of the *global* batch: the k-th largest score over all
processes is found by bisection on the scores' order-preserving integer keys, each step one scalar ``reduce_sum`` of
a count (32 steps for float32), so no process ever needs the others' scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["global_kth_largest", "select_top_fraction"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the same order as the float32 ``values`` (IEEE sign-magnitude -> two's complement order)."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def global_kth_largest(values: torch.Tensor, valid: torch.Tensor, k: int, reduce_sum: Reduce) -> torch.Tensor:
    """Order key of the k-th largest valid value over every process (``reduce_sum`` sums over processes).

    Returns the largest key ``t`` with ``#{valid values with key >= t} >= k`` (summed over processes), as a 0-d
    int64 tensor; ``_order_keys(values) >= t`` then selects the global top-k (plus exact ties).
    """
    keys = _order_keys(values)
    low, high = -(2**31), 2**31 - 1  # invariant: count(>= low) >= k, count(>= high + 1) < k
    low_t = torch.tensor(low, dtype=torch.int64, device=values.device)
    high_t = torch.tensor(high, dtype=torch.int64, device=values.device)
    for _ in range(33):
        mid = (low_t + high_t + 1) // 2
        count = reduce_sum(((keys >= mid) & valid).sum().to(torch.float64))
        enough = count >= k
        low_t = torch.where(enough, mid, low_t)
        high_t = torch.where(enough, high_t, mid - 1)
    return low_t


def select_top_fraction(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    fraction: float,
    reduce_sum: Reduce | None = None,
) -> torch.Tensor:
    """Boolean mask of the top ``ceil(fraction · #valid)`` (at least 1) valid entries of ``scores`` ``[N]``.

    ``valid`` (None: all) excludes padding. With ``reduce_sum`` (cross-process sum) the count and the threshold are
    those of the global batch; without it the selection is an exact local ``topk``. Padding is never selected.
    """
    scores = scores.detach()
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    num_valid_local = valid.sum()
    if reduce_sum is None:
        num_valid = int(num_valid_local)
        if num_valid == 0:
            return valid.clone()
        k = max(1, math.ceil(fraction * num_valid - 1e-9))
        if k >= num_valid:
            return valid.clone()
        masked = torch.where(valid, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
        chosen = torch.zeros_like(valid)
        chosen[masked.topk(k).indices] = True
        return chosen
    num_valid = int(reduce_sum(num_valid_local.to(torch.float64)).item())
    if num_valid == 0:
        return valid.clone()
    k = max(1, math.ceil(fraction * num_valid - 1e-9))
    if k >= num_valid:
        return valid.clone()
    threshold = global_kth_largest(scores, valid, k, reduce_sum)
    return valid & (_order_keys(scores) >= threshold)
