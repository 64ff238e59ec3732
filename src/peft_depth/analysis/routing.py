"""Accumulate ``peft_depth.routing_stats`` over many forwards, weighting every statistic by its token count.

``routing_stats`` describes the last forward only. Its payloads nest dicts and lists; a dict carrying ``num_tokens``
(a layer row, or MoD's per-adapter record) is an average over that many real tokens. Merging batches therefore means:

- numbers and lists of numbers that are averages are combined as token-weighted means (``Σ n_b v_b / Σ n_b``), which
  equals the statistic of all batches' tokens at once (expert fractions, mean probabilities, executed fractions);
  a dict without its own ``num_tokens`` is weighted by the tokens of the rows below it (DLO's overall fraction);
- counts (``num_tokens``, keys starting with ``num_`` that vary, ``distill_positions``) are summed;
- values equal in every batch (layer indices, expert counts, a gate) pass through unchanged;
- ``chosen`` (MoLEx's chosen expert layers) becomes the sorted union over batches;
- afterwards, statistics that are not averages are recomputed from the merged ones: ``usage_entropy`` from
  ``expert_fraction`` and ``balance_loss`` (E · Σ f·P) from ``expert_fraction`` and ``mean_prob``.

Unknown methods go through the same generic rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["RoutingAccumulator"]

_SUMMED_KEYS = ("num_tokens", "distill_positions", "nonfinite_rows")
_UNION_KEYS = ("chosen",)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_number(v) for v in value)


def _tokens_below(node: Any) -> float | None:
    """Total ``num_tokens`` of the rows below ``node`` (None when there are none)."""
    if isinstance(node, Mapping):
        if _is_number(node.get("num_tokens")):
            return float(node["num_tokens"])
        found = [t for t in (_tokens_below(v) for v in node.values()) if t is not None]
        return sum(found) if found else None
    if isinstance(node, list):
        found = [t for t in (_tokens_below(v) for v in node) if t is not None]
        return sum(found) if found else None
    return None


def _flatten_chosen(value: Any) -> set:
    if isinstance(value, list):
        out: set = set()
        for item in value:
            out |= _flatten_chosen(item)
        return out
    return {value} if value is not None else set()


class _Node:
    """Running merge state of one value of the nested payload."""

    __slots__ = ("first", "weighted_sum", "weight", "constant", "count_sum", "union", "children", "kind")

    def __init__(self) -> None:
        self.first: Any = None
        self.weighted_sum: Any = None
        self.weight = 0.0
        self.constant = True
        self.count_sum = 0
        self.union: set = set()
        self.children: Any = None
        self.kind: str | None = None


def _add(node: _Node, key: str | None, value: Any, weight: float) -> None:
    if node.kind is None:
        node.first = value
        node.kind = (
            "dict"
            if isinstance(value, Mapping)
            else "rows"
            if isinstance(value, list) and value and all(isinstance(v, (Mapping, list)) for v in value)
            else "value"
        )
    elif node.constant and value != node.first:
        node.constant = False
    if node.kind == "dict" and isinstance(value, Mapping):
        own = value.get("num_tokens")
        below = _tokens_below(value)
        child_weight = float(own) if _is_number(own) else (below if below is not None else weight)
        if node.children is None:
            node.children = {}
        for child_key, child_value in value.items():
            _add(node.children.setdefault(child_key, _Node()), child_key, child_value, child_weight)
        return
    if node.kind == "rows" and isinstance(value, list):
        if node.children is None:
            node.children = []
        while len(node.children) < len(value):
            node.children.append(_Node())
        for child, item in zip(node.children, value):
            _add(child, key, item, weight)
        return
    if key in _UNION_KEYS:
        node.union |= _flatten_chosen(value)
        return
    if key in _SUMMED_KEYS or (key is not None and key.startswith("num_") and _is_number(value)):
        node.count_sum += value if _is_number(value) else 0
        return
    if _is_number(value) and math.isfinite(float(value)):
        contribution = float(value) * weight
        node.weighted_sum = contribution if node.weighted_sum is None else node.weighted_sum + contribution
        node.weight += weight
    elif _is_number_list(value) and (node.weighted_sum is None or len(node.weighted_sum) == len(value)):
        contribution = [float(v) * weight for v in value]
        node.weighted_sum = (
            contribution if node.weighted_sum is None else [a + b for a, b in zip(node.weighted_sum, contribution)]
        )
        node.weight += weight


def _result(node: _Node, key: str | None) -> Any:
    if node.kind == "dict":
        return {k: _result(child, k) for k, child in node.children.items()}
    if node.kind == "rows":
        return [_result(child, key) for child in node.children]
    if key in _UNION_KEYS:
        return sorted(node.union)
    if key in _SUMMED_KEYS or (key is not None and key.startswith("num_") and _is_number(node.first)):
        # a count that never changes (experts per layer, candidates) is a property, not a per-batch count
        return node.first if node.constant and key != "num_tokens" and key not in _SUMMED_KEYS else node.count_sum
    if node.constant:
        return node.first
    if node.weighted_sum is not None and node.weight > 0:
        if isinstance(node.weighted_sum, list):
            return [v / node.weight for v in node.weighted_sum]
        return node.weighted_sum / node.weight
    return node.first


def _recompute_derived(node: Any) -> None:
    if isinstance(node, Mapping):
        fraction, probs = node.get("expert_fraction"), node.get("mean_prob")
        if _is_number_list(fraction):
            if "usage_entropy" in node:
                total = sum(fraction)
                p = [f / total for f in fraction] if total > 0 else fraction
                node["usage_entropy"] = -sum(v * math.log(v) for v in p if v > 0)
            if "balance_loss" in node and _is_number_list(probs) and len(probs) == len(fraction):
                experts = node.get("num_candidates", node.get("num_experts", len(fraction)))
                node["balance_loss"] = float(experts) * sum(f * q for f, q in zip(fraction, probs))
        for value in node.values():
            _recompute_derived(value)
    elif isinstance(node, list):
        for value in node:
            _recompute_derived(value)


class RoutingAccumulator:
    """Merge successive ``routing_stats`` dicts; ``result()`` gives one dict in the same layout.

    Example::

        acc = RoutingAccumulator()
        for batch in batches:
            model(**batch)
            acc.add(peft_depth.routing_stats(model))
        merged = acc.result()
    """

    def __init__(self) -> None:
        self._root = _Node()
        self.num_forwards = 0

    def add(self, stats: Mapping[str, Any]) -> None:
        if not stats:
            return
        _add(self._root, None, dict(stats), 1.0)
        self.num_forwards += 1

    def result(self) -> dict[str, Any]:
        if self._root.kind is None:
            return {}
        merged = _result(self._root, None)
        _recompute_derived(merged)
        return merged
