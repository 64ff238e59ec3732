"""Shared cases for the Hub and fuzz tests: one small non-trivial adapter config per registered peft-depth method."""

from __future__ import annotations

from copy import deepcopy

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_depth
from peft_depth.core.config import DepthPeftConfig

#: Base-model name recorded in the adapters: a Hub-style id, so the cards carry `base_model` metadata.
BASE_ID = "tiny-org/tiny-llama"


def method_configs() -> dict[str, DepthPeftConfig]:
    """A config per method present in this tree (each adapter non-trivial once perturbed)."""
    configs: dict[str, DepthPeftConfig] = {
        "mola": peft_depth.MoLAConfig(
            task_type="CAUSAL_LM", expert_pattern=[2, 3], r=2, target_modules=["q_proj", "v_proj", "down_proj"]
        )
    }
    if hasattr(peft_depth, "MoLExConfig"):
        configs["molex"] = peft_depth.MoLExConfig(
            task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], routing="token", molex_layers=[1, 2]
        )
    if hasattr(peft_depth, "MoDConfig"):
        configs["mod"] = peft_depth.MoDConfig(task_type="CAUSAL_LM", num_late_layers=3, r=2, target_modules=["q_proj"])
    if hasattr(peft_depth, "DLOConfig"):
        configs["dlo"] = peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, r=2, target_modules=["q_proj"])
    return configs


METHODS = list(method_configs())


def tiny_base(num_layers: int = 4, hidden_size: int = 32, seed: int = 0, name: str = BASE_ID) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = name
    model.config._name_or_path = name
    return model


def fresh_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    # A copy of the config too: DLO rewrites `num_hidden_layers` of the config of the model it expands.
    copy = type(model)(deepcopy(model.config))
    copy.load_state_dict(model.state_dict())
    copy.name_or_path = model.name_or_path
    return copy.eval()


def perturb_adapter(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable (adapter) parameter away from its initial value, so outputs differ from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * scale)


def adapted(method: str, base: LlamaForCausalLM | None = None, seed: int = 0):
    """``(peft_model, pristine_copy_of_base)`` with a perturbed adapter of ``method``, in eval mode."""
    base = base if base is not None else tiny_base()
    pristine = fresh_copy(base)
    model = get_peft_model(base, method_configs()[method])
    perturb_adapter(model, seed=seed)
    return model.eval(), pristine


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 128, (2, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2] = 0
    attention_mask[0, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
