"""MoLA behaves as a PEFT method and computes exactly the official forward and balance loss."""

import math

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, clone_model, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from training_checks import assert_same_loss_and_gradients, backward_once, train_steps

import peft_depth
from peft_depth import MoLAConfig
from peft_depth.core.aux import raw_aux_losses
from peft_depth.core.config import CONFIG_FORMAT_VERSION
from peft_depth.core.routing import route_top_k
from peft_depth.tuners.mola import MoLALinear
from peft_depth.tuners.mola.config import expand_expert_pattern

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mola(model, **kwargs):
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return get_peft_model(model, MoLAConfig(**kwargs))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=[2, 0, 2, 2]), r"num_experts\[1\]"),
        (dict(top_k=-1), "top_k"),
        (dict(r=0), "r"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(balance_loss_coef=-1.0), "balance_loss_coef"),
        (dict(expert_pattern=[2, 0]), r"expert_pattern\[1\]"),
        (dict(expert_pattern=[4, 4], num_experts=4), "expert_pattern"),
        (dict(expert_pattern=[1, 4], top_k=2), "top_k"),
        (dict(bias="lora_only"), "bias"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoLAConfig(**kwargs)


def test_allocation_list_must_match_depth():
    with pytest.raises(ValueError, match="`num_experts` has 3 entries but the model has 4 layers"):
        mola(tiny_llama(), num_experts=[2, 2, 2])
    with pytest.raises(ValueError, match="`top_k` \\(4\\) must be <= `num_experts` \\(2\\) at layer 0"):
        mola(tiny_llama(), num_experts=[2, 4, 4, 4], top_k=4)


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="not found in the base model"):
        mola(tiny_llama(), target_modules=["no_such_proj"])


def test_per_layer_allocation_refuses_a_target_outside_the_stack():
    with pytest.raises(ValueError, match="lm_head.*outside the block stack"):
        mola(tiny_llama(), target_modules=["q_proj", "lm_head"], expert_pattern=[2, 4])
    # with one int allocation a target outside the stack is fine
    model = mola(tiny_llama(), target_modules=["q_proj", "lm_head"], num_experts=2, top_k=1)
    assert isinstance(model.base_model.model.lm_head, MoLALinear)


def test_expert_pattern_spreads_over_groups_earlier_groups_larger():
    assert expand_expert_pattern([2, 4, 6, 8], 30) == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7
    assert expand_expert_pattern([2, 4, 6, 8], 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    with pytest.raises(ValueError, match="expert_pattern"):
        expand_expert_pattern([1, 2, 3], 2)


def test_model_gets_the_per_layer_allocation():
    model = mola(tiny_llama(num_layers=5), expert_pattern=[2, 4], top_k=[1, 1, 2, 2, 2])
    experts = {}
    for module in model.modules():
        if isinstance(module, MoLALinear):
            experts.setdefault(module.mola_layer_index, set()).add(
                (module.mola_num_experts["default"], module.mola_top_k["default"])
            )
    assert experts == {0: {(2, 1)}, 1: {(2, 1)}, 2: {(2, 2)}, 3: {(4, 2)}, 4: {(4, 2)}}
    # default targets for Llama: all seven projections, as in the paper
    targets = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, MoLALinear)}
    assert targets == set(ALL_PROJ)


# ---------------------------------------------------------------- forward = the official algorithm


def reference_mola_linear(layer: MoLALinear, x: torch.Tensor, adapter="default") -> torch.Tensor:
    """The official Linear_MoE forward, expert by expert (a loop is fine in a test)."""
    E, k, r = layer.mola_num_experts[adapter], layer.mola_top_k[adapter], layer.mola_r[adapter]
    A = layer.mola_A[adapter].view(E, r, -1)
    B = layer.mola_B[adapter].view(-1, E, r)
    flat = x.reshape(-1, x.shape[-1])
    out = layer.base_layer(flat)
    probs = torch.softmax(layer.mola_router[adapter](flat).float(), dim=-1)
    weights, chosen = probs.topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    for token in range(flat.shape[0]):
        for slot in range(k):
            e = chosen[token, slot]
            expert = B[:, e, :] @ (A[e] @ flat[token])
            out[token] += weights[token, slot] * expert * layer.mola_scaling[adapter]
    return out.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("num_experts, top_k", [(4, 2), (3, 3), (5, 1)])
