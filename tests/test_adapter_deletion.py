"""``delete_adapter`` keeps the surviving adapter running, for adapters that keep every weight on the tuner.

peft picks the adapters that stay active from the first adapter layer it finds in the model. MoD and DLO with
``r=0`` have none (their weights live on the tuner, and their state marker carries the prefix peft skips), so peft
switched every adapter off, ``modules_to_save`` copies included: the model ran as the base with the adapter still
named active, or kept the deleted adapter's name and failed on the next forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_llama

from peft_depth import DLOConfig, MoDConfig

CONFIGS = {
    "mod_alone": lambda: MoDConfig(num_late_layers=2),
    "mod_alone_modules_to_save": lambda: MoDConfig(num_late_layers=2, modules_to_save=["model.layers.0.mlp"]),
    "dlo_trained_mlp": lambda: DLOConfig(expand_every=2, trained_original_modules=["mlp"]),
    "dlo_lora_trained_mlp": lambda: DLOConfig(
        expand_every=2, r=2, target_modules=["q_proj", "v_proj"], trained_original_modules=["mlp"]
    ),
    "lora_control": lambda: LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["model.layers.0.mlp"]),
}


def _perturbed(model, adapter_name: str, seed: int) -> None:
    """Give ``adapter_name``'s weights values that change the output (fresh adapters equal the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in f".{name}." and param.is_floating_point():
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def _two_adapters(make):
    base = tiny_llama()
    base_logits = base(**batch()).logits
    config, other = make(), make()
    config.task_type = other.task_type = "CAUSAL_LM"
    model = get_peft_model(base, config)
    model.add_adapter("b", other)
    _perturbed(model, "default", seed=1)
    _perturbed(model, "b", seed=2)
    model.eval()
    with torch.no_grad():
        own = model(**batch()).logits
    return model, own, base_logits


def _logits(model):
    with torch.no_grad():
        return model(**batch()).logits


@pytest.mark.parametrize("method", list(CONFIGS))
def test_deleting_an_inactive_adapter_keeps_the_active_one_running_and_its_trainability(method):
    model, own, base_logits = _two_adapters(CONFIGS[method])
    assert (own - base_logits).abs().max() > 1e-3  # the active adapter changes the output
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing active was deleted: no "setting active adapter"
        model.delete_adapter("b")
    assert model.active_adapter == "default"
    assert model.base_model.active_adapters == ["default"]
    torch.testing.assert_close(_logits(model), own, rtol=0, atol=0)
    assert {name for name, param in model.named_parameters() if param.requires_grad} == trainable - {
        name for name in trainable if ".b." in f".{name}."
    }


@pytest.mark.parametrize("method", list(CONFIGS))
def test_deleting_the_active_adapter_activates_the_remaining_one_with_a_warning(method):
    model, own, _ = _two_adapters(CONFIGS[method])
    model.set_adapter("b")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        model.delete_adapter("b")
    assert model.active_adapter == "default"
    assert model.base_model.active_adapters == ["default"]
    torch.testing.assert_close(_logits(model), own, rtol=0, atol=0)
    for module in model.modules():  # the trained copies of the survivor run again
        if hasattr(module, "modules_to_save"):
            assert module.active_adapters == ["default"]


@pytest.mark.parametrize("method", ["mod_alone", "dlo_trained_mlp", "lora_control"])
def test_deleting_the_active_one_of_three_follows_peft_choice_and_its_warning(method):
    """peft activates the first remaining name in sorted order and says so; the survivor must be that one, not the
    first adapter added."""
    model, _, _ = _two_adapters(CONFIGS[method])
    config = CONFIGS[method]()
    config.task_type = "CAUSAL_LM"
    model.add_adapter("c", config)
    model.set_adapter("c")
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        model.delete_adapter("c")
    assert model.active_adapter == "b" and model.base_model.active_adapters == ["b"]
