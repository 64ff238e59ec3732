"""The sequence router's input: a causal running mean of the normalised final states over real tokens, continued
across KV-cached forwards through state attached to the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from ...core.cache_state import RowFollowingState, attach_state, attached_states

__all__ = ["SequenceRouterState", "segment_starts", "sequence_router_input"]


@dataclass
class SequenceRouterState(RowFollowingState):
    """Cumulative sum and count of the sequence router's input over real tokens, at every position of a KV cache.

    Attached to the cache (``core.cache_state``), so beam search's row reordering and assisted decoding's cropping
    apply to it too; chunks are ``[B, t, H]`` / ``[B, t, 1]``, one per cached forward.
    """

    totals: list[torch.Tensor]
    counts: list[torch.Tensor]

    @property
    def seen(self) -> int:
        return sum(chunk.shape[1] for chunk in self.totals)

    @property
    def batch(self) -> int:
        return self.totals[0].shape[0]

    def last(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.totals[-1][:, -1], self.counts[-1][:, -1]

    def append(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.totals.append(total)
        self.counts.append(count)

    def map_rows(self, rows) -> None:
        self.totals = [rows(t) for t in self.totals]
        self.counts = [rows(c) for c in self.counts]

    def crop(self, tokens_to_remove: int) -> None:
        keep = self.seen - tokens_to_remove
        self.totals = [torch.cat(self.totals, dim=1)[:, :keep]]
        self.counts = [torch.cat(self.counts, dim=1)[:, :keep]]


def segment_starts(position_ids: Any, batch: int, seq: int) -> torch.Tensor | None:
    """``[B, T]`` start index of each token's sequence within its row, for rows that pack several sequences
    (padding-free batches: ``position_ids`` restart); None when no row does (or there are no positions)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != seq:
        return None
    positions = position_ids.expand(batch, -1)
    restarts = torch.zeros_like(positions, dtype=torch.bool)
    restarts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    if not bool(restarts.any()):
        return None
    index = torch.arange(seq, device=positions.device).expand(batch, -1)
    return torch.where(restarts, index, 0).cummax(dim=1).values


def _within_sequences(running: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """A cumulative sum along dim 1 restarted at each token's sequence start."""
    before = running.gather(1, (starts - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, running.shape[-1]))
    return running - torch.where((starts > 0).unsqueeze(-1), before, 0.0)


def sequence_router_input(
    base: torch.Tensor,
    mask: torch.Tensor | None,
    cache: Cache | None,
    past_length: int,
    state_key: Any,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SequenceRouterState | None]:
    """The running mean ``[B, T, H]`` of ``base`` over real tokens, continued from ``cache``'s attached state.

    ``starts`` (``segment_starts``): in a row that packs several sequences, each token's mean covers its own
    sequence only (a mean across them let one sequence's tokens steer another's routing).

    Returns it with the state to attach to a cache the model creates in this forward (``cache`` is None: none was
    passed in), or None when the state already lives on ``cache``.
    """
    batch, seq = base.shape[0], base.shape[1]
    if mask is None:
        total = base.float().cumsum(dim=1)
        count = torch.ones(batch, seq, 1, dtype=torch.float32, device=base.device).cumsum(dim=1)
    else:
        real = mask.unsqueeze(-1).bool()
        # where, not a product with the mask: a non-finite value at a padding position must not reach real tokens
        total = torch.where(real, base.float(), 0.0).cumsum(dim=1)
        count = real.float().cumsum(dim=1)
    if starts is not None:
        total, count = _within_sequences(total, starts), _within_sequences(count, starts)
    state: SequenceRouterState | None = None
    if past_length > 0:
        state = attached_states(cache).get(state_key) if cache is not None else None
        if state is None or state.seen != past_length or state.batch != batch:
            raise ValueError(
                "MoD `router_granularity`='sequence' continues a running mean across KV-cached forwards, but this "
                f"forward continues a cache of {past_length} positions that MoD did not see (a cache filled "
                "without this adapter, or edited outside reorder/crop/select); run without a cache or use "
                "'token' routing."
            )
        last_total, last_count = state.last()
        if starts is None:
            total = total + last_total.unsqueeze(1)
            count = count + last_count.unsqueeze(1)
        else:  # only the tokens of the sequence the cache holds continue its mean
            continues = (starts == 0).unsqueeze(-1)
            total = total + torch.where(continues, last_total.unsqueeze(1), 0.0)
            count = count + torch.where(continues, last_count.unsqueeze(1), 0.0)
    pending = None
    if state is not None:
        state.append(total.detach(), count.detach())
    elif cache is not None:
        attach_state(cache, state_key, SequenceRouterState([total.detach()], [count.detach()]))
    else:
        # no cache passed in: the model may create one; the caller attaches this state to it after the forward
        pending = SequenceRouterState([total.detach()], [count.detach()])
    return (total / count.clamp(min=1)).to(base.dtype), pending
