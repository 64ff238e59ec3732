"""The public way to read what the last forward produced besides logits.

Depth tuners record routing decisions and auxiliary-loss ingredients during the forward (overwriting, never
appending, so gradient-checkpointing recomputation cannot double count). ``aux_losses`` and ``routing_stats`` find
every depth tuner inside whatever wraps it (``PeftModel``, DDP, accelerate) and turn those records into numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .aux_watch import note_aux_read

__all__ = [
    "AuxLossTerm",
    "DepthAuxSource",
    "aux_losses",
    "coefficient_override",
    "raw_aux_losses",
    "routing_stats",
]


@dataclass
class AuxLossTerm:
    """One auxiliary loss of the last forward: its unweighted value and the coefficient from the adapter config."""

    value: torch.Tensor
    coefficient: float


class DepthAuxSource:
    """Mixin for modules (depth tuners) that expose auxiliary losses and routing statistics of the last forward."""

    def depth_aux_terms(self) -> dict[str, AuxLossTerm]:
        """Named auxiliary losses of the last forward (empty before any forward, or when all are switched off)."""
        return {}

    def depth_routing_stats(self) -> dict[str, Any]:
        """Per-layer routing statistics of the last forward, as plain Python numbers and lists."""
        return {}


def _sources(model: nn.Module) -> list[DepthAuxSource]:
    return [module for module in model.modules() if isinstance(module, DepthAuxSource)]


def raw_aux_losses(model: nn.Module) -> dict[str, AuxLossTerm]:
    """Auxiliary losses of the last forward with their config coefficients, not yet weighted."""
    terms: dict[str, AuxLossTerm] = {}
    for source in _sources(model):
        note_aux_read(source)
        for name, term in source.depth_aux_terms().items():
            if name in terms:
                previous = terms[name]
                if previous.coefficient != term.coefficient:
                    raise ValueError(f"Two sources report auxiliary loss {name!r} with different coefficients.")
                term = AuxLossTerm(previous.value + term.value, term.coefficient)
            terms[name] = term
    return terms


def aux_losses(model: nn.Module, coefficients: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted auxiliary losses of the last forward of ``model``, as a dict of scalar tensors.

    Each value is ``coefficient * loss`` where the coefficient is the adapter config's (e.g. MoLA's
    ``balance_loss_coef``) unless ``coefficients`` overrides it by name (``"routing"`` also covers the
    ``"routing.<adapter>"`` losses of several active adapters). Losses with coefficient 0 are left out. The
    tensors carry gradient, so ``loss = lm_loss + sum(aux_losses(model).values())`` trains the routers.
    """
    coefficients = dict(coefficients or {})
    weighted = {}
    for name, term in raw_aux_losses(model).items():
        override = coefficient_override(name, coefficients)
        coefficient = term.coefficient if override is None else override
        if coefficient != 0:
            weighted[name] = coefficient * term.value
    return weighted


def coefficient_override(name: str, overrides: Mapping[str, float]) -> float | None:
    """The override of loss ``name``: its own, or its method's (``routing.<adapter>``, the name a loss takes when
    several adapters of one method are active, follows an override of ``routing``); None when there is none."""
    if name in overrides:
        return overrides[name]
    return overrides.get(name.split(".", 1)[0])


def routing_stats(model: nn.Module) -> dict[str, Any]:
    """Per-layer routing statistics of the last forward of ``model`` (expert usage, chosen layers, skip fractions).

    Keys are method-specific (documented by each method); values are Python numbers or lists, ready for logging.
    """
    stats: dict[str, Any] = {}
    for source in _sources(model):
        stats.update(source.depth_routing_stats())
    return stats