def test_forward_matches_official_per_expert_computation(num_experts, top_k):
    model = mola(tiny_llama(), num_experts=num_experts, top_k=top_k, init_lora_weights=False, lora_dropout=0.0)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_mola_linear(layer, x), rtol=1e-5, atol=1e-5)


def test_fresh_adapter_equals_base_and_random_adapter_does_not():
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    fresh = mola(clone_model(base), expert_pattern=[2, 4])
    torch.testing.assert_close(logits(fresh, inputs), expected, rtol=0, atol=0)
    changed = mola(clone_model(base), expert_pattern=[2, 4], init_lora_weights=False)
    assert (logits(changed, inputs) - expected).abs().max() > 1e-3


# ---------------------------------------------------------------- balance loss and statistics


def test_balance_loss_is_per_layer_over_all_targets_excluding_padding():
    model = mola(tiny_llama(), expert_pattern=[2, 4], balance_loss_coef=0.01, init_lora_weights=False)
    inputs = batch(left_pad=3)
    model(**inputs)
    real = inputs["attention_mask"].reshape(-1).bool()
    # recompute the official loss from each router's raw logits, padding removed
    expected = 0.0
    for block in model.base_model.model.model.layers:
        counts, probs_sum, tokens, k, E = 0, 0, 0, None, None
        for module in block.modules():
            if not isinstance(module, MoLALinear):
                continue
            x = module._last_input.reshape(-1, module.in_features)[real]
            p = torch.softmax(module.mola_router["default"](x).float(), -1)
            E, k = p.shape[-1], module.mola_top_k["default"]
            chosen = p.topk(k, -1).indices
            counts = counts + torch.bincount(chosen.reshape(-1), minlength=E).float()
            probs_sum = probs_sum + p.sum(0)
            tokens += x.shape[0]
        expected += E * torch.dot(counts / (tokens * k), probs_sum / tokens)
    losses = peft_depth.aux_losses(model)
    torch.testing.assert_close(losses["routing"], 0.01 * expected, rtol=1e-5, atol=1e-7)
    raw = peft_depth.core.raw_aux_losses(model)["routing"]
    assert raw.coefficient == 0.01
    # overriding the coefficient rescales, and 0 drops the term
    torch.testing.assert_close(
        peft_depth.aux_losses(model, {"routing": 1.0})["routing"], expected, rtol=1e-5, atol=1e-6
    )
    assert "routing" not in peft_depth.aux_losses(model, {"routing": 0.0})


@pytest.fixture(autouse=True)
def _record_inputs(monkeypatch):
    """Let tests see each MoLA layer's last input (only for checking the loss by hand)."""
    original = MoLALinear.forward

    def forward(self, x, *args, **kwargs):
        self._last_input = x.detach()
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(MoLALinear, "forward", forward)


def test_padding_content_does_not_change_routing_statistics():
    model = mola(tiny_llama(), num_experts=4, top_k=2, init_lora_weights=False)
    inputs = batch(left_pad=3)
    model(**inputs)
    first = peft_depth.routing_stats(model)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][0, :3] = torch.tensor([5, 6, 7])  # different padding tokens, still masked
    model(**other)
    second = peft_depth.routing_stats(model)
    assert [row["num_tokens"] for row in first["mola"]["default"]] == [11] * 4
    for a, b in zip(first["mola"]["default"], second["mola"]["default"]):
        assert a["expert_fraction"] == pytest.approx(b["expert_fraction"])
        assert a["mean_prob"] == pytest.approx(b["mean_prob"], abs=1e-6)


