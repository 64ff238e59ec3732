"""KV caches for the expert passes of ``"token"`` routing.

When MoLEx layer i calls block j on its input, block j's attention writes its keys and values with its own
``layer_idx`` (j). Handing it the model's cache would write layer j's real slot, corrupting the cache layer j itself
reads later. Each MoLEx layer i therefore gets a side ``DynamicCache`` (built from the model config, so sliding-window
layers get sliding cache layers), in which block j writes slot j: the cache of expert pass (i, j).

A token may choose an expert that earlier tokens did not use, so that expert's cache lacks their keys and values. They
are filled in ("catch-up") by running block j on the stored inputs of layer i at the missing positions. Keys and values
of a position depend only on that position's input and position embedding, never on the attention mask, so the
catch-up runs without a mask and its outputs are discarded.

The side state hangs on the model's cache object (``core.cache_state``), so it lives and dies with one generation and
follows the cache's in-place edits: beam search's row reordering, assisted decoding's cropping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from ...core.cache_state import RowFollowingState, attach_state, attached_states, map_batch_rows

__all__ = ["ExpertCacheState", "expert_cache_state", "POSITION_KWARGS"]

#: Per-position keyword arguments of a block call, with the dimension that indexes positions.
POSITION_KWARGS = {"position_ids": -1, "cache_position": -1}


def _positions(value: Any, dim: int, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.narrow(dim if dim >= 0 else value.dim() + dim, start, stop - start)
    if isinstance(value, (tuple, list)):  # position_embeddings = (cos, sin), positions on dim -2
        return type(value)(_positions(v, -2, start, stop) for v in value)
    return value


def _concat(old: Any, new: Any, dim: int) -> Any:
    if old is None:
        return new
    if isinstance(new, torch.Tensor):
        return torch.cat([old, new], dim=dim)
    return type(new)(torch.cat([o, n], dim=-2) for o, n in zip(old, new))


@dataclass
class ExpertCacheState(RowFollowingState):
    """Side cache and input history of one MoLEx layer during one generation."""

    cache: DynamicCache
    inputs: torch.Tensor | None = None  # [batch, past, hidden] inputs of layer i at past positions
    positions: dict[str, Any] = field(default_factory=dict)  # per-position kwargs at past positions

    @property
    def past_length(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[1]

    def catch_up_kwargs(self, start: int, stop: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments to run an expert block on the stored positions ``[start, stop)``."""
        caught = dict(kwargs)
        caught["attention_mask"] = None
        for name, value in self.positions.items():
            dim = POSITION_KWARGS.get(name, -2)
            caught[name] = _positions(value, dim, start, stop)
        return caught

    # ---- edits that follow the model's cache (core.cache_state.CacheFollower)

    def activate_past_recording(self, *args: Any, **kwargs: Any) -> None:
        """Sliding-window layers keep the positions a later ``crop`` may take back (assisted decoding); the model
        cache's arguments, as transformers passed them."""
        self.cache.activate_past_recording(*args, **kwargs)

    def map_rows(self, rows: Any) -> None:
        if self.inputs is None:
            return
        batch = self.inputs.shape[0]
        self.inputs = rows(self.inputs)
        self.positions = {name: map_batch_rows(value, rows, batch) for name, value in self.positions.items()}
        # the side cache's keys and values are [batch, heads, positions, dim], as in the model's own cache layers
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = rows(layer.keys), rows(layer.values)

    def crop(self, tokens_to_remove: int) -> None:
        length = self.past_length - tokens_to_remove
        if self.inputs is None or tokens_to_remove <= 0:
            return
        self.inputs = self.inputs[:, :length]
        self.positions = {
            name: _positions(value, POSITION_KWARGS.get(name, -2), 0, length) for name, value in self.positions.items()
        }
        # expert slots hold different lengths (each catches up lazily): crop each to at most `length`
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)

    def append(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        self.inputs = _concat(self.inputs, hidden.detach(), 1)
        for name in ("position_embeddings", *POSITION_KWARGS):
            value = kwargs.get(name)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach()
            self.positions[name] = _concat(self.positions.get(name), value, POSITION_KWARGS.get(name, -2))


def expert_cache_state(cache: Cache, key: tuple[int, str, int], model_config: Any, real_past: int) -> ExpertCacheState:
    """The side state of MoLEx layer ``key = (id(tuner), adapter, i)`` for the generation that owns ``cache``.

    ``real_past`` is the number of positions layer i's real cache holds before this call: 0 starts a new generation
    (fresh side caches); otherwise the stored history must cover exactly those positions.
    """
    if any(getattr(layer, "is_compileable", False) for layer in getattr(cache, "layers", ())):
        raise ValueError(
            "MoLEx routing='token' keeps a growing side cache for each expert pass, which a static (compileable) KV "
            "cache's fixed-width attention mask does not fit. Generate with the default dynamic cache (no "
            "cache_implementation='static' / StaticCache), or use routing='batch_vote' or 'sequence'."
        )
    state = attached_states(cache).get(("molex", key))
    if real_past == 0 or state is None:
        if real_past != 0:
            raise RuntimeError(
                "MoLEx token routing got a KV cache that already holds positions its expert caches never saw (a cache "
                "filled without MoLEx, or with adapters disabled). Start generation from an empty cache."
            )
        state = ExpertCacheState(
            cache=DynamicCache(config=model_config) if model_config is not None else DynamicCache()
        )
        if any(getattr(layer, "record_past", False) for layer in getattr(cache, "layers", ())):
            state.activate_past_recording()  # assisted decoding asked the model's cache to keep what it may crop
        attach_state(cache, ("molex", key), state)
    elif state.past_length != real_past:
        raise RuntimeError(
            f"MoLEx token routing: the KV cache holds {real_past} positions but the expert caches saw "
            f"{state.past_length}: it was changed outside the edits MoLEx follows (reorder_cache, crop, "
            "batch_select_indices, batch_repeat_interleave). Start generation from an empty cache."
        )
    return state
