"""Mixture-of-experts decoders (transformers 5 keeps the experts as fused parameters and can add a router
load-balancing loss): the model's own aux loss survives every path of the trainer, and DLO's MLP skipping keeps the
router logits the model records whole."""

import json

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from tiny_models import batch, tiny_decoder
from trainer_fixtures import make_trainer

import peft_depth


def mixtral():
    return tiny_decoder(T.MixtralForCausalLM, T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)


def qwen3_moe():
    return tiny_decoder(
        T.Qwen3MoeForCausalLM,
        T.Qwen3MoeConfig,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        head_dim=8,
    )


def test_the_full_logits_path_keeps_the_models_router_aux_loss(tmp_path):
    """MoD's log-probability mixing trains through the trainer's full-logits path, which left out the model's
    load-balancing loss that TRL's own path adds: the same first step must log the same loss either way."""
    logged = {}
    for mix_space in ("logits", "log_probs"):
        config = peft_depth.MoDConfig(task_type="CAUSAL_LM", mix_space=mix_space)
        trainer = make_trainer(
            config,
            str(tmp_path / mix_space),
            model=mixtral(),
            max_steps=1,
            learning_rate=0.0,
            router_aux_loss_coef=100.0,  # the aux term (about 2 x 100) dominates the logged loss
        )
        trainer.train()
        logged[mix_space] = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["log_probs"]["aux_loss"] == pytest.approx(logged["logits"]["aux_loss"], rel=1e-5)
    assert logged["logits"]["loss"] > 100
    assert logged["log_probs"]["loss"] == pytest.approx(logged["logits"]["loss"], rel=1e-4)


@pytest.mark.parametrize("build", [mixtral, qwen3_moe])
def test_dlo_mlp_skipping_records_router_logits_for_every_token_in_eval(build):
    """In eval the MoE block ran on the chosen tokens only, so transformers recorded router logits for part of the
    tokens and its load-balancing loss failed on the ragged shapes once the routers skipped tokens."""
    model = get_peft_model(build(), peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="all"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained routers skip tokens; zero-initialised ones run every token
        for name, param in model.named_parameters():
            if "dlo_routers" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    model.eval()
    inputs = batch()
    with torch.no_grad():
        plain = model(**inputs).logits
        assert peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] < 1
        out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    tokens = inputs["input_ids"].numel()
    assert [logits.shape[0] for logits in out.router_logits] == [tokens] * len(out.router_logits)
    assert torch.isfinite(out.aux_loss)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("make_config", "named"),
    [
        (lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"]), "down_proj"),
        (
            lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", target_modules=["gate_up_proj", "down_proj"]),
            "gate_up",
        ),
    ],
)
def test_a_target_naming_fused_expert_weights_is_refused_by_name(make_config, named):
    """The experts' projections are parameters of one module, which peft's name matching never reaches: next to a
    linear name the entry was dropped silently (the experts the user asked for stayed frozen), alone it gave peft's
    bare "not found"."""
    with pytest.raises(ValueError, match=rf"weight tensors, not layers: `{named}.*Qwen3MoeExperts.*target_parameters"):
        get_peft_model(qwen3_moe(), make_config())


def qwen2_moe():
    return tiny_decoder(
        T.Qwen2MoeForCausalLM,
        T.Qwen2MoeConfig,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    )


@pytest.mark.parametrize(
    ("build", "target_modules", "adapted"),
    [
        # Qwen2-MoE's shared expert is a linear layer: the name adapts it and leaves the routed experts out
        (qwen2_moe, ["q_proj", "down_proj"], {"q_proj", "down_proj"}),
        # a regex names layers too; which of its parts matched only fused weights cannot be told apart
        (qwen3_moe, r".*\.(v_proj|gate_up_proj)", {"v_proj"}),
    ],
)
def test_a_target_that_also_names_layers_adapts_them_and_warns_about_the_fused_weights(build, target_modules, adapted):
    config = peft_depth.MoLAConfig(task_type="CAUSAL_LM", target_modules=target_modules)
    with pytest.warns(UserWarning, match="also matches weight tensors, which are left out"):
        model = get_peft_model(build(), config)
    assert {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "mola_A")} == adapted


def test_an_adapter_saved_with_a_fused_weight_name_still_loads(tmp_path):
    """Adapters saved before the refusal trained what their names matched (the linear ones): they load, warning."""
    model = get_peft_model(qwen3_moe(), peft_depth.MoLAConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["target_modules"] = ["q_proj", "down_proj"]  # what such an adapter's config says
    config_path.write_text(json.dumps(saved))
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
    with pytest.warns(UserWarning, match="also matches weight tensors"):
        loaded = PeftModel.from_pretrained(qwen3_moe(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_linear_targets_of_a_moe_model_and_a_second_adapter_are_accepted():
    """The refusal looks only at weights outside linear layers and outside adapters already injected."""
    config = peft_depth.MoLAConfig(task_type="CAUSAL_LM", target_modules=r".*\.(q_proj|v_proj)")
    model = get_peft_model(qwen3_moe(), config)
    model.add_adapter("second", peft_depth.MoLAConfig(task_type="CAUSAL_LM", target_modules=r".*q_proj.*"))
    assert {name for name, _ in model.named_parameters() if "mola_A.second" in name}


def test_the_default_targets_of_a_moe_decoder_are_its_attention_projections():
    """MoLA's default is every projection of a block; a MoE decoder's experts are fused weights, so its attention
    projections are what there is (Mixtral had peft's q/v, Qwen3-MoE had no default at all)."""
    for build in (mixtral, qwen3_moe):
        model = get_peft_model(build(), peft_depth.MoLAConfig(task_type="CAUSAL_LM"))
        adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "mola_A")}
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}, adapted