def test_routing_stats_report_usage_per_layer():
    model = mola(tiny_llama(), expert_pattern=[2, 4])
    model(**batch())
    rows = peft_depth.routing_stats(model)["mola"]["default"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]
    assert [row["num_experts"] for row in rows] == [2, 2, 4, 4]
    for row in rows:
        assert sum(row["expert_fraction"]) == pytest.approx(1.0)
        assert sum(row["mean_prob"]) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= row["usage_entropy"] <= math.log(row["num_experts"]) + 1e-6


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    def run(checkpointing):
        model = mola(tiny_llama(), expert_pattern=[2, 4], init_lora_weights=False, lora_dropout=0.0)
        return backward_once(model, checkpointing, aux_weights={"routing": 0.1})

    run_a, run_b = run(False), run(True)
    assert_same_loss_and_gradients(run_a, run_b)
    # recomputation during backward overwrote, not appended: same token counts as one forward
    for row_a, row_b in zip(run_a[2]["mola"]["default"], run_b[2]["mola"]["default"], strict=True):
        assert row_a["num_tokens"] == row_b["num_tokens"] == 12
        assert row_a["expert_fraction"] == pytest.approx(row_b["expert_fraction"])
        assert row_a["mean_prob"] == pytest.approx(row_b["mean_prob"], abs=1e-5)


# ---------------------------------------------------------------- PEFT behaviour


def test_save_load_round_trip_is_exact_and_safetensors_only(tmp_path):
    base = tiny_llama()
    model = mola(clone_model(base), expert_pattern=[2, 4], init_lora_weights=False)
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".mola_" in key for key in saved), [k for k in saved if ".mola_" not in k]
    assert not any("base_layer" in key for key in saved)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    state = {k: v for k, v in loaded.state_dict().items() if "mola_" in k}
    assert len(state) == len(saved)


def test_load_onto_meta_device_with_low_cpu_mem_usage(tmp_path):
    base = tiny_llama()
    model = mola(clone_model(base), num_experts=3, top_k=2, init_lora_weights=False)
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


def test_auto_peft_model_loads_from_adapter_dir(tmp_path):
    base = tiny_llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = mola(clone_model(base), num_experts=2, top_k=1, init_lora_weights=False)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


def test_disable_adapter_gives_base_outputs():
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = mola(clone_model(base), expert_pattern=[2, 4], init_lora_weights=False)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        assert peft_depth.routing_stats(model) == {}
    assert (logits(model, inputs) - expected).abs().max() > 1e-3


def test_multiple_adapters_set_delete_and_combine():
    base = tiny_llama()
    inputs = batch()
    model = mola(clone_model(base), num_experts=2, top_k=1, init_lora_weights=False, target_modules=["q_proj"])
    model.add_adapter("other", MoLAConfig(num_experts=3, top_k=2, init_lora_weights=False, target_modules=["q_proj"]))
    out_default = logits(model, inputs)
    model.set_adapter("other")
    out_other = logits(model, inputs)
    assert (out_default - out_other).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    # both active at once: the deltas add up on each layer
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, layer.in_features)
    with torch.no_grad():
        both = layer(x)
        layer.set_adapter("default")
        only_default = layer(x) - layer.base_layer(x)
        layer.set_adapter("other")
        only_other = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(both, layer.base_layer(x) + only_default + only_other, rtol=1e-5, atol=1e-6)
    model.base_model.set_adapter(["default", "other"])
    model(**inputs)
    assert set(peft_depth.aux_losses(model)) == {"routing.default", "routing.other"}
    # an override of "routing" covers both, as in DepthSFTTrainer (it was ignored by aux_losses)
    assert peft_depth.aux_losses(model, {"routing": 0.0}) == {}
    raw = raw_aux_losses(model)
    doubled = peft_depth.aux_losses(model, {"routing": 2.0})
    for name in ("routing.default", "routing.other"):
        torch.testing.assert_close(doubled[name], 2.0 * raw[name].value)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, inputs), out_default, rtol=0, atol=0)


