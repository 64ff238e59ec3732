"""Default target modules per architecture, shared by the methods that carry low-rank adapters."""

from __future__ import annotations

from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

__all__ = ["ALL_PROJECTIONS_TARGET_MODULES_MAPPING"]

_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Every projection of each block (the MoLA paper's recipe); LoRA's own defaults for architectures not listed.
ALL_PROJECTIONS_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    **{
        name: _LLAMA_STYLE
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}
