"""Which adapter trains follows peft's rules for its own layers, for every part of a depth adapter: MoLEx's gates,
MoD's ensembles, DLO's new layers and routers live on the tuner, not in peft's layers, and used to follow the config's
load-time ``inference_mode`` instead of ``set_adapter`` / ``set_requires_grad``."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

import peft_depth

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, target_modules=["q_proj"]),
    "molex": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
    "mod": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM", num_late_layers=2),
    "dlo": lambda: peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, new_layer_training="lora", r=2),
}


def _adapter_parameters(model, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    return {
        name: param
        for name, param in model.named_parameters()
        if f".{adapter_name}." in f"{name}." and "base_layer" not in name
    }


def _trainable_names(model, adapter_name: str) -> set[str]:
    return {name for name, param in _adapter_parameters(model, adapter_name).items() if param.requires_grad}


@pytest.fixture(scope="module")
def saved_pairs(tmp_path_factory):
    """For each method: a folder with two adapters, "default" and "other", and the trainable parameter names a
    freshly built, active "other" has."""
    saved = {}
    for method, make in CONFIGS.items():
        model = get_peft_model(tiny_llama(), make())
        model.add_adapter("other", make())
        model.set_adapter("other")
        expected = _trainable_names(model, "other")
        assert expected, method
        folder = tmp_path_factory.mktemp(method)
        model.save_pretrained(folder)
        saved[method] = (folder, {re.sub(r"\.other(?=\.|$)", ".{}", name) for name in expected})
    return saved


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_loaded_adapter_trains_whole_once_activated(saved_pairs, method):
    folder, expected = saved_pairs[method]
    model = PeftModel.from_pretrained(tiny_llama(), folder, is_trainable=True)
    model.load_adapter(folder / "other", adapter_name="other")  # peft's default: is_trainable=False
    assert _trainable_names(model, "other") == set()
    model.set_adapter("other")  # peft: the adapter becomes trainable
    assert _trainable_names(model, "other") == {name.format("other") for name in expected}
    assert _trainable_names(model, "default") == set()
    with model.disable_adapter():  # a reference pass, as DPO-style trainers run one
        pass
    assert _trainable_names(model, "other") == {name.format("other") for name in expected}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_an_inference_load_trains_once_asked_and_stays_trainable_across_a_disabled_pass(saved_pairs, method):
    folder, expected = saved_pairs[method]
    model = PeftModel.from_pretrained(tiny_llama(), folder)  # inference mode
    assert _trainable_names(model, "default") == set()
    model.base_model.set_requires_grad("default", True)
    with model.disable_adapter():
        pass
    # DLO's copied weights stay frozen under new_layer_training="lora": only their LoRA trains
    assert _trainable_names(model, "default") == {name.format("default") for name in expected}
    model.base_model.set_adapter("default", inference_mode=True)
    assert _trainable_names(model, "default") == set()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_half_precision_bases_freeze_and_train_the_same_parameters(saved_pairs, method, dtype):
    # peft upcasts half-precision adapter weights to float32 by re-assigning ParameterDict entries, which made them
    # new Parameters with requires_grad=True: the low-rank factors of a frozen adapter trained, its routers did not
    folder, expected = saved_pairs[method]
    for low_cpu_mem_usage in (False, True):  # the second path moves the loaded tensors with a re-assignment too
        loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), folder, low_cpu_mem_usage=low_cpu_mem_usage)
        assert [name for name, param in loaded.named_parameters() if param.requires_grad] == []
        loaded.load_adapter(folder / "other", adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
        assert _trainable_names(loaded, "other") == set()
    trainable = PeftModel.from_pretrained(tiny_llama().to(dtype), folder, is_trainable=True)
    assert _trainable_names(trainable, "default") == {name.format("default") for name in expected}
    trainable.add_adapter("third", CONFIGS[method]())  # added inactive: frozen until set_adapter
    assert _trainable_names(trainable, "third") == set()
    assert _trainable_names(trainable, "default") == {name.format("default") for name in expected}
    trainable.set_adapter("third")
    assert _trainable_names(trainable, "third") == {name.format("third") for name in expected}
    # and what trains was upcast, as peft does for its own adapter weights
    assert {param.dtype for name, param in trainable.named_parameters() if param.requires_grad} == {torch.float32}