def test_training_moves_only_adapter_parameters_and_loss_decreases():
    model = mola(tiny_llama(), expert_pattern=[2, 4], balance_loss_coef=0.01)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(("mola_" in n) == p.requires_grad for n, p in model.named_parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = batch(batch_size=4, seq_len=12)
    losses = [step["lm"] for step in train_steps(model, optimizer, inputs, steps=15)]
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == ("mola_" in name), name  # routers, A and B all move; nothing else does


def test_generate_with_cache_equals_without():
    model = mola(tiny_llama(), expert_pattern=[2, 4], init_lora_weights=False)
    prompt = batch(batch_size=2, seq_len=5, left_pad=2)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**prompt, use_cache=True, **kwargs)
    without = model.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_bf16_model_routes_in_fp32(monkeypatch):
    from peft_depth.tuners.mola import layer as mola_layer

    decisions = []

    def recording_route(logits, top_k):
        decision = route_top_k(logits, top_k)
        decisions.append((logits.dtype, decision.probs.dtype, decision.gates.dtype))
        return decision

    monkeypatch.setattr(mola_layer, "route_top_k", recording_route)
    model = mola(tiny_llama().to(torch.bfloat16), num_experts=4, top_k=2, init_lora_weights=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.mola_A["default"].dtype == torch.float32  # peft autocasts adapter weights up
    out = model(**batch())
    # every router of the bf16 model turns its scores into float32 probabilities and mixing weights
    assert decisions and all(probs == gates == torch.float32 for _, probs, gates in decisions), decisions
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert torch.isfinite(peft_depth.aux_losses(model)["routing"])


def test_merge_and_unload_is_refused_with_reason():
    model = mola(tiny_llama(), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="router"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not any(isinstance(m, MoLALinear) for m in unloaded.modules())


def test_print_trainable_parameters_counts_every_adapter_tensor(capsys):
    model = mola(tiny_llama(), expert_pattern=[2, 4])
    expected = sum(p.numel() for n, p in model.named_parameters() if "mola_" in n)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


# ---------------------------------------------------------------- other architectures


def test_gpt2_conv1d_layers():
    base = tiny_gpt2()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = mola(clone_model(base), expert_pattern=[2, 4])
    targets = [n for n, m in model.named_modules() if isinstance(m, MoLALinear)]
    assert len(targets) == 4 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    model = mola(clone_model(base), expert_pattern=[2, 4], init_lora_weights=False)
    out = model(**inputs, labels=inputs["input_ids"])
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    assert len(peft_depth.routing_stats(model)["mola"]["default"]) == 4


def test_bert_sequence_classification():
    model = get_peft_model(
        tiny_bert(), MoLAConfig(task_type="SEQ_CLS", expert_pattern=[2, 4], init_lora_weights=False)
    )
    trainable = {
        n.split(".")[-2] if n.endswith(".weight") else n for n, p in model.named_parameters() if p.requires_grad
    }
    assert any("classifier" in n for n in trainable)  # peft's modules_to_save for SEQ_CLS
    inputs = batch()
    out = model(**inputs, labels=torch.tensor([0, 1]))
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    rows = peft_depth.routing_stats(model)["mola"]["default"]
    assert [row["num_experts"] for row in rows] == [2, 2, 4, 4]
    assert all(row["num_tokens"] == 12 for row in rows)  # 14 tokens minus 2 padding


def test_plain_mlp_without_layer_stack():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(5, 8)
    expected = mlp(x).detach()
    model = get_peft_model(MLP(), MoLAConfig(target_modules=["fc1", "fc2"], num_experts=3, top_k=2))
    model.base_model.model.load_state_dict(
        {
            k.replace("fc1.", "fc1.base_layer.").replace("fc2.", "fc2.base_layer."): v
            for k, v in mlp.state_dict().items()
        },
        strict=False,
    )
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert set(peft_depth.aux_losses(model)) == {"routing"}
    with pytest.raises(ValueError, match="block stack"):
        get_peft_model(MLP(), MoLAConfig(target_modules=["fc1"], expert_pattern=[2, 4]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_expert_mola_merges_exactly(arch):
    """One expert always gets router weight 1: the adapter is a plain LoRA and merges into the base weights."""
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    model = get_peft_model(base, MoLAConfig(num_experts=1, top_k=1, target_modules=targets, init_lora_weights=False))
    model.eval()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        assert not any("mola" in name for name, _ in merged.named_modules())
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_names_the_layers_with_several_experts():
    model = get_peft_model(tiny_llama(), MoLAConfig(num_experts=[1, 1, 2, 1], top_k=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"more than one expert in 'default': layers \[2\]"):
        model.merge_and_unload()


def test_a_one_expert_adapter_merges_while_a_routed_one_is_loaded_beside_it():
    """The refusal looked at every adapter the model held: an inactive routed adapter blocked merging the active
    one-expert adapter, with a message that read as if the active one were routed."""
    inputs = batch()
    model = get_peft_model(tiny_llama(), MoLAConfig(num_experts=1, top_k=1, target_modules=["q_proj"]))
    with torch.no_grad():  # B starts at zero: a merge that dropped the adapter would pass unnoticed
        for name, param in model.named_parameters():
            if "mola_B" in name:
                param.normal_(0.0, 0.5)
    model.add_adapter("routed", MoLAConfig(num_experts=3, top_k=1, target_modules=["q_proj"]))
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    with pytest.raises(ValueError, match=r"more than one expert in 'routed'"):
        model.base_model.merge_adapter(["routed"])
    merged = model.merge_and_unload(adapter_names=["default"])
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- default allocation (issue 14)


def test_default_allocation_is_the_papers_increasing_pattern_and_is_saved_explicitly(tmp_path):
    model = mola(tiny_llama(), target_modules=["q_proj"])
    experts = [
        model.base_model.model.model.layers[i].self_attn.q_proj.mola_router["default"].out_features for i in range(4)
    ]
    assert experts == [2, 4, 6, 8]  # ▽ over 4 layers: one layer per group
    model.save_pretrained(tmp_path)
    saved = MoLAConfig.from_pretrained(tmp_path)
    assert saved.expert_pattern == [2, 4, 6, 8] and saved.num_experts is None
    assert saved.peft_depth_version == CONFIG_FORMAT_VERSION


def test_a_version_1_config_without_an_allocation_keeps_its_meaning():
    # Written by peft-depth before the default changed: neither field meant 8 experts in every layer.
    old = MoLAConfig(peft_depth_version=1, target_modules=["q_proj"])
    assert (old.num_experts, old.expert_pattern) == (8, None)
    model = get_peft_model(tiny_llama(), old)
    assert {
        layer.self_attn.q_proj.mola_router["default"].out_features for layer in model.base_model.model.model.layers
    } == {8}


def test_a_top_k_above_the_default_patterns_smallest_group_says_the_pattern_is_the_default():
    with pytest.raises(ValueError, match=r"`top_k` \(3\) .* \(2\) \(the default ▽ pattern; set `num_experts`"):
        MoLAConfig(top_k=3)


def test_reading_routing_stats_under_no_grad_first_keeps_the_balance_loss_gradient():
    # A logging callback may read the statistics under no_grad before the training loss is built; the statistics
    # were then cached without a graph and aux_losses returned a loss with no gradient to the routers.
    model = mola(tiny_llama(), target_modules=["q_proj"], num_experts=4)
    model.train()
    model(**batch())
    with torch.no_grad():
        peft_depth.routing_stats(model)
        assert not peft_depth.aux_losses(model)["routing"].requires_grad
    loss = peft_depth.aux_losses(model)["routing"]
    assert loss.requires_grad
    loss.backward()
    routers = [m.mola_router["default"].weight for m in model.modules() if isinstance(m, MoLALinear)]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


# ---------------------------------------------------------------- dropout per expert (the official dispatch)


class _RecordedDropout(nn.Module):
    """Inverted dropout whose masks are kept, so a reference can replay them."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.generator, self.masks = p, torch.Generator().manual_seed(seed), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand(x.shape, generator=self.generator) >= self.p).to(x.dtype)
        self.masks.append(mask)
        return x * mask / (1 - self.p)


def test_each_selected_expert_reads_its_own_dropout_mask_as_in_the_official_dispatch():
    """The official code calls dropout once per expert on the tokens routed to it, so a token's k experts read k
    independent masks of its input: replaying the masks drawn here in that per-expert loop gives the same output."""
    model = mola(tiny_llama(), num_experts=4, top_k=2, init_lora_weights=False, lora_dropout=0.3)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    layer.mola_dropout["default"] = _RecordedDropout(0.3, seed=5)
    model.train()
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        out = layer(x)
    (mask,) = layer.mola_dropout["default"].masks
    assert mask.shape == (10, 2, layer.in_features)  # one mask per token and selected expert
    E, r = 4, layer.mola_r["default"]
    A, B = layer.mola_A["default"].view(E, r, -1), layer.mola_B["default"].view(-1, E, r)
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(layer.mola_router["default"](flat).float(), dim=-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = layer.base_layer(flat)
    for token in range(flat.shape[0]):
        for slot in range(2):
            e, dropped = chosen[token, slot], flat[token] * mask[token, slot] / 0.7
            expected[token] += weights[token, slot] * (B[:, e, :] @ (A[e] @ dropped)) * layer.mola_scaling["default"]
    torch.testing.assert_close(out.view(10, -1), expected, rtol=1e-5, atol=1e-5)


def _opposed_experts_layer(expert_dropout: str) -> MoLALinear:
    """Two experts with the same A and opposite B, both always selected with weight 0.5: without dropout (and with
    one mask shared by both) they cancel exactly."""
    model = mola(tiny_llama(), num_experts=2, top_k=2, lora_dropout=0.5, expert_dropout=expert_dropout)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        r = layer.mola_r["default"]
        layer.mola_A["default"][r:] = layer.mola_A["default"][:r]
        layer.mola_B["default"].normal_()
        layer.mola_B["default"][:, r:] = -layer.mola_B["default"][:, :r]
        layer.mola_router["default"].weight.zero_()
    model.train()
    return layer


def test_per_expert_masks_keep_the_official_noise_where_a_shared_mask_removes_it():
    torch.manual_seed(0)
    x = torch.randn(4000, 1, 32)
    with torch.no_grad():
        shared = _opposed_experts_layer("shared")
        # one mask: the experts cancel (up to the matmul's rounding), no noise at all
        torch.testing.assert_close(shared(x), shared.base_layer(x), rtol=0, atol=1e-5)
        own = _opposed_experts_layer("per_expert")
        delta = own(x) - own.base_layer(x)
    assert delta.abs().mean() > 0.1  # independent masks: the experts' noise does not cancel
    # unbiased: the mean update is the no-dropout one (zero), within sampling error
    assert delta.mean(0).abs().max() < 5 * delta.std(0).max() / math.sqrt(x.shape[0])
    own.eval()
    with torch.no_grad():
        # inference has no dropout: both modes are the same model
        torch.testing.assert_close(own(x), own.base_layer(x), rtol=0, atol=1e-5)


def test_expert_dropout_defaults_to_the_official_per_expert_masks_and_old_configs_keep_theirs(tmp_path):
    assert MoLAConfig().expert_dropout == "per_expert"
    assert MoLAConfig(peft_depth_version=3).expert_dropout == "shared"  # what adapters saved before trained with
    with pytest.raises(ValueError, match=r"expert_dropout.*'per_expert', 'shared'"):
        MoLAConfig(expert_dropout="independent")
    model = mola(tiny_llama(), target_modules=["q_proj"])
    model.save_pretrained(tmp_path)
    assert MoLAConfig.from_pretrained(tmp_path).expert_dropout == "per_expert"  # saved explicitly
