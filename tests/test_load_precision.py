"""A saved adapter loads back exactly on a half-precision base, with or without ``low_cpu_mem_usage``.

peft's ``low_cpu_mem_usage`` load assigns the saved tensors and then moves each layer adapter to its base layer's device
and dtype, rounding float32 weights through bf16/fp16 before ``autocast_adapter_dtype`` upcasts them again (peft's own
LoRA still does). Our layers keep the loaded dtype there (core.adapter_placement).
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

import peft_depth

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, target_modules=["q_proj"]),
    "molex": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"]),
    "mod": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM", num_late_layers=2),
    "dlo": lambda: peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, new_layer_training="lora", r=2),
}


def _saved_adapter(method: str, dtype: torch.dtype, folder, autocast: bool = True) -> dict[str, torch.Tensor]:
    """Save a trained-looking adapter (every trainable weight moved off the half-precision grid)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(dtype), CONFIGS[method](), autocast_adapter_dtype=autocast)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param, dtype=torch.float32).to(param.dtype) * 1e-2 + 1e-4)
    model.save_pretrained(folder)
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def _loaded(folder, dtype: torch.dtype, **kwargs) -> dict[str, torch.Tensor]:
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), folder, **kwargs)
    return dict(loaded.named_parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_saved_adapter_loads_bit_exact_with_low_cpu_mem_usage(tmp_path, method, dtype):
    saved = _saved_adapter(method, dtype, tmp_path)
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # peft's autocast of adapter weights
    for low_cpu_mem_usage in (False, True):
        params = _loaded(tmp_path, dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        for name, tensor in saved.items():
            assert params[name].dtype == torch.float32, (low_cpu_mem_usage, name)
            assert torch.equal(params[name], tensor), (low_cpu_mem_usage, name)
    # a second adapter, loaded beside a real one (its placeholders are meta while the first adapter's are not)
    model = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    model.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=True)
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        second = re.sub(r"\.default(?=\.|$)", ".second", name)
        assert params[second].dtype == torch.float32, second
        assert torch.equal(params[second], tensor), second


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_without_autocast_both_load_paths_give_the_same_adapter(tmp_path, method):
    # trained and saved in float32 (the default), then loaded for half-precision inference without the upcast:
    # the plain load copies into base-dtype adapters, and the low_cpu_mem_usage load must end in the same place
    _saved_adapter(method, torch.bfloat16, tmp_path)
    plain = _loaded(tmp_path, torch.bfloat16, autocast_adapter_dtype=False)
    light = _loaded(tmp_path, torch.bfloat16, autocast_adapter_dtype=False, low_cpu_mem_usage=True)
    assert plain.keys() == light.keys()
    layer_adapter_dtypes = set()
    for name, tensor in plain.items():
        assert light[name].dtype == tensor.dtype, name
        assert torch.equal(light[name], tensor), name
        if ".lora_" in name or ".mola_" in name:
            layer_adapter_dtypes.add(tensor.dtype)
    assert layer_adapter_dtypes in (set(), {torch.bfloat16})
