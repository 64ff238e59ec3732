"""Default target modules per architecture, shared by the methods that carry low-rank adapters."""

from __future__ import annotations

import warnings
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
    """Refuse ``target_modules`` entries that name only weight tensors, not layers; warn about fused weights that an
    entry also naming layers leaves out.

    Mixture-of-experts decoders of transformers 5 (Mixtral, Qwen3-MoE, OLMoE, ...) keep their experts' projections as
    fused parameters of one experts module (``mlp.experts.gate_up_proj``). peft matches ``target_modules`` against
    module names only, so such an entry matches nothing: alone it gives peft's bare "not found", and next to a linear
    name (``["q_proj", "down_proj"]``) it is dropped without a word, and the experts the user asked for stay untouched.
    An entry that also names linear layers (Qwen2-MoE's ``shared_expert.down_proj``) adapts those, with a warning
    that the fused weights are left out; so does a saved adapter's config (it trained what it matched).
    """
    targets = getattr(config, "target_modules", None)
    if targets is None:
        return
    # the adapters of an earlier injection own their parameters (a regex target may match their names)
    adapter_owned = {
        id(m) for module in model.modules() if isinstance(module, BaseTunerLayer) for m in module.modules()
    }
    fused: dict[str, tuple[str, list[str]]] = {}  # leaf name -> (module kind, full keys)
    layers: list[str] = []
    for module_name, module in model.named_modules():
        if id(module) in adapter_owned:
            continue
        if isinstance(module, _ADAPTABLE_LAYERS):
            layers.append(module_name)
            continue
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if param.dim() >= 2 and bool(check_target_module_exists(config, key)):
                fused.setdefault(param_name, (type(module).__name__, []))[1].append(key)
    if not fused:
        return
    if isinstance(targets, str):  # a regex: which part of it matched a fused weight cannot be told apart
        regex_names_a_layer = any(check_target_module_exists(config, name) for name in layers)

    def names_a_layer(leaf: str) -> bool:
        """Whether a ``target_modules`` entry naming the fused weight ``leaf`` also names a layer."""
        if isinstance(targets, str):
            return regex_names_a_layer
        return any(
            (entry == leaf or entry.endswith("." + leaf))
            and any(name == entry or name.endswith("." + entry) for name in layers)
            for entry in targets
        )

    only_fused = {leaf: found for leaf, found in fused.items() if not names_a_layer(leaf)}
    shown = "; ".join(
        f"`{leaf}` is a weight of {kind} (`{keys[0]}`, {len(keys)} in all)" for leaf, (kind, keys) in fused.items()
    )
    why = (
        f"Such fused weights (mixture-of-experts models keep every expert's projection in one tensor) are not layers "
        f"that {type(config).__name__} can adapt: it adapts linear layers"
    )
    if only_fused and getattr(config, "base_model_facts", None) is None:  # a new adapter, not a saved one
        raise ValueError(
            f"`target_modules` names weight tensors, not layers: {shown}. {why}. Remove those names from "
            "`target_modules` (the attention projections are linear layers), or adapt fused expert weights with "
            "plain peft LoRA's `target_parameters`."
        )
    warnings.warn(
        f"`target_modules` also matches weight tensors, which are left out: {shown}. {why}; the linear layers it "
        "names are adapted. To adapt fused expert weights use plain peft LoRA's `target_parameters`.",
        UserWarning,
        stacklevel=3,
    )
