"""Where depth matters in a model, and what a trained depth adapter does: the engine of ``peft-depth analyze`` and
``peft-depth inspect``.

- ``analyze_layers`` / ``LayerStatsCollector``: per-layer redundancy (cosine of a block's input and output), update
  size and logit-lens loss/accuracy over a text sample, padding excluded;
- ``distance_from_base``: how far an adapted model's next-token distributions are from its base model's;
- ``paired_bootstrap``: the accuracy difference of two models on the same rows with a bootstrap interval;
- ``suggest_configs``: starting MoLA / DLO / MoD configurations derived from those numbers, each with its reason;
- ``RoutingAccumulator``: ``peft_depth.routing_stats`` merged over many forwards, weighted by token counts;
- ``run_analyze`` / ``run_inspect``: the two commands, writing JSON, a text summary and PNG plots.
"""

from __future__ import annotations

from .analyze import AnalyzeOptions, run_analyze
from .distance import BaseDistance, distance_from_base
from .errors import AnalysisError
from .inspect_adapter import InspectOptions, run_inspect
from .layers import LayerAnalysis, LayerStatsCollector, analyze_layers, lens_positions
from .paired import PairedDifference, paired_bootstrap
from .routing import RoutingAccumulator
from .suggest import layer_importance, suggest_configs

__all__ = [
    "AnalysisError",
    "BaseDistance",
    "AnalyzeOptions",
    "InspectOptions",
    "LayerAnalysis",
    "LayerStatsCollector",
    "PairedDifference",
    "RoutingAccumulator",
    "analyze_layers",
    "distance_from_base",
    "layer_importance",
    "lens_positions",
    "paired_bootstrap",
    "run_analyze",
    "run_inspect",
    "suggest_configs",
]
