"""Config checks that hold however a value got there: set after construction, of a numeric type that only looks
right, or out of a range that makes a loss infinite. Each failed before the fix (the value trained, saved, and then
failed to load, or silently did nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import tiny_llama

from peft_depth import DLOConfig, MoDConfig, MoLAConfig, MoLExConfig
from peft_depth.trainer import DepthSFTConfig

CAUSAL = dict(task_type="CAUSAL_LM")

MUTATIONS = [
    (MoLAConfig, "lora_dropout", 1.5),
    (MoLAConfig, "balance_loss_coef", -1.0),
    (MoLAConfig, "nonfinite_routing", "bogus"),
    (MoLExConfig, "alpha", 2.0),
    (MoLExConfig, "routing", "bogus"),
    (MoLExConfig, "molex_layers", [-1]),
    (MoDConfig, "router_temperature", 1e-300),
    (MoDConfig, "router_granularity", "bogus"),
    (MoDConfig, "distill_fraction", 0.0),
    (DLOConfig, "capacity", 0.0),
    (DLOConfig, "scale_gap", 5.0),
    (DLOConfig, "skip_mode", "bogus"),
]


@pytest.mark.parametrize("config_class, name, value", MUTATIONS, ids=[f"{c.__name__}.{n}" for c, n, _ in MUTATIONS])
def test_a_field_set_after_construction_is_checked_before_the_model_is_touched(config_class, name, value):
    config = config_class(**CAUSAL)
    setattr(config, name, value)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=f"`{name}"):
        get_peft_model(base, config)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_mola_num_experts_set_after_construction_replaces_the_default_pattern_and_reloads(tmp_path):
    config = MoLAConfig(**CAUSAL, target_modules=["q_proj"])
    config.num_experts = 4
    model = get_peft_model(tiny_llama(), config)
    assert _experts_per_layer(model) == {4} and config.expert_pattern is None
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert _experts_per_layer(loaded) == {4}


def _experts_per_layer(model) -> set[int]:
    return {m.mola_num_experts["default"] for m in model.modules() if hasattr(m, "mola_num_experts")}


def test_dlo_rank_set_after_construction_gives_what_the_constructor_gives():
    late = DLOConfig(**CAUSAL)
    late.r = 8
    early = DLOConfig(**CAUSAL, r=8)
    counts = []
    for config in (late, early):
        model = get_peft_model(tiny_llama(), config)
        counts.append(sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))
    assert counts[0] == counts[1] > 0
    assert late.routed_layers == early.routed_layers == "all"


@pytest.mark.parametrize("config_class", [DLOConfig, MoDConfig])
@pytest.mark.parametrize("rank", [False, 0.0, np.int64(0), -1])
def test_a_rank_that_may_be_zero_is_a_plain_integer(config_class, rank):
    with pytest.raises(ValueError, match=r"`r` must be an integer >= 0"):
        config_class(**CAUSAL, r=rank)


@pytest.mark.parametrize(
    "config_class, name",
    [
        (MoLAConfig, "balance_loss_coef"),
        (MoLExConfig, "balance_loss_coef"),
        (DLOConfig, "router_loss_coef"),
        (MoDConfig, "distill_loss_coef"),
    ],
)
def test_loss_coefficients_are_bounded(config_class, name):
    config_class(**CAUSAL, **{name: 1000.0})
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite number in \[0, 1000\]"):
        config_class(**CAUSAL, **{name: 1e308})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(routing_loss_coef=1e308), "routing_loss_coef"),
        (dict(distill_loss_coef=1e4), "distill_loss_coef"),
        (dict(gate_learning_rate=float("inf")), "gate_learning_rate"),
        (dict(gate_learning_rate=True), "gate_learning_rate"),
        (dict(gate_learning_rate="0.1"), "gate_learning_rate"),
        (dict(sync_routing_stats="no"), "sync_routing_stats"),
    ],
)
def test_trainer_settings_are_checked_naming_the_field(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=f"`{name}`"):
        DepthSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_dlo_min_capacity_above_the_target_capacity_is_refused_for_cos_global():
    with pytest.raises(ValueError, match=r"`min_capacity` \(0.95\) must be <= `capacity` \(0.5\)"):
        DLOConfig(**CAUSAL, loss_type="cos_global", capacity=0.5, min_capacity=0.95)
    DLOConfig(**CAUSAL, loss_type="cos", capacity=0.5, min_capacity=0.95)  # unused there


@pytest.mark.parametrize("task", [None, 5])
def test_molex_for_task_refuses_a_task_that_is_not_a_name(task):
    with pytest.raises(ValueError, match=r"`task` must be one of"):
        MoLExConfig.for_task(task)


def test_molex_for_task_reads_the_usual_spellings():
    assert MoLExConfig.for_task("sst_2") == MoLExConfig.for_task("SST-2") == MoLExConfig.for_task("sst2")


def test_saving_leaves_the_callers_config_reusable_on_another_base(tmp_path):
    config = MoLAConfig(**CAUSAL, num_experts=2, top_k=1, target_modules=["q_proj"])
    get_peft_model(tiny_llama(num_layers=4), config).save_pretrained(tmp_path)
    assert config.base_model_facts is None
    assert '"num_layers": 4' in (tmp_path / "adapter_config.json").read_text()
    get_peft_model(tiny_llama(num_layers=6), config)  # refused before: "saved for a different base model"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(new_layer_target_modules=["q_proj"], new_layer_training="full"), "new_layer_target_modules"),
        (dict(zero_out_modules=["o_proj"], init="copy"), "zero_out_modules"),
        (dict(trained_original_layers=[0]), "trained_original_layers"),
        (dict(target_modules=["q_proj"]), "target_modules"),
        (dict(r=8, lora_on_original_layers=False, new_layer_training="full"), "r"),
    ],
)
def test_a_dlo_field_the_rest_of_the_config_leaves_unused_is_named(kwargs, name):
    with pytest.warns(UserWarning, match=rf"DLOConfig: `{name}` has no effect"):
        DLOConfig(**CAUSAL, **kwargs)


def test_a_classification_task_on_a_causal_lm_names_the_task_type():
    """peft adds the classifier head to `modules_to_save` for SEQ_CLS; the error used to name only that field."""
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS'.*task_type='CAUSAL_LM'"):
        get_peft_model(tiny_llama(), MoLAConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
