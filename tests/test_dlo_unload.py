"""``unload()`` gives back the base model exactly as it was before ``get_peft_model``.

A failed ``PeftModel.from_pretrained`` is rolled back by unloading the half-built adapter, and a retry then wraps the
same base again: DLO must leave nothing behind — not its depth in the config, not a hook, not a shadow attribute on a
layer, not a renumbered ``layer_idx``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import batch, tiny_gpt2, tiny_llama

import peft_depth
from peft_depth.tuners.dlo import DLOConfig


def base_snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything of ``model`` an adapter could leave changed: weights, config, module tree, hooks, plain attributes."""
    modules = {}
    for name, module in model.named_modules():
        hooks = {
            key: list(value)
            for key, value in vars(module).items()
            if key.endswith("_hooks") and isinstance(value, dict)
        }
        plain = {
            key: value
            for key, value in vars(module).items()
            if isinstance(value, (bool, int, float, str, type(None))) and not key.startswith("_hooks")
        }
        modules[name] = (type(module), sorted(vars(module)), sorted(module._modules), hooks, plain)
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "config": model.config.to_dict(),
        "modules": modules,
        "training": model.training,
    }


def assert_same_base(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["config"] == before["config"]
    assert after["modules"].keys() == before["modules"].keys()
    for name, described in before["modules"].items():
        assert after["modules"][name] == described, name
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["training"] == before["training"]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _use(model) -> None:
    """Run the adapter the ways that leave state behind: eval and training forwards, a backward, generation."""
    inputs = batch(batch_size=2, seq_len=6, left_pad=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    model.eval()
    _logits(model, inputs)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    model.eval()
    if model.peft_config[model.active_adapter].skip_mode == "mlp":
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


SETUPS: dict[str, Callable[[torch.nn.Module], Any]] = {
    # Original layers routed too (the paper's routing), so unload has wrapped original layers to give back.
    "mlp": lambda base: get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="all")),
    "block": lambda base: get_peft_model(
        base, DLOConfig(task_type="CAUSAL_LM", expand_every=2, skip_mode="block", routed_layers="all")
    ),
    "lora_everywhere": lambda base: get_peft_model(
        base,
        DLOConfig(task_type="CAUSAL_LM", expansion=[0, 3], r=2, new_layer_training="lora", target_modules=["q_proj"]),
    ),
    "dense": lambda base: get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", routed_layers="none", init="copy")),
}


def _two_adapters(base):
    model = get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", expand_every=2))
    model.add_adapter("deep", DLOConfig(task_type="CAUSAL_LM", expansion="stack", stack_range=[1, 3]))
    model.set_adapter("deep")
    return model


SETUPS["two_adapters"] = _two_adapters


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_unload_returns_the_base_exactly_as_it_was(setup, factory):
    if factory is tiny_gpt2 and setup == "lora_everywhere":
        pytest.skip("GPT-2 has Conv1D projections: new_layer_training='lora' needs nn.Linear")
    base = factory().eval()
    inputs = batch(batch_size=2, seq_len=6, left_pad=2)
    expected = _logits(base, inputs)
    before = base_snapshot(base)
    model = SETUPS[setup](base)
    _use(model)
    unloaded = model.unload()
    assert unloaded is base
    assert_same_base(before, base_snapshot(base))
    torch.testing.assert_close(_logits(base, inputs), expected, rtol=0, atol=0)


def test_a_retry_on_the_unloaded_base_equals_a_fresh_one(tmp_path):
    """The rollback of a failed load is an unload; the retry with the good adapter must load it exactly."""
    base = tiny_llama().eval()
    adapted = get_peft_model(tiny_llama().eval(), DLOConfig(task_type="CAUSAL_LM", expand_every=2))
    _use(adapted)
    inputs = batch(batch_size=2, seq_len=6, left_pad=2)
    expected = _logits(adapted, inputs)
    adapted.save_pretrained(tmp_path)
    PeftModel.from_pretrained(base, tmp_path).unload()  # what the rollback of a failed load does
    retried = PeftModel.from_pretrained(base, tmp_path)
    assert retried.base_model.model.config.num_hidden_layers == 6
    torch.testing.assert_close(_logits(retried, inputs), expected, rtol=0, atol=0)


def _drop_a_new_layer_tensor(path) -> None:
    weights = load_file(path / "adapter_model.safetensors")
    weights.pop(next(key for key in sorted(weights) if ".dlo_new_layers." in key))
    save_file(weights, path / "adapter_model.safetensors")


def _edit_config(**changes):
    def edit(path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return edit


# (corruption, the refusal): a missing tensor is found after the new layers were built and the stack rewired (the
# rollback case); the two config errors are found before anything is built.
CORRUPTIONS = {
    "missing_tensor": (_drop_a_new_layer_tensor, "1 missing key"),
    "unknown_zero_out_module": (_edit_config(zero_out_modules=["no_such_proj"]), "`zero_out_modules`"),
    "expansion_beyond_the_depth": (_edit_config(expansion=[0, 5]), r"`expansion` lists source layers \[5\]"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_failed_load_leaves_the_base_as_it_was(tmp_path, corruption):
    get_peft_model(tiny_llama(), DLOConfig(task_type="CAUSAL_LM", expand_every=2)).save_pretrained(tmp_path)
    corrupt, refusal = CORRUPTIONS[corruption]
    corrupt(tmp_path)
    base = tiny_llama().eval()
    before = base_snapshot(base)
    with pytest.raises(ValueError, match=refusal):
        PeftModel.from_pretrained(base, tmp_path)
    assert_same_base(before, base_snapshot(base))


def test_an_injection_that_fails_part_way_takes_its_hooks_off_the_base(monkeypatch):
    """A legal config whose new layers do not fit the allocation budget fails while building them."""
    monkeypatch.setenv("PEFT_DEPTH_MAX_ADAPTER_BYTES", str(64 * 2**10))  # less than one new layer of the tiny model
    base = tiny_llama().eval()
    before = base_snapshot(base)
    with pytest.raises(ValueError, match="would allocate more than"):
        get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", expand_every=2))
    assert_same_base(before, base_snapshot(base))


def test_unload_after_checkpointed_training_gives_back_the_layers_checkpoint_functions():
    """DLO wraps a routed layer's checkpoint function so that the replay in backward finds its plan; unloading must
    hand back transformers' own function. (peft itself leaves its input-require-grads hook on the embeddings of a base
    with checkpointing on, so the whole-base snapshot does not apply here.)"""
    base = tiny_llama().eval()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = list(base.model.layers)
    functions = [layer._gradient_checkpointing_func for layer in layers]
    model = get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="all"))
    _use(model)
    assert any(
        type(layer.__dict__["_gradient_checkpointing_func"]).__name__ == "PlanCarryingCheckpoint" for layer in layers
    )
    model.unload()
    assert all(layer._gradient_checkpointing_func is function for layer, function in zip(layers, functions))
