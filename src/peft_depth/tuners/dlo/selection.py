"""Batch-wide top-fraction token selection, optionally over the global batch of all processes.

DLO picks the top ``capacity`` fraction of a batch's real tokens by router score (training), and the lowest-cosine
fraction for its router labels. Equal scores are common (a zero-initialised router scores every token 0.5; the first
layer scores repeated token ids identically), so what happens to ties is part of the algorithm. The official code
(``DaizeDong/LLaMA-DLO``) takes the k-th largest score as a threshold and keeps *every* entry at or above it
(``scores >= threshold``): all tied entries run, so k is a lower bound and a zero-initialised router executes every
token whatever the capacity. That is the default here (``keep_ties=True``), for training selection and for the router
labels. ``keep_ties=False`` keeps exactly k entries, ties to earlier entries in the order of the global batch
(segment, then process, then row and position) by a stable sort, for the fixed eval budget
(``inference_selection='capacity'``); ``torch.topk`` would leave that order unspecified.

When routing statistics are synced across processes (``RoutingContext.sync_across_processes``), every process
gathers the detached scores of all processes (two small all-gathers: the sizes, then the scores with their padding
mask), ranks the global batch exactly as one process holding it would, and keeps its own slice. Scores are one float
per token and layer, so the gather is small next to the activations.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["CrossProcessGather", "select_top_fraction"]


class CrossProcessGather(Protocol):
    """What the selection needs from the process group (``RoutingContext`` provides it while syncing)."""

    @property
    def process_index(self) -> int: ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[num_processes, *tensor.shape]``: every process's ``tensor`` (same shape on all), by process index."""
        ...


def _top_fraction_in_order(
    scores: torch.Tensor, valid: torch.Tensor, fraction: float, keep_ties: bool
) -> torch.Tensor:
    """Top ``ceil(fraction · #valid)`` (at least 1) valid entries of the flat ``scores``: with ``keep_ties`` also every
    valid entry tied with the k-th (the official threshold rule), otherwise exactly k with ties to lower indices."""
    num_valid = int(valid.sum())
    if num_valid == 0:
        return valid.clone()
    k = max(1, math.ceil(fraction * num_valid - 1e-9))
    if k >= num_valid:
        return valid.clone()
    masked = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    if keep_ties:
        threshold = torch.topk(masked, k).values[-1]  # the k-th largest valid score (k <= #valid, so finite)
        return valid & (scores >= threshold)
    order = torch.sort(masked, descending=True, stable=True).indices[:k]
    chosen = torch.zeros_like(valid)
    chosen[order] = True
    return chosen


def select_top_fraction(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    fraction: float,
    sync: CrossProcessGather | None = None,
    *,
    keep_ties: bool = True,
) -> torch.Tensor:
    """Boolean mask of the top ``ceil(fraction · #valid)`` (at least 1) valid entries of ``scores``, and with
    ``keep_ties`` (the official rule) every valid entry whose score equals the k-th largest.

    Args:
        scores: ``[N]`` (one segment) or ``[S, N]`` (S segments ranked jointly, e.g. every routed layer's tokens).
        valid: same shape, False for padding (None: all real). Padding is never selected.
        fraction: share of the valid entries to select, in (0, 1].
        sync: when given, the count and the ranking are those of the global batch over all processes; the global
            order is segment, then process index, then local position, so two processes holding the two halves of a
            batch select exactly what one process holding all of it selects.
        keep_ties: keep every entry tied with the k-th largest (official; at least k selected), or exactly k.
    """
    scores = scores.detach().float()
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    segments = scores.reshape(-1, scores.shape[-1])  # [S, N]
    segment_valid = valid.reshape(segments.shape)
    if sync is None:
        chosen = _top_fraction_in_order(segments.reshape(-1), segment_valid.reshape(-1), fraction, keep_ties)
        return chosen.view(valid.shape)
    num_local = segments.shape[1]
    num_max = int(sync.all_gather(torch.tensor([num_local], device=scores.device)).max())
    # scores and validity in one float tensor, padded to the longest shard (the padding is invalid)
    local = torch.stack([segments, segment_valid.to(segments.dtype)])  # [2, S, N]
    gathered = sync.all_gather(F.pad(local, (0, num_max - num_local)))  # [P, 2, S, Nmax]
    global_scores = gathered[:, 0].transpose(0, 1)  # [S, P, Nmax]: segment-major, then process
    global_valid = gathered[:, 1].transpose(0, 1) > 0.5
    chosen = _top_fraction_in_order(global_scores.reshape(-1), global_valid.reshape(-1), fraction, keep_ties)
    mine = chosen.view(global_scores.shape)[:, sync.process_index, :num_local]
    return mine.reshape(valid.shape)
