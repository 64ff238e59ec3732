"""peft's helpers on depth adapters behave as on LoRA: ``disable_input_dtype_casting`` switches off the input cast
of every adapter layer (it raised AttributeError: the depth layers lacked peft's ``cast_input_dtype_enabled``), and
LoRA's ``add_weighted_adapter``, which no depth method can honour, is refused by name."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import batch, tiny_llama
from trainer_fixtures import method_configs

CONFIGS = {**method_configs(), "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)}


def _flags(model) -> list[bool]:
    return [module.cast_input_dtype_enabled for module in model.modules() if isinstance(module, BaseTunerLayer)]


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_disable_input_dtype_casting_switches_the_cast_off_and_back(method):
    model = get_peft_model(tiny_llama(), CONFIGS[method]()).eval()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        with disable_input_dtype_casting(model):
            assert _flags(model) and not any(_flags(model))
            assert torch.equal(model(**inputs).logits, expected)  # float32 throughout: nothing to cast
    assert all(_flags(model))
    # on a bf16 base with float32 adapter weights the input is no longer cast: the product fails as LoRA's does,
    # for the methods with low-rank layers in the model (these MoD and DLO configs have none)
    half = get_peft_model(tiny_llama().to(torch.bfloat16), CONFIGS[method]()).eval()
    casts = method in ("lora", "mola", "molex")  # their low-rank layers multiply the block's input
    with torch.no_grad(), disable_input_dtype_casting(half):
        if casts:
            with pytest.raises(RuntimeError, match="same dtype"):
                half(**inputs)
        else:
            half(**inputs)


@pytest.mark.parametrize("method", sorted(method_configs()))
def test_add_weighted_adapter_is_refused_by_name_and_adds_nothing(method):
    # it fell through peft's attribute lookup to the base model: "'LlamaForCausalLM' object has no attribute ..."
    model = get_peft_model(tiny_llama(), method_configs()[method]())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=r"add_weighted_adapter is a LoRA operation.*set_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "merged")
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
