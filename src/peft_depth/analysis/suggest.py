"""Turn per-layer statistics into starting configurations for MoLA, DLO and MoD, each with the reason.

The rules are simple and printed with their numbers, so a user can see why and override them:

- **Layer importance** (used by MoLA and DLO): the mean of two shares, each normalised to sum to 1 over layers: how
  much a layer turns the representation (``1 - cosine``) and how much it raises the logit-lens accuracy
  (``max(0, acc_l - acc_{l-1})``, with the embeddings' lens accuracy before layer 0). Accuracy rather than loss: the
  raw logit lens is badly calibrated (with tied embeddings the embedding layer's lens loss is huge because each token
  predicts itself), while top-1 accuracy is bounded and comparable across layers.
- **MoLA**: the stack is split into ``groups`` contiguous groups (MoLA's ``expert_pattern``); each group gets experts
  in proportion to the *median* importance of its layers (so one outlier, typically layer 0 turning embeddings into
  the residual stream, does not claim a whole group), scaled so that the average is ``average_experts`` per layer
  (the paper's best pattern [2, 4, 6, 8] averages 5), clamped to ``[top_k, max_experts]``.
- **DLO**: expansion copies the ``num_layers // expand_every`` most important layers (DLO's default adds one layer
  per four); the skip points are as many of the most redundant layers (highest cosine), where routers can skip most
  cheaply; the training capacity is the fraction of (layer, token) pairs the blocks really change
  (``1 - mean redundant_fraction``), clamped to ``[min_capacity, 1]``.
- **MoD**: the number of late layers is how many final layers already reach ``accuracy_ratio`` of the final layer's
  logit-lens accuracy (they can usefully vote), at least 2 (MoD's minimum) and at most the depth.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..tuners.mola.config import expand_expert_pattern
from .layers import LayerAnalysis

__all__ = ["layer_importance", "suggest_configs", "suggest_dlo", "suggest_mod", "suggest_mola"]


def _normalised(values: list[float]) -> list[float]:
    clean = [v if math.isfinite(v) and v > 0 else 0.0 for v in values]
    total = sum(clean)
    return [v / total for v in clean] if total > 0 else [1.0 / len(values)] * len(values)


def layer_importance(analysis: LayerAnalysis) -> list[float]:
    """Per-layer importance in [0, 1] summing to 1: mean of the normalised change and logit-lens gain shares."""
    change = _normalised([1.0 - c for c in analysis.cosine])
    previous = [analysis.embedding.get("lens_accuracy", math.nan), *analysis.lens_accuracy[:-1]]
    gain = _normalised([after - before for before, after in zip(previous, analysis.lens_accuracy)])
    return [(c + g) / 2 for c, g in zip(change, gain)]


def _group_sizes(num_layers: int, groups: int) -> list[int]:
    # the same split as MoLA's expand_expert_pattern: earlier groups one layer larger when the depth does not divide
    base, extra = divmod(num_layers, groups)
    return [base + (1 if group < extra else 0) for group in range(groups)]


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size - 1))
        start += size
    return out


def suggest_mola(
    analysis: LayerAnalysis,
    importance: list[float] | None = None,
    *,
    groups: int = 4,
    average_experts: float = 5.0,
    max_experts: int = 8,
    top_k: int = 2,
) -> dict[str, Any]:
    """A MoLA ``expert_pattern`` with more experts where layers matter more."""
    importance = importance if importance is not None else layer_importance(analysis)
    num_layers = analysis.num_layers
    groups = max(1, min(groups, num_layers))
    sizes = _group_sizes(num_layers, groups)
    spans = _ranges(sizes)
    group_scores = [statistics.median(importance[a : b + 1]) for a, b in spans]
    mean_score = sum(group_scores) / len(group_scores)
    if mean_score > 0:
        pattern = [int(round(average_experts * score / mean_score)) for score in group_scores]
    else:
        pattern = [int(round(average_experts))] * groups
    pattern = [min(max(experts, top_k), max_experts) for experts in pattern]
    per_layer = expand_expert_pattern(pattern, num_layers)
    described = ", ".join(
        f"layers {a}-{b}: median importance {score:.3f} -> {experts} experts"
        for (a, b), score, experts in zip(spans, group_scores, pattern)
    )
    top = max(range(groups), key=lambda g: group_scores[g])
    reason = (
        f"Importance per layer = mean of the normalised shares of representation change (1 - cosine) and logit-lens "
        f"accuracy gain. Split into {groups} groups ({described}). Layers {spans[top][0]}-{spans[top][1]} matter most, "
        f"so they get the most experts (average {sum(per_layer) / num_layers:.2f} per layer, clamped to "
        f"[{top_k}, {max_experts}])."
    )
    return {
        "config": {"expert_pattern": pattern, "top_k": top_k},
        "num_experts_per_layer": per_layer,
        "group_importance": group_scores,
        "reason": reason,
    }


def suggest_dlo(
    analysis: LayerAnalysis,
    importance: list[float] | None = None,
    *,
    expand_every: int = 4,
    min_capacity: float = 0.5,
) -> dict[str, Any]:
    """DLO expansion points (most important layers), skip points (most redundant) and a training capacity."""
    importance = importance if importance is not None else layer_importance(analysis)
    num_layers = analysis.num_layers
    count = max(1, num_layers // expand_every)
    expansion = sorted(sorted(range(num_layers), key=lambda i: -importance[i])[:count])
    skip_points = sorted(range(num_layers), key=lambda i: -analysis.cosine[i])[:count]
    redundant = sum(analysis.redundant_fraction) / num_layers
    capacity = round(min(max(1.0 - redundant, min_capacity), 1.0), 2)
    reason = (
        f"Expand (copy right after themselves) the {count} most important layers {expansion} (importance "
        f"{', '.join(f'{importance[i]:.3f}' for i in expansion)}): they change the representation and the prediction "
        f"most. Skip points: layers {skip_points} are the most redundant (cosine(in, out) "
        f"{', '.join(f'{analysis.cosine[i]:.3f}' for i in skip_points)}), where routers can skip most cheaply. "
        f"{100 * redundant:.1f}% of (layer, token) pairs have cosine >= {analysis.redundancy_threshold}, so a "
        f"capacity of {capacity} keeps the pairs the blocks really change"
        + (f" (clamped to at least {min_capacity})." if 1.0 - redundant < min_capacity else ".")
        + " The skip points are original layers: DLO routes them only when they train (r > 0 or "
        "trained_original_modules; routing frozen pretrained layers collapsed SmolLM2 to chance, "
        "benchmarks/results/dlo.md), so the suggested config leaves `routed_layers` to that default."
    )
    return {
        "config": {"expansion": expansion, "capacity": capacity},
        "skip_points": skip_points,
        "reason": reason,
    }


def suggest_mod(analysis: LayerAnalysis, *, accuracy_ratio: float = 0.9) -> dict[str, Any]:
    """MoD's ``num_late_layers``: how many final layers already predict nearly as well as the last one."""
    accuracy = analysis.lens_accuracy
    num_layers = analysis.num_layers
    final = accuracy[-1]
    if num_layers < 2:
        return {"config": None, "reason": f"MoD ensembles at least 2 layers; this model has {num_layers}."}
    if not (math.isfinite(final) and final > 0):
        return {
            "config": None,
            "reason": f"The final layer's logit-lens accuracy is {final:.3f}: with nothing it predicts right, no "
            "layer can be said to predict nearly as well, so there is no basis for `num_late_layers` (analyse more "
            "or longer texts, or a trained model).",
        }
    threshold = accuracy_ratio * final
    good = 0
    for value in reversed(accuracy):
        if not (math.isfinite(value) and value >= threshold):
            break
        good += 1
    late = min(max(good, 2), num_layers)
    first = num_layers - late
    reason = (
        f"The last {good} layer(s) reach >= {accuracy_ratio:.0%} of the final layer's logit-lens accuracy "
        f"({final:.3f}); layer {first} has {accuracy[first]:.3f}"
        + (f", layer {first - 1} only {accuracy[first - 1]:.3f}" if first > 0 else "")
        + f". So the last {late} layers can usefully vote in the ensemble"
        + (" (MoD needs at least 2)." if good < 2 else ".")
    )
    return {"config": {"num_late_layers": late}, "reason": reason}


def suggest_configs(analysis: LayerAnalysis) -> dict[str, dict[str, Any]]:
    """All three suggestions, keyed by method (``mola``, ``dlo``, ``mod``); each has ``config`` and ``reason``."""
    importance = layer_importance(analysis)
    return {
        "mola": suggest_mola(analysis, importance),
        "dlo": suggest_dlo(analysis, importance),
        "mod": suggest_mod(analysis),
    }
