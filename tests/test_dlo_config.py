"""Every DLO config field is checked with the field named, and against the base model before anything is built.

``adapter_config.json`` comes from strangers: ``stack_range: [null, 2]`` used to escape as a TypeError, ``["a", 2]``
as a ValueError that named no field, and ``expansion: [0] * 100000`` on a 4-layer model copied layers for 22 s and
1.3 GB before the allocation budget stopped it.
"""

from __future__ import annotations

import json

import pytest
from allocation_guard import allocation_counter
from peft import PeftModel, get_peft_model
from test_dlo_unload import assert_same_base, base_snapshot
from tiny_models import tiny_llama

from peft_depth.tuners.dlo import DLOConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expansion="stack", stack_range=[None, 2]), r"`stack_range` must be null or \[start, end\)"),
        (dict(expansion="stack", stack_range=["a", 2]), r"`stack_range` must be null or \[start, end\)"),
        (dict(expansion="stack", stack_range=[True, 2]), "`stack_range`"),
        (dict(expansion="stack", stack_range=[0.5, 2]), "`stack_range`"),
        (dict(expansion=5), r"`expansion` must be one of 'interleave', 'stack' or a list of layer indices"),
        (dict(zero_out_modules=5), "`zero_out_modules` must be null or a non-empty list of module names"),
        (dict(zero_out_modules={"o_proj": 1}), "`zero_out_modules`"),
        (dict(new_layer_training="lora", r=2, new_layer_target_modules=[""]), "`new_layer_target_modules`"),
    ],
)
def test_bad_field_values_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLOConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expansion=[0] * 100_000), r"`expansion` lists 100000 new layers for a 4-layer model"),
        (dict(expansion=[0, 1, 2, 3, 0]), r"`expansion` lists 5 new layers for a 4-layer model"),
        (dict(expansion=[1, 4]), r"`expansion` lists source layers \[4\] outside the model's 4 layers"),
        (dict(expansion="stack", stack_range=[2, 5]), r"`stack_range`.* <= 4"),
        (dict(zero_out_modules=["no_such_proj"]), "`zero_out_modules`"),
        (
            dict(new_layer_training="lora", r=2, new_layer_target_modules=["no_such_proj"]),
            "`new_layer_target_modules`",
        ),
    ],
)
def test_fields_that_do_not_fit_the_base_fail_before_anything_is_built(monkeypatch, kwargs, message):
    # a small budget: code that builds first and checks later fails on the budget instead of on the field
    monkeypatch.setenv("PEFT_DEPTH_MAX_ADAPTER_BYTES", str(2**20))
    base = tiny_llama().eval()
    before = base_snapshot(base)
    config = DLOConfig(task_type="CAUSAL_LM", **kwargs)
    # not one byte of tensor storage: a valid DLO config allocates about 50 KB on this base (new layers, routers)
    with allocation_counter(max_tensor_bytes=0), pytest.raises(ValueError, match=message):
        get_peft_model(base, config)
    assert_same_base(before, base_snapshot(base))  # no hook, no shadow, the same depth


def test_a_hostile_expansion_in_a_saved_config_fails_at_once(tmp_path):
    get_peft_model(tiny_llama(), DLOConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["expansion"] = [0] * 100_000
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_llama().eval()
    with (
        allocation_counter(max_tensor_bytes=0),
        pytest.raises(ValueError, match="`expansion` lists 100000 new layers"),
    ):
        PeftModel.from_pretrained(base, tmp_path)
    assert base.config.num_hidden_layers == 4 and not base._forward_hooks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stack_range=[0, 2]), r"`stack_range` is only used with expansion='stack'.*'interleave'"),
        (dict(expansion=[1, 2], stack_range=[0, 2]), r"`stack_range` is only used with expansion='stack'"),
        (dict(inference_capacity=0.5), r"`inference_capacity` is only used with inference_selection='capacity'"),
    ],
)
def test_a_field_the_rest_of_the_config_leaves_unused_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLOConfig(**kwargs)
    # configs saved before this check (layout version 1) still load as they did
    assert DLOConfig(peft_depth_version=1, **kwargs).peft_depth_version == 1


def test_default_routing_leaves_frozen_original_layers_unrouted_and_routes_them_once_they_train():
    """Routing frozen pretrained layers collapsed SmolLM2 on SST-2 (benchmarks/results/dlo.md), so the default routes
    only the new layers unless the original layers train; the resolved value is what a saved config holds."""
    assert DLOConfig().routed_layers == "new"
    assert DLOConfig(r=4).routed_layers == "all"  # LoRA on the original layers
    assert DLOConfig(r=4, new_layer_training="lora", lora_on_original_layers=False).routed_layers == "new"
    assert DLOConfig(trained_original_modules=["mlp"]).routed_layers == "all"
    assert DLOConfig(unrouted_edge_layers=1).routed_layers == "all"
    assert DLOConfig(routed_layers="none").routed_layers == "none"
    assert DLOConfig().to_dict()["routed_layers"] == "new"
    # a layout-2 config without the field keeps that layout's default
    assert DLOConfig(peft_depth_version=2).routed_layers == "all"
    assert DLOConfig.from_peft_type(**{**DLOConfig().to_dict(), "routed_layers": None}).routed_layers == "new"


def test_default_routing_puts_routers_on_the_new_layers_only():
    from peft import get_peft_model
    from tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(num_layers=8), DLOConfig(task_type="CAUSAL_LM"))
    routers = model.base_model.dlo_routers["default"]
    assert sorted(routers.keys()) == sorted(f"l{i}" for i in (4, 9))  # the two inserted layers of 8 -> 10
