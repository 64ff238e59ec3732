"""``distance_from_base``: how far an adapter starts from its base model (issue 14 reports it per run)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_llama

from peft_depth import MoDConfig
from peft_depth.analysis import distance_from_base


def test_an_adapter_that_computes_the_base_is_at_distance_zero():
    for config in (MoDConfig(num_late_layers=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])):
        inputs = batch()
        distance = distance_from_base(get_peft_model(tiny_llama(), config), **inputs)
        assert distance.mean_kl == 0.0 and distance.max_abs_logit_diff == 0.0 and distance.top1_agreement == 1.0
        assert distance.num_positions == int(inputs["attention_mask"].sum())


def test_an_open_gate_is_measured_against_an_independent_computation():
    model = get_peft_model(tiny_llama(), MoDConfig(num_late_layers=3, gate_init=1.0)).train()
    inputs = batch()
    distance = distance_from_base(model, **inputs)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    expected_kl = torch.nn.functional.kl_div(
        adapted[real].log_softmax(-1), base[real].log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert distance.mean_kl == pytest.approx(float(expected_kl), rel=1e-5)
    assert distance.mean_kl > 0
    assert distance.max_abs_logit_diff == pytest.approx(float((adapted - base)[real].abs().max()), rel=1e-6)


def test_padding_is_left_out():
    model = get_peft_model(tiny_llama(), MoDConfig(num_late_layers=3, gate_init=1.0))
    inputs = batch(left_pad=2)
    padded = distance_from_base(model, **inputs)
    row = inputs["attention_mask"][0].bool()
    alone = distance_from_base(model, inputs["input_ids"][:1, row], inputs["attention_mask"][:1, row])
    first_row_only = inputs["attention_mask"].clone()
    first_row_only[1:] = 0
    masked = distance_from_base(model, inputs["input_ids"], first_row_only)
    assert masked.num_positions == alone.num_positions
    assert masked.mean_kl == pytest.approx(alone.mean_kl, rel=1e-4, abs=1e-7)
    assert padded.num_positions == int(inputs["attention_mask"].sum())


def test_refuses_a_plain_model_and_an_empty_mask():
    with pytest.raises(TypeError, match="PeftModel"):
        distance_from_base(tiny_llama(), **batch())
    model = get_peft_model(tiny_llama(), MoDConfig(num_late_layers=3))
    inputs = batch()
    with pytest.raises(ValueError, match="no real position"):
        distance_from_base(model, inputs["input_ids"], torch.zeros_like(inputs["attention_mask"]))


def test_a_classifier_is_compared_per_row_and_by_its_final_hidden_states():
    from tiny_models import tiny_bert

    from peft_depth import MoLExConfig

    inputs = batch(left_pad=2)
    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    at_base = distance_from_base(lora, **inputs)
    assert at_base.hidden_relative_change == 0.0 and at_base.mean_kl == 0.0
    assert at_base.num_positions == inputs["input_ids"].shape[0]  # one prediction per row

    mixed = get_peft_model(tiny_bert(), MoLExConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    distance = distance_from_base(mixed, **inputs)
    mixed.eval()
    with torch.no_grad():
        adapted = mixed(**inputs, output_hidden_states=True).hidden_states[-1]
        with mixed.disable_adapter():
            base = mixed(**inputs, output_hidden_states=True).hidden_states[-1]
    real = inputs["attention_mask"].bool()
    expected = ((adapted - base)[real].norm(dim=-1) / base[real].norm(dim=-1)).mean()
    assert distance.hidden_relative_change == pytest.approx(float(expected), rel=1e-5)
    assert distance.hidden_relative_change > 0.01  # α = 0.5 mixes in another layer from the start


def test_measuring_leaves_the_random_state_as_it_was():
    from peft_depth import MoLExConfig

    model = get_peft_model(tiny_llama(), MoLExConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    # a forward that draws random numbers (as a sampling router or dropout left on would): measuring must not let
    # those draws shift the training run that follows
    model.base_model.model.model.layers[0].register_forward_hook(lambda *args: torch.rand(1) and None)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    distance_from_base(model, **batch())
    assert torch.equal(torch.rand(4), expected)
