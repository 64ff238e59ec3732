"""Every MoD config field is checked with the field named and the allowed values, and the fields that depend on the
base model are checked against it before anything (a module, a hook) is built on it."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

from peft_depth import MoDConfig


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("router_temperature", 1e-300, "[0.001, 1000]"),  # routing scores overflowed: NaN logits
        ("router_temperature", 1e300, "[0.001, 1000]"),
        ("router_temperature", 1e-4, "[0.001, 1000]"),
        ("router_temperature", True, "[0.001, 1000]"),
        ("router_temperature", math.nan, "[0.001, 1000]"),
        ("distill_temperature", 1e300, "[0.001, 1000]"),  # OverflowError at the first training forward
        ("distill_temperature", 1e-300, "[0.001, 1000]"),
        ("distill_temperature", "2", "[0.001, 1000]"),
        ("gate_init", 1e308, "[-10, 10]"),  # RuntimeError while building the gate
        ("gate_init", math.inf, "[-10, 10]"),
        ("gate_init", math.nan, "[-10, 10]"),
        ("gate_init", -11.0, "[-10, 10]"),
        ("gate_init", False, "[-10, 10]"),
        ("distill_loss_coef", 1e308, "[0, 1000]"),  # an infinite total loss
        ("distill_loss_coef", 1e4, "[0, 1000]"),
        ("distill_loss_coef", True, "[0, 1000]"),
        ("distill_loss_coef", -0.1, "[0, 1000]"),
        ("num_late_layers", True, "integer >= 2"),
        ("num_late_layers", 3.0, "integer >= 2"),
        ("num_late_layers", "3", "integer >= 2"),
        ("num_late_layers", 1, "integer >= 2"),
        ("r", False, "integer >= 0"),  # passed as r=0 (MoD alone)
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as error:
        MoDConfig(task_type="CAUSAL_LM", **{field: value})
    message = str(error.value)
    assert f"`{field}`" in message and allowed in message and repr(value) in message


@pytest.mark.parametrize(
    "field, value", [("router_temperature", 1e-3), ("router_temperature", 1e3), ("gate_init", -10)]
)
def test_the_ends_of_the_allowed_ranges_are_allowed(field, value):
    MoDConfig(task_type="CAUSAL_LM", **{field: value})


def test_num_late_layers_is_checked_against_the_base_by_the_config():
    config = MoDConfig(task_type="CAUSAL_LM", num_late_layers=5)
    with pytest.raises(ValueError, match=r"`num_late_layers` \(5\) is larger than the model's depth \(4.*2 to 4"):
        config.check_against_base(tiny_llama())
    MoDConfig(task_type="CAUSAL_LM", num_late_layers=4).check_against_base(tiny_llama())


def _softcapped():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    return model


def _hooks(model: torch.nn.Module) -> dict:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        (name, kind): len(getattr(m, kind)) for name, m in model.named_modules() for kind in kinds if getattr(m, kind)
    }


@pytest.mark.parametrize(
    "make_base, kwargs, match",
    [
        (tiny_llama, dict(target_modules=["q_proj", "lm_head"]), "output head `lm_head`"),
        (tiny_llama, dict(target_modules=["no_such_module"]), "no_such_module"),
        (tiny_llama, dict(num_late_layers=5), "num_late_layers"),
        (_softcapped, dict(mix_space="log_probs"), "soft-capping"),
    ],
    ids=["head_as_lora_target", "unknown_target", "too_deep", "log_probs_with_softcap"],
)
def test_a_refused_adapter_leaves_the_base_model_untouched(make_base, kwargs, match):
    base = make_base()
    modules = [(name, id(module)) for name, module in base.named_modules()]
    state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    config = base.config.to_dict()
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, MoDConfig(task_type="CAUSAL_LM", **kwargs))
    assert [(name, id(module)) for name, module in base.named_modules()] == modules
    assert _hooks(base) == {}
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[name], tensor) for name, tensor in state.items())
    assert base.config.to_dict() == config
