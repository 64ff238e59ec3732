"""Default target modules per architecture, shared by the methods that carry low-rank adapters."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["ALL_PROJECTIONS_TARGET_MODULES_MAPPING", "check_targets_are_layers"]

_ADAPTABLE_LAYERS = (nn.Linear, Conv1D)

_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Every projection of each block (the MoLA paper's recipe); LoRA's own defaults for architectures not listed.
ALL_PROJECTIONS_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    **{
        name: _LLAMA_STYLE
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")
    },
    # mixture-of-experts decoders: their experts are fused weights, not linears (check_targets_are_layers), so every
    # projection a low-rank adapter can take is the attention's (peft's own default for Mixtral is q/v only)
    **{name: ["q_proj", "k_proj", "v_proj", "o_proj"] for name in ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}


def check_targets_are_layers(model: nn.Module, config: Any) -> None:
    """Refuse ``target_modules`` entries that name a weight tensor instead of a layer.

    Mixture-of-experts decoders of transformers 5 (Mixtral, Qwen3-MoE, OLMoE, ...) keep their experts' projections as
    fused parameters of one experts module (``mlp.experts.gate_up_proj``). peft matches ``target_modules`` against
    module names only, so such an entry matches nothing: alone it gives peft's bare "not found", and next to a linear
    name (``["q_proj", "down_proj"]``) it is dropped without a word, and the experts the user asked for stay untouched.
    """
    targets = getattr(config, "target_modules", None)
    if targets is None:
        return
    # the adapters of an earlier injection own their parameters (a regex target may match their names)
    adapter_owned = {
        id(m) for module in model.modules() if isinstance(module, BaseTunerLayer) for m in module.modules()
    }
    named: dict[str, tuple[str, list[str]]] = {}  # leaf name -> (module kind, full keys)
    for module_name, module in model.named_modules():
        if isinstance(module, _ADAPTABLE_LAYERS) or id(module) in adapter_owned:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if param.dim() >= 2 and bool(check_target_module_exists(config, key)):
                named.setdefault(param_name, (type(module).__name__, []))[1].append(key)
    if named:
        shown = "; ".join(
            f"`{leaf}` is a weight of {kind} (`{keys[0]}`, {len(keys)} in all)" for leaf, (kind, keys) in named.items()
        )
        raise ValueError(
            f"`target_modules` names weight tensors, not layers: {shown}. Such fused weights (mixture-of-experts models "
            f"keep every expert's projection in one tensor) are not layers that {type(config).__name__} can adapt: it "
            "adapts linear layers. Remove those names from `target_modules` (the attention projections are "
            "linear layers), or adapt fused expert weights with plain peft LoRA's `target_parameters`."
        )
