"""Computed (not measured) memory of QLoRA training: a 4-bit Llama-2-7B-shaped base plus each method's default config.

The adapters are built for real, on the meta device (no memory, no weights), so their parameter counts are the ones
the configs give; the bytes then follow from the dtypes QLoRA trains in:

- base: every linear of the decoder layers in NF4 with double quantization (4 bits per weight, an 8-bit scale per
  block of 64 and a float32 scale per 256 blocks: 0.516 bytes per weight), everything else (embeddings, output head,
  norms) in float32 as ``peft.prepare_model_for_kbit_training`` leaves it;
- trained tensors: float32 weight, float32 gradient and AdamW's two float32 moments, 16 bytes per parameter;
- frozen tensors an adapter holds (DLO's copies with ``new_layer_training='lora'``): dequantized into the dtype the
  copied layer computes in, float32 once ``prepare_model_for_kbit_training`` upcast its norms (bf16 without it), 4
  bytes per parameter.

Activations are left out: they depend on batch size, sequence length and checkpointing, not on the method's config.

    python benchmarks/qlora_memory.py        # prints the README's table
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_depth

#: Llama-2-7B's shape (vocabulary 32000, 32 layers of width 4096, MLP 11008).
LLAMA2_7B_SHAPE = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
#: NF4 with double quantization: 4 bits per weight + an 8-bit absmax per 64 weights + a float32 absmax per 256 blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
TRAINED_BYTES_PER_PARAMETER = 4 + 4 + 8  # float32 weight, gradient, AdamW's two moments
FROZEN_BYTES_PER_PARAMETER = 4  # float32, the prepared base's norms' dtype
GIB = 2**30

#: The methods with their default configs (and DLO with frozen copies + LoRA, its low-memory variant).
DEFAULT_CONFIGS = {
    "LoRA (peft, r=8 on q/v)": lambda: LoraConfig(task_type="CAUSAL_LM"),
    "MoLA (8 experts r=8, all projections)": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=8),
    "MoLEx (LoRA r=8 on q/v + gates)": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM"),
    "MoD (4 late layers)": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM"),
    "DLO (8 new layers, trained in full)": lambda: peft_depth.DLOConfig(task_type="CAUSAL_LM"),
    "DLO, new_layer_training='lora' (r=8)": lambda: peft_depth.DLOConfig(
        task_type="CAUSAL_LM", new_layer_training="lora", r=8, lora_on_original_layers=False
    ),
}


@dataclass
class MemoryRow:
    method: str
    trained_parameters: int
    frozen_adapter_parameters: int
    base_bytes: float

    @property
    def adapter_bytes(self) -> float:
        return (
            self.trained_parameters * TRAINED_BYTES_PER_PARAMETER
            + self.frozen_adapter_parameters * FROZEN_BYTES_PER_PARAMETER
        )

    @property
    def total_bytes(self) -> float:
        return self.base_bytes + self.adapter_bytes


def base_bytes(model: torch.nn.Module) -> float:
    """The 4-bit base: decoder-layer linears in NF4 (double quantization), the rest in float32."""
    quantized = sum(
        module.weight.numel() for module in model.model.layers.modules() if isinstance(module, torch.nn.Linear)
    )
    other = sum(p.numel() for p in model.parameters()) - quantized
    return quantized * NF4_BYTES_PER_WEIGHT + other * 4


def memory_rows() -> list[MemoryRow]:
    rows = []
    for method, make_config in DEFAULT_CONFIGS.items():
        with torch.device("meta"):
            base = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B_SHAPE))  # a config of its own: DLO deepens it
            base_parameters = {id(p) for p in base.parameters()}
            model_base_bytes = base_bytes(base)
            model = get_peft_model(base, make_config())
        added = [p for p in model.parameters() if id(p) not in base_parameters]
        trained = sum(p.numel() for p in added if p.requires_grad)
        frozen = sum(p.numel() for p in added if not p.requires_grad)
        rows.append(MemoryRow(method, trained, frozen, model_base_bytes))
    return rows


def markdown_table(rows: list[MemoryRow]) -> str:
    lines = [
        "| method (default config) | trained parameters | base (4-bit) | adapter training state | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        trained = f"{row.trained_parameters / 1e6:,.2f} M"
        if row.frozen_adapter_parameters:
            trained += f" (+ {row.frozen_adapter_parameters / 1e6:,.0f} M frozen)"
        lines.append(
            f"| {row.method} | {trained} | {row.base_bytes / GIB:.2f} GiB | {row.adapter_bytes / GIB:.2f} GiB | "
            f"{row.total_bytes / GIB:.2f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(memory_rows()))
