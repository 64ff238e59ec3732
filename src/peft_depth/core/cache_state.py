"""Adapter state that lives on a transformers KV cache and follows the cache's in-place edits.

Some methods carry state across KV-cached forwards beyond the keys and values (MoLEx's expert caches for token
routing, MoD's running mean for the sequence router). Decoding strategies edit the model's cache in place between
steps: beam search reorders its batch rows (``reorder_cache``), assisted decoding crops rejected positions (``crop``),
others select or repeat rows (``batch_select_indices``, ``batch_repeat_interleave``). State kept next to the cache
without following those edits silently belongs to the wrong beam or to positions that no longer exist.

So such state hangs on the cache object itself (it lives and dies with one generation), and the cache's class is
switched to a subclass that applies every edit to the attached states too. A class rather than instance attributes, so
that ``copy.deepcopy`` of the cache copies a consistent pair.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers.cache_utils import Cache

__all__ = ["CacheFollower", "RowFollowingState", "attached_states", "attach_state", "map_batch_rows"]

_ATTRIBUTE = "_peft_depth_cache_states"


class CacheFollower(Protocol):
    """State attached to a cache; each method mirrors the cache edit of the same meaning."""

    def reorder(self, beam_idx: torch.Tensor) -> None: ...

    def select_rows(self, indices: torch.Tensor) -> None: ...

    def repeat_rows(self, repeats: int) -> None: ...

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``tokens_to_remove`` positions (a positive count)."""
        ...


class RowFollowingState:
    """The three batch-row edits of ``CacheFollower`` in terms of one ``map_rows(rows)``, which a state implements by
    applying ``rows`` (a function of a tensor with the batch first) to each of its per-row tensors."""

    def map_rows(self, rows: Any) -> None:
        raise NotImplementedError

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def select_rows(self, indices: torch.Tensor) -> None:
        self.map_rows(lambda t: t[indices.to(t.device)])

    def repeat_rows(self, repeats: int) -> None:
        self.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))


def attached_states(cache: Cache) -> dict[Any, CacheFollower]:
    """The states attached to ``cache`` (empty if none)."""
    return cache.__dict__.get(_ATTRIBUTE, {})


def attach_state(cache: Cache, key: Any, state: CacheFollower) -> None:
    """Attach ``state`` to ``cache`` under ``key``; from now on it follows the cache's edits."""
    _follow_edits(cache)
    cache.__dict__.setdefault(_ATTRIBUTE, {})[key] = state


def map_batch_rows(value: Any, rows: Any, batch: int) -> Any:
    """Apply ``rows`` (a function of a tensor with the batch first) to the per-row tensors in ``value``.

    Tensors whose first dimension is not ``batch`` (``[1, T]`` position ids broadcast over the batch, a 1-D
    ``cache_position``) are shared by all rows and kept; tuples and lists are mapped element-wise.
    """
    if isinstance(value, torch.Tensor):
        return rows(value) if value.dim() >= 2 and value.shape[0] == batch and batch != 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(map_batch_rows(v, rows, batch) for v in value)
    return value


class _FollowingCache:
    """Mixed in before the cache's own class: every in-place edit of the cache is applied to the attached states."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for state in attached_states(self).values():
            state.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for state in attached_states(self).values():
            state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for state in attached_states(self).values():
            state.repeat_rows(repeats)

    def activate_past_recording(self, *args: Any, **kwargs: Any) -> None:
        # transformers 5.25 passes `recurrent_states_to_keep` (for linear-attention layers): whatever the cache's own
        # method takes goes through, to it and to the states' side caches (of the same transformers)
        super().activate_past_recording(*args, **kwargs)
        for state in attached_states(self).values():
            if hasattr(state, "activate_past_recording"):
                state.activate_past_recording(*args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # transformers takes a negative count (a positive one is refused there)
        if tokens_to_remove:
            for state in attached_states(self).values():
                state.crop(abs(int(tokens_to_remove)))


_FOLLOWING_CLASSES: dict[type, type] = {}


def _follow_edits(cache: Cache) -> None:
    cls = type(cache)
    if issubclass(cls, _FollowingCache):
        return
    following = _FOLLOWING_CLASSES.get(cls)
    if following is None:
        following = type(cls.__name__, (_FollowingCache, cls), {"__module__": cls.__module__})
        _FOLLOWING_CLASSES[cls] = following
    cache.__class__ = following
