"""What the model card says about each method: its paper and the settings derived from its config.

The derivations call the configs' own resolvers (allocation, layer lists, expansion plans) so the card shows what
the adapter actually does on its base model, not only the raw fields. A resolver that fails (a config that cannot
apply to the recorded depth) leaves the raw fields to speak for themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MethodCardInfo", "METHOD_CARD_INFO", "method_card_info"]


@dataclass(frozen=True)
class MethodCardInfo:
    name: str
    paper_title: str
    paper_url: str
    derive: Callable[[Any, int | None], dict[str, Any]] = field(default=lambda config, num_layers: {})


def _mola(config: Any, num_layers: int | None) -> dict[str, Any]:
    experts, top_k = config.allocation(num_layers if config.is_per_layer else None)
    return {"experts_per_layer": experts, "top_k_per_layer": top_k}


def _molex(config: Any, num_layers: int | None) -> dict[str, Any]:
    if num_layers is None:
        return {}
    out: dict[str, Any] = {}
    for causal, label in ((True, "decoder"), (False, "encoder")):
        molex, experts = config.resolve_layers(num_layers, causal=causal)
        out[f"{label}_molex_layers"] = molex
        out[f"{label}_expert_layers"] = experts
        out[f"{label}_alpha"] = config.resolve_alpha(causal=causal)
    return out


def _mod(config: Any, num_layers: int | None) -> dict[str, Any]:
    if num_layers is None:
        return {}
    k = config.num_late_layers
    return {"late_layers": list(range(num_layers - k, num_layers)), "lora": bool(config.r and config.target_modules)}


def _dlo(config: Any, num_layers: int | None) -> dict[str, Any]:
    from ..tuners.dlo.config import expansion_plan

    if num_layers is None:
        return {}
    plan = expansion_plan(config.expansion, num_layers, config.expand_every, config.stack_range)
    return {
        "original_depth": num_layers,
        "expanded_depth": num_layers + len(plan),
        "copies": [{"after": after, "source": source} for after, source in plan],
    }


METHOD_CARD_INFO: dict[str, MethodCardInfo] = {
    "MOLA": MethodCardInfo(
        "MoLA",
        "Higher Layers Need More LoRA Experts",
        "https://arxiv.org/abs/2402.08562",
        _mola,
    ),
    "MOLEX": MethodCardInfo(
        "MoLEx",
        "MoLEx: Mixture of Layer Experts for Finetuning with Sparse Upcycling",
        "https://arxiv.org/abs/2503.11144",
        _molex,
    ),
    "MOD": MethodCardInfo(
        "MoD",
        "Tuning Language Models by Mixture-of-Depths Ensemble",
        "https://arxiv.org/abs/2410.13077",
        _mod,
    ),
    "DLO": MethodCardInfo(
        "DLO",
        "DLO: Dynamic Layer Operation for Efficient Vertical Scaling of LLMs",
        "https://arxiv.org/abs/2407.11030",
        _dlo,
    ),
}


def method_card_info(peft_type: str) -> MethodCardInfo:
    """Card information of a method; a registered method without an entry gets its name and no paper."""
    return METHOD_CARD_INFO.get(peft_type, MethodCardInfo(peft_type, "", ""))
