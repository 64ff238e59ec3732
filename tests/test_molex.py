"""MoLEx behaves as a PEFT method and computes the paper's layer mixture exactly."""

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, clone_model, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen3, tiny_roberta
from training_checks import assert_same_loss_and_gradients, backward_once, train_steps
from transformers.cache_utils import Cache

import peft_depth
from peft_depth import MoLExConfig
from peft_depth.core.cache_state import attached_states
from peft_depth.core.lora_layer import DepthLoraLinear
from peft_depth.tuners.molex.model import _BlockForward


def molex(model, **kwargs):
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return get_peft_model(model, MoLExConfig(**kwargs))


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def blocks(model):
    return model.base_model.layer_stack.layers


def gates(model, adapter="default"):
    return model.base_model.molex_gate[adapter]


def sharpen_gate(model, scale=40.0, seed=3):
    """Make the random gate decisive so tokens pick different layers (the default init is nearly uniform)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates(model).values():
            gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=generator) * scale)


def force_expert(model, layer, adapter="default"):
    """Bias the (shared, linear) gate so every token picks `layer`."""
    with torch.no_grad():
        for gate in gates(model, adapter).values():
            gate.proj.weight.zero_()
            gate.proj.bias.fill_(-10.0)
            gate.proj.bias[layer] = 10.0


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(routing="layer"), "routing"),
        (dict(gate_type="mlp"), "gate_type"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(balance_loss_coef=-1e-3), "balance_loss_coef"),
        (dict(gate_proj_dim=0), "gate_proj_dim"),
        (dict(molex_layers=[]), "molex_layers"),
        (dict(molex_layers=[0, -1]), r"molex_layers\[1\]"),
        (dict(molex_layers=[1, 1]), "molex_layers"),
        (dict(expert_layers=["a"]), r"expert_layers\[0\]"),
        (dict(learn_alpha="yes"), "learn_alpha"),
        (dict(gate_lr=-1.0), "gate_lr"),
        (dict(gate_weight_decay=float("inf")), "gate_weight_decay"),
        (dict(r=0), "r"),
        (dict(bias="lora_only"), "bias"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoLExConfig(**kwargs)


def test_layer_indices_must_exist_in_the_model():
    with pytest.raises(ValueError, match=r"`molex_layers` contains \[4\] but the model has 4 layers"):
        molex(tiny_llama(), molex_layers=[0, 4])
    with pytest.raises(ValueError, match=r"`expert_layers` contains \[7\]"):
        molex(tiny_llama(), expert_layers=[1, 7])


def test_layer_types_restrict_candidates_and_an_empty_set_is_an_error():
    types = ["sliding_attention", "full_attention"] * 2
    with pytest.raises(ValueError, match="MoLEx layer 0 has no candidate experts"):
        molex(tiny_qwen3(layer_types=types), molex_layers=[0], expert_layers=[1, 3])
    model = molex(tiny_qwen3(layer_types=types), molex_layers=[0, 1, 2, 3])
    plan = model.base_model._plans["default"]
    assert plan.candidates == {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}


def test_defaults_follow_the_paper_per_architecture():
    decoder = molex(tiny_llama(num_layers=6))
    plan = decoder.base_model._plans["default"]
    assert plan.molex_layers == [0, 1, 2] and plan.alpha == 0.95 and plan.causal
    encoder = get_peft_model(tiny_bert(), MoLExConfig(task_type="SEQ_CLS"))
    plan = encoder.base_model._plans["default"]
    assert plan.molex_layers == [0, 1, 2, 3] and plan.alpha == 0.5 and not plan.causal
    # LoRA's default targets (q/v for Llama, query/value for BERT), like plain LoRA
    names = {n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, DepthLoraLinear)}
    assert names == {"q_proj", "v_proj"}
    assert isinstance(blocks(decoder)[2].__dict__.get("forward"), _BlockForward)
    assert "forward" not in blocks(decoder)[3].__dict__


# ---------------------------------------------------------------- forward = the paper's mixture


class _Capture:
    """Records the input, keyword arguments and output of one block call."""

    def __init__(self, block):
        self.handles = [
            block.register_forward_pre_hook(self.pre, with_kwargs=True),
            block.register_forward_hook(self.post),
        ]

    def pre(self, module, args, kwargs):
        self.hidden = args[0] if args else kwargs["hidden_states"]
        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def post(self, module, args, output):
        self.output = output[0] if isinstance(output, tuple) else output


def plain_block(model, index, hidden, kwargs):
    """Block `index` with its LoRA, bypassing the MoLEx wrapper and any cache."""
    block = blocks(model)[index]
    # the cache is dropped by what it is: its keyword changed across transformers releases
    kwargs = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()} | {"use_cache": False}
    out = type(block).forward(block, hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def test_batch_vote_forward_matches_hand_computation():
    model = molex(tiny_llama(), molex_layers=[1], alpha=0.3, init_lora_weights=False, lora_dropout=0.0)
    sharpen_gate(model, scale=5.0)
    capture = _Capture(blocks(model)[1])
    inputs = batch(left_pad=3)
    logits(model, inputs)
    z = capture.hidden
    gate = gates(model)["shared"].proj
    probs = torch.softmax(z.reshape(-1, z.shape[-1]) @ gate.weight.T + gate.bias, dim=-1)
    votes = probs.argmax(-1)[inputs["attention_mask"].reshape(-1).bool()]
    j = int(torch.bincount(votes, minlength=4).argmax())
    with torch.no_grad():
        expected = 0.3 * plain_block(model, 1, z, capture.kwargs) + 0.7 * plain_block(model, j, z, capture.kwargs)
    torch.testing.assert_close(capture.output, expected, rtol=1e-5, atol=1e-6)
    row = peft_depth.routing_stats(model)["molex"]["default"][0]
    assert row["layer"] == 1 and row["chosen"] == j and row["num_tokens"] == 11


def test_token_routing_mixes_per_token():
    model = molex(tiny_llama(), molex_layers=[2], routing="token", alpha=0.6, init_lora_weights=False, lora_dropout=0)
    sharpen_gate(model)
    capture = _Capture(blocks(model)[2])
    inputs = batch(batch_size=3, seq_len=9, left_pad=0)
    logits(model, inputs)
    z = capture.hidden
    gate = gates(model)["shared"].proj
    choice = (z @ gate.weight.T + gate.bias).argmax(-1)  # [B, T]
    assert len(choice.unique()) >= 3, "the test needs tokens routed to several layers"
    with torch.no_grad():
        per_layer = torch.stack([plain_block(model, j, z, capture.kwargs) for j in range(4)])  # [L, B, T, d]
    chosen = per_layer.gather(0, choice[None, ..., None].expand(1, *z.shape))[0]
    expected = 0.6 * per_layer[2] + 0.4 * chosen
    torch.testing.assert_close(capture.output, expected, rtol=1e-5, atol=1e-6)


def test_sequence_routing_mixes_per_sequence():
    model = molex(tiny_llama(), molex_layers=[0], routing="sequence", alpha=0.5, init_lora_weights=False)
    model.eval()
    sharpen_gate(model, seed=5)
    capture = _Capture(blocks(model)[0])
    inputs = batch(batch_size=4, seq_len=6, left_pad=2)
    logits(model, inputs)
    z = capture.hidden
    gate = gates(model)["shared"].proj
    top1 = (z @ gate.weight.T + gate.bias).argmax(-1)
    real = inputs["attention_mask"].bool()
    row_choice = [int(torch.bincount(top1[b][real[b]], minlength=4).argmax()) for b in range(4)]
    assert peft_depth.routing_stats(model)["molex"]["default"][0]["chosen"] == row_choice
    with torch.no_grad():
        own = plain_block(model, 0, z, capture.kwargs)
        expected = torch.stack(
            [0.5 * own[b] + 0.5 * plain_block(model, j, z, capture.kwargs)[b] for b, j in enumerate(row_choice)]
        )
    torch.testing.assert_close(capture.output, expected, rtol=1e-5, atol=1e-6)


def test_choosing_its_own_layer_computes_the_block_once():
    model = molex(tiny_llama(), molex_layers=[0, 1, 2, 3], init_lora_weights=False)
    calls = [0] * 4
    for i, block in enumerate(blocks(model)):
        block.mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    force_expert(model, 2)
    logits(model, batch())
    assert calls == [1, 1, 1 + 3, 1]  # each layer once, plus layer 2 as the expert of layers 0, 1 and 3
    # layer 2 chose itself: its output is exactly its own block
    capture = _Capture(blocks(model)[2])
    logits(model, batch())
    torch.testing.assert_close(
        capture.output, plain_block(model, 2, capture.hidden, capture.kwargs).detach(), rtol=0, atol=0
    )


def test_fresh_adapter_mixes_layers_and_disable_adapter_gives_the_base_exactly():
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = molex(clone_model(base), molex_layers=[0, 1, 2, 3], alpha=0.5)
    assert (logits(model, inputs) - expected).abs().max() > 1e-3  # mixing layers is the method
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        assert peft_depth.routing_stats(model) == {}
        assert peft_depth.aux_losses(model) == {}
    assert (logits(model, inputs) - expected).abs().max() > 1e-3


# ---------------------------------------------------------------- balance loss and statistics


def test_balance_loss_is_num_layers_times_prob_of_the_voted_layer():
    model = molex(tiny_llama(), molex_layers=[0, 1], balance_loss_coef=0.01, init_lora_weights=False)
    sharpen_gate(model, scale=3.0)
    captures = [_Capture(blocks(model)[i]) for i in (0, 1)]
    inputs = batch(left_pad=3)
    model(**inputs)
    real = inputs["attention_mask"].reshape(-1).bool()
    gate = gates(model)["shared"].proj
    expected = 0.0
    for capture, row in zip(captures, peft_depth.routing_stats(model)["molex"]["default"]):
        z = capture.hidden.reshape(-1, 32)[real]
        probs = torch.softmax(gate(z), -1)
        expected += 4 * probs[:, row["chosen"]].mean()  # official: L · P_j
        assert row["expert_fraction"][row["chosen"]] == 1.0
    torch.testing.assert_close(peft_depth.aux_losses(model)["routing"], 0.01 * expected, rtol=1e-5, atol=1e-7)


def test_padding_content_does_not_change_routing():
    model = molex(tiny_llama(), molex_layers=[0, 1, 2], routing="token", init_lora_weights=False)
    sharpen_gate(model)
    inputs = batch(left_pad=3)
    model(**inputs)
    first = peft_depth.routing_stats(model)["molex"]["default"]
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][0, :3] = torch.tensor([5, 6, 7])
    model(**other)
    second = peft_depth.routing_stats(model)["molex"]["default"]
    for a, b in zip(first, second, strict=True):
        assert a["num_tokens"] == b["num_tokens"] == 11
        assert a["expert_fraction"] == pytest.approx(b["expert_fraction"])
        assert a["mean_prob"] == pytest.approx(b["mean_prob"], abs=1e-5)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    def run(checkpointing):
        model = molex(tiny_llama(), molex_layers=[0, 1, 2], alpha=0.5, init_lora_weights=False, lora_dropout=0.0)
        sharpen_gate(model, scale=3.0)
        return backward_once(model, checkpointing)

    run_a, run_b = run(False), run(True)
    assert_same_loss_and_gradients(run_a, run_b)
    chosen = [[row["chosen"] for row in run[2]["molex"]["default"]] for run in (run_a, run_b)]
    assert chosen[0] == chosen[1]


def test_output_hidden_states_records_each_layer_once():
    model = molex(tiny_llama(), molex_layers=[0, 1, 2, 3], init_lora_weights=False)
    force_expert(model, 3)
    capture = _Capture(blocks(model)[1])
    out = model(**batch(), output_hidden_states=True)
    assert len(out.hidden_states) == 5
    torch.testing.assert_close(out.hidden_states[2], capture.output)


# ---------------------------------------------------------------- PEFT behaviour


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(gate_type="cosine", gate_proj_dim=16, shared_gate=False, learn_alpha=True, routing="token"),
    ],
)
def test_save_load_round_trip_is_exact(tmp_path, kwargs):
    base = tiny_llama()
    model = molex(clone_model(base), molex_layers=[0, 1, 2, 3], init_lora_weights=False, **kwargs)
    sharpen_gate(model) if kwargs.get("gate_type") != "cosine" else None
    if kwargs.get("learn_alpha"):
        with torch.no_grad():
            for p in model.base_model.molex_alpha["default"].parameters():
                p.add_(torch.randn_like(p))
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".lora_" in k or ".molex_" in k for k in saved), list(saved)
    assert any("molex_gate" in k for k in saved)
    assert not any(".default" in k or "base_layer" in k for k in saved)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k or "molex_" in k}
    assert len(state) == len(saved)


def test_load_onto_meta_device_with_low_cpu_mem_usage(tmp_path):
    base = tiny_llama()
    model = molex(clone_model(base), molex_layers=[0, 1], learn_alpha=True, init_lora_weights=False)
    sharpen_gate(model)
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


def test_multiple_adapters_set_and_delete():
    base = tiny_llama()
    inputs = batch()
    model = molex(clone_model(base), molex_layers=[0, 1], init_lora_weights=False)
    model.add_adapter("other", MoLExConfig(molex_layers=[2, 3], routing="token", init_lora_weights=False))
    out_default = logits(model, inputs)
    assert [r["layer"] for r in peft_depth.routing_stats(model)["molex"]["default"]] == [0, 1]
    model.set_adapter("other")
    out_other = logits(model, inputs)
    assert [r["layer"] for r in peft_depth.routing_stats(model)["molex"]["other"]] == [2, 3]
    assert (out_default - out_other).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    assert any("molex_gate.other" in n for n in trainable)
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter's gates at a time"):
        model(**inputs)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert "forward" not in blocks(model)[3].__dict__  # layer 3 mixed only for "other"
    torch.testing.assert_close(logits(model, inputs), out_default, rtol=0, atol=0)


def test_training_moves_only_adapter_parameters_and_loss_decreases():
    model = molex(tiny_llama(), molex_layers=[0, 1, 2, 3], alpha=0.5, balance_loss_coef=0.01, learn_alpha=True)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = model.base_model.depth_optimizer_groups(1e-2, 0.0)
    assert [g["name"] for g in groups] == ["gate"]
    gate_ids = {id(p) for p in groups[0]["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    optimizer = torch.optim.AdamW([*groups, {"params": rest}], lr=1e-2)
    inputs = batch(batch_size=4, seq_len=12)
    losses = [step["lm"] for step in train_steps(model, optimizer, inputs, steps=15)]
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        adapter = "lora_" in name or "molex_" in name
        assert moved == adapter, name
        assert param.requires_grad == adapter, name


def test_gate_learns_only_from_the_balance_loss_unless_straight_through():
    inputs = batch()

    def gate_grad(**kwargs):
        model = molex(tiny_llama(), molex_layers=[0, 1], alpha=0.5, init_lora_weights=False, **kwargs)
        model.train()
        out = model(**inputs, labels=inputs["input_ids"])
        (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
        grad = gates(model)["shared"].proj.weight.grad
        return None if grad is None else grad.abs().sum().item(), out.logits.detach()

    assert gate_grad(balance_loss_coef=0.0)[0] is None  # the official gate: no task-loss gradient
    assert gate_grad(balance_loss_coef=0.01)[0] > 0
    straight, logits_st = gate_grad(balance_loss_coef=0.0, straight_through_gate=True)
    _, logits_plain = gate_grad(balance_loss_coef=0.0)
    assert straight > 0
    torch.testing.assert_close(logits_st, logits_plain, rtol=1e-6, atol=1e-6)  # outputs unchanged


def test_gate_group_defaults_are_the_official_codes_per_model_kind():
    # Issue 14: the official gates train at 0.1 (weight decay 0.1) in the GLUE scripts and 0.01 in the GPT-2 NLG code.
    (causal,) = molex(tiny_llama()).base_model.depth_optimizer_groups(5e-4, 0.02)
    assert (causal["lr"], causal["weight_decay"]) == (0.01, 0.02)
    encoder = get_peft_model(tiny_bert(), MoLExConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    (group,) = encoder.base_model.depth_optimizer_groups(5e-4, 0.02)
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.1)
    # a config written before the defaults changed keeps the trainer's settings
    (old,) = molex(tiny_llama(), peft_depth_version=1).base_model.depth_optimizer_groups(5e-4, 0.02)
    assert (old["lr"], old["weight_decay"]) == (5e-4, 0.02)


def test_optimizer_groups_carry_gate_lr_and_decay():
    model = molex(tiny_llama(), gate_lr=0.1, gate_weight_decay=0.1, learn_alpha=True, shared_gate=False)
    (group,) = model.base_model.depth_optimizer_groups(5e-4, 0.0)
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.1
    names = [n for n, _ in model.base_model.gate_parameters()]
    assert names == [
        "molex_gate.default.layer0.proj.weight",
        "molex_gate.default.layer0.proj.bias",
        "molex_gate.default.layer1.proj.weight",
        "molex_gate.default.layer1.proj.bias",
        "molex_alpha.default.weights.layer0",
        "molex_alpha.default.weights.layer1",
    ]
    alpha = model.base_model.molex_alpha["default"]
    # learned α starts where the official use_learn_weight starts it: softmax((0.95, 0.05))[0]
    assert float(alpha(1).detach()) == pytest.approx(1 / (1 + math.exp(-0.9)))


def test_merge_and_unload_is_refused_and_unload_restores_the_base():
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = molex(clone_model(base), molex_layers=[0, 1, 2, 3], init_lora_weights=False)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not any(isinstance(m, DepthLoraLinear) for m in unloaded.modules())
    assert not any("forward" in block.__dict__ for block in unloaded.model.layers)
    torch.testing.assert_close(logits(unloaded, inputs), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- generation and the KV cache


@pytest.mark.parametrize("factory", ["llama", "qwen3_sliding", "gpt2"])
def test_token_routing_generate_with_cache_equals_without(factory):
    if factory == "llama":
        base = tiny_llama()
    elif factory == "qwen3_sliding":
        base = tiny_qwen3(
            layer_types=["sliding_attention", "full_attention"] * 2, use_sliding_window=True, sliding_window=4
        )
    else:
        base = tiny_gpt2()
    model = molex(base, molex_layers=[0, 1, 2, 3], routing="token", alpha=0.5, init_lora_weights=False)
    sharpen_gate(model)
    prompt = batch(batch_size=2, seq_len=6, left_pad=2)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**prompt, use_cache=True, **kwargs)
    without = model.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    # the decode steps routed tokens to layers (experts caught up on earlier positions)
    assert any(len(row["chosen"]) > 1 for row in peft_depth.routing_stats(model)["molex"]["default"])


@pytest.mark.parametrize(
    "decoding",
    [
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=3, sliding=True),
        dict(assistant=True),
    ],
    ids=["beam", "beam_return_2", "beam_sliding_window", "assisted"],
)
def test_token_routing_cache_follows_beam_reordering_and_assisted_cropping(decoding, monkeypatch):
    """Beam search reorders the cache rows and assisted decoding crops rejected draft positions: the expert caches
    follow both, so generation with a cache equals generation without."""
    from peft_depth.tuners.molex.expert_cache import ExpertCacheState

    if decoding.pop("sliding", False):  # the side caches then hold sliding-window layers too
        base = tiny_qwen3(
            layer_types=["sliding_attention", "full_attention"] * 2, use_sliding_window=True, sliding_window=4
        )
    else:
        base = tiny_llama()
    model = molex(base, molex_layers=[0, 1, 2, 3], routing="token", alpha=0.5, init_lora_weights=False)
    sharpen_gate(model)
    edits = []
    for name in ("reorder", "crop"):
        original = getattr(ExpertCacheState, name)
        monkeypatch.setattr(
            ExpertCacheState, name, lambda self, arg, _o=original, _n=name: (edits.append(_n), _o(self, arg))[1]
        )
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    if decoding.pop("assistant", False):
        prompt = batch(batch_size=1, seq_len=6, left_pad=0)
        kwargs["assistant_model"] = tiny_llama(seed=5)  # a draft model that disagrees: its tokens get rejected
        expected_edit = "crop"
    else:
        prompt = batch(batch_size=2, seq_len=6, left_pad=2)
        expected_edit = "reorder"
    with_cache = model.generate(**prompt, use_cache=True, **kwargs, **decoding)
    kwargs.pop("assistant_model", None)
    without = model.generate(**prompt, use_cache=False, **kwargs, **decoding)
    assert expected_edit in edits
    assert torch.equal(with_cache, without)


def test_token_routing_never_writes_the_real_cache_slot_of_an_expert():
    model = molex(tiny_llama(), molex_layers=[0], routing="token", init_lora_weights=False)
    force_expert(model, 3)
    inputs = batch(left_pad=0)
    out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    assert [cache.get_seq_length(i) for i in range(4)] == [7, 7, 7, 7]  # each slot written once, by its own layer
    state = attached_states(cache)[("molex", (id(model.base_model), "default", 0))]
    assert state.cache.get_seq_length(3) == 7 and state.past_length == 7


def test_batch_vote_generates_without_cache_with_one_warning():
    model = molex(tiny_llama(), molex_layers=[0, 1], alpha=0.5, init_lora_weights=False)
    sharpen_gate(model)
    prompt = batch(batch_size=2, seq_len=5, left_pad=2)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="use_cache=False"):
        forced = model.generate(**prompt, **kwargs)
    explicit = model.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(forced, explicit)
    # continuing from a filled cache by hand is refused, not silently wrong
    out = model(**prompt, use_cache=True)
    step = {"input_ids": prompt["input_ids"][:, -1:], "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match="cannot continue from a KV cache"):
        model(**step, past_key_values=out.past_key_values, use_cache=True)


# ---------------------------------------------------------------- architectures


def test_gpt2_builds_trains_and_mixes():
    model = molex(tiny_gpt2(), init_lora_weights=False)
    assert model.base_model._plans["default"].molex_layers == [0, 1]
    inputs = batch()
    out = model(**inputs, labels=inputs["input_ids"])
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    assert gates(model)["shared"].proj.weight.grad is not None
    assert len(peft_depth.routing_stats(model)["molex"]["default"]) == 2


@pytest.mark.parametrize("factory", [tiny_bert, tiny_roberta])
def test_encoders_sequence_classification(factory):
    base = factory()
    inputs = batch(left_pad=0)
    inputs["attention_mask"][0, -2:] = 0  # right padding, as tokenizers do for encoders
    model = get_peft_model(clone_model(base), MoLExConfig(task_type="SEQ_CLS", init_lora_weights=False))
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 1]))
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    rows = peft_depth.routing_stats(model)["molex"]["default"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3] and rows[0]["num_tokens"] == 12
    assert any(p.grad is not None for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    with model.disable_adapter():
        model.eval()
        base_out = base(**inputs).logits
        # the classifier head is a trainable copy (modules_to_save); disabled, the original head runs
        torch.testing.assert_close(model(**inputs).logits, base_out, rtol=0, atol=0)


def test_qwen3_with_layer_types_routes_only_to_same_type_layers():
    types = ["sliding_attention", "full_attention"] * 2
    base = tiny_qwen3(layer_types=types, use_sliding_window=True, sliding_window=4)
    model = molex(base, molex_layers=[0, 1, 2, 3], routing="token", init_lora_weights=False)
    sharpen_gate(model)
    model(**batch(batch_size=3, seq_len=9, left_pad=0))
    for row in peft_depth.routing_stats(model)["molex"]["default"]:
        fractions = row["expert_fraction"]
        assert all(fractions[j] == 0 for j in range(4) if types[j] != types[row["layer"]])
        assert all(p == 0 for j, p in enumerate(row["mean_prob"]) if types[j] != types[row["layer"]])


@pytest.mark.parametrize("start, expected", [("official", 1 / (1 + math.exp(-0.9))), ("alpha", 0.95)])
def test_learned_alpha_starts_where_the_official_code_starts_it(start, expected):
    """use_learn_weight starts (w_own, w_other) at (0.95, 0.05): α = softmax = 0.711, not 0.95."""
    model = molex(tiny_llama(), molex_layers=[1], alpha=0.95, learn_alpha=True, learned_alpha_start=start)
    alpha = model.base_model.molex_alpha["default"](1)
    assert float(alpha) == pytest.approx(expected, abs=1e-6)


def test_task_presets_are_the_official_scripts_settings():
    sst2 = MoLExConfig.for_task("sst2", task_type="SEQ_CLS")
    assert (sst2.gate_type, sst2.gate_proj_dim, sst2.gate_lr, sst2.gate_weight_decay) == ("cosine", 128, 0.1, 0.1)
    mrpc = MoLExConfig.for_task("MRPC")
    assert mrpc.learn_alpha and mrpc.balance_loss_coef == 0.0
    assert not MoLExConfig.for_task("rte").shared_gate
    assert MoLExConfig.for_task("sst2", gate_proj_dim=64).gate_proj_dim == 64  # overrides win
    with pytest.raises(ValueError, match="`task` must be one of .*'sst2'"):
        MoLExConfig.for_task("squad")


# (gate_type, gate_proj_dim, shared_gate, balance_loss_coef, learn_alpha, alpha, gate_lr, gate_weight_decay), read off
# examples/NLU/roberta_base_<task>.sh of the official code, with its run_glue.py / training_args.py defaults where a
# script sets nothing (linear gate, shared, g_balance 0.01, fixed α 0.5, gate lr 5e-5, gate weight decay 0.0) and a
# balance coefficient of 0 where it omits --use_load_balance.
OFFICIAL_GLUE_SCRIPTS = {
    "cola": ("linear", None, True, 0.01, False, 0.95, 5e-5, 0.0),
    "mnli": ("cosine", 416, True, 0.005, True, None, 5e-5, 0.0),
    "mrpc": ("linear", None, True, 0.0, True, None, 0.1, 0.1),
    "qnli": ("cosine", 96, True, 0.0, True, None, 0.1, 0.1),
    "qqp": ("cosine", 384, True, 0.001, True, None, 0.1, 0.1),
    "rte": ("linear", None, False, 0.001, False, None, 0.1, 0.1),
    "sst2": ("cosine", 128, True, 0.01, False, None, 0.1, 0.1),
    "stsb": ("linear", None, False, 0.001, False, None, 0.1, 0.1),
}


@pytest.mark.parametrize("task", sorted(OFFICIAL_GLUE_SCRIPTS))
def test_every_task_preset_is_its_official_script(task):
    config = MoLExConfig.for_task(task)
    gate_type, proj_dim, shared, balance, learn, alpha, gate_lr, gate_decay = OFFICIAL_GLUE_SCRIPTS[task]
    assert (config.gate_type, config.shared_gate, config.balance_loss_coef, config.learn_alpha) == (
        gate_type,
        shared,
        balance,
        learn,
    )
    if proj_dim is not None:
        assert config.gate_proj_dim == proj_dim
    assert config.alpha == alpha  # None: the encoder default, 0.5 (the scripts' weight_main_init default)
    assert (config.gate_lr, config.gate_weight_decay) == (gate_lr, gate_decay)


@pytest.mark.parametrize("routing", ["token", "sequence", "batch_vote"])
def test_attention_maps_are_one_per_layer_from_its_own_pass(routing):
    """An expert pass runs another layer's attention on this layer's input: it is no layer of the forward, so
    ``output_attentions`` reports each layer's own map once, aligned with the base model's layers (the expert maps
    were recorded too, and shifted every later layer's index)."""
    base = tiny_llama()
    base.config._attn_implementation = "eager"
    reference = clone_model(base).eval()
    # only the last layer mixes and LoRA starts at zero, so every own pass is the base's layer on the base's input
    model = molex(base, molex_layers=[3], expert_layers=[1], routing=routing).eval()
    with torch.no_grad():
        mine = model(**batch(), output_attentions=True, output_hidden_states=True)
        theirs = reference(**batch(), output_attentions=True, output_hidden_states=True)
    assert len(mine.attentions) == len(theirs.attentions) == 4
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 5
    for own, base_map in zip(mine.attentions, theirs.attentions, strict=True):
        torch.testing.assert_close(own, base_map, rtol=0, atol=0)
    assert not torch.equal(mine.logits, theirs.logits)  # the last layer did mix with another layer


def _alpha_gradients(shared_alpha: bool):
    torch.manual_seed(0)
    model = molex(
        tiny_llama(),
        molex_layers=[0, 1, 2],
        learn_alpha=True,
        shared_alpha=shared_alpha,
        routing="token",
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    inputs = batch()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    weights = model.base_model.molex_alpha["default"].weights
    return out.loss.detach(), {key: param.grad.clone() for key, param in weights.items()}


def test_a_shared_gate_learns_one_alpha_for_all_layers_as_the_official_encoder():
    """The official encoder holds one weight_main/weight_other pair when the gate is shared: its gradient is the sum
    of what per-layer pairs, starting at the same value, would get."""
    assert MoLExConfig(learn_alpha=True).shared_alpha is True
    assert MoLExConfig(learn_alpha=True, shared_gate=False).shared_alpha is False
    shared_loss, shared = _alpha_gradients(shared_alpha=True)
    per_layer_loss, per_layer = _alpha_gradients(shared_alpha=False)
    assert list(shared) == ["shared"] and sorted(per_layer) == ["layer0", "layer1", "layer2"]
    assert torch.equal(shared_loss, per_layer_loss)  # the same α everywhere at the start
    total = sum(per_layer.values())
    assert total.abs().max() > 0
    torch.testing.assert_close(shared["shared"], total, rtol=1e-5, atol=1e-7)


def test_shared_alpha_follows_a_gate_changed_after_the_config_was_built():
    config = MoLExConfig(task_type="CAUSAL_LM", learn_alpha=True, molex_layers=[0, 1])
    config.shared_gate = False
    model = get_peft_model(tiny_llama(), config)
    assert sorted(model.base_model.molex_alpha["default"].weights) == ["layer0", "layer1"]
    assert model.peft_config["default"].shared_alpha is False


def test_an_adapter_saved_before_shared_alpha_keeps_one_alpha_per_layer(tmp_path):
    import json

    base = tiny_llama()
    model = molex(clone_model(base), molex_layers=[0, 1], learn_alpha=True, shared_alpha=False)
    with torch.no_grad():
        for i, param in enumerate(model.base_model.molex_alpha["default"].weights.values()):
            param.add_(0.3 * (i + 1))
    inputs = batch()
    expected = logits(model.eval(), inputs)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["shared_alpha"]  # as layout 4 wrote it
    saved["peft_depth_version"] = 4
    config_file.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path)
    assert loaded.peft_config["default"].shared_alpha is False
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


def _layer0_outputs(second_pass: bool, calls: int, train: bool = True):
    """Layer 0's output over ``calls`` forwards of one input, its gate made to pick layer 0 itself."""
    torch.manual_seed(0)
    model = molex(
        tiny_llama(),
        molex_layers=[0],
        alpha=0.5,
        learn_alpha=True,
        routing="token",
        lora_dropout=0.5,
        init_lora_weights=False,
        self_choice_second_pass=second_pass,
    )
    force_expert(model, 0)
    model.train(train)
    inputs = batch()
    outputs = []
    for call in range(calls):
        torch.manual_seed(100 + call)
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        outputs.append(out.hidden_states[1])
    return model, torch.stack(outputs)


def test_a_layer_that_chose_itself_runs_twice_in_training_as_the_official_code():
    """The official code runs the chosen layer as a call of its own: where it is the layer itself, two independent
    dropout draws are mixed (at α = 0.5 the dropout variance halves) and α gets a gradient."""
    _, once = _layer0_outputs(second_pass=False, calls=60)
    model, twice = _layer0_outputs(second_pass=True, calls=60)
    ratio = float(twice.var(dim=0).mean() / once.var(dim=0).mean())
    assert 0.4 < ratio < 0.6  # α² + (1 − α)² = 0.5 of one pass's variance
    assert torch.allclose(twice.mean(dim=0), once.mean(dim=0), atol=3 * float(once.std(dim=0).max()) / 60**0.5)
    twice[-1].sum().backward()
    alpha_weights = next(iter(model.base_model.molex_alpha["default"].weights.values()))
    assert alpha_weights.grad is not None and alpha_weights.grad.abs().max() > 0
    model, once = _layer0_outputs(second_pass=False, calls=1)
    once[-1].sum().backward()
    grad = next(iter(model.base_model.molex_alpha["default"].weights.values())).grad
    assert grad is None or not grad.any()  # one pass: α·u + (1 − α)·u = u does not depend on α


def test_a_second_pass_changes_nothing_in_eval():
    _, once = _layer0_outputs(second_pass=False, calls=1, train=False)
    _, twice = _layer0_outputs(second_pass=True, calls=1, train=False)
    assert torch.equal(once, twice)
    assert MoLExConfig().self_choice_second_pass is True
    assert MoLExConfig(peft_depth_version=4).self_choice_second_pass is False


@pytest.mark.parametrize("routing", ["token", "sequence", "batch_vote"])
def test_the_second_pass_also_runs_when_the_training_forward_makes_a_kv_cache(routing):
    """A causal LM makes a cache in training too unless told not to (a plain loop, the stock Trainer): the second
    pass must not depend on it."""

    def loss_and_alpha_grad(second_pass: bool, **call):
        torch.manual_seed(0)
        model = molex(
            tiny_llama(),
            molex_layers=[0],
            learn_alpha=True,
            routing=routing,
            lora_dropout=0.5,
            init_lora_weights=False,
            self_choice_second_pass=second_pass,
        )
        force_expert(model, 0)
        model.train()
        inputs = batch()
        torch.manual_seed(7)
        loss = model(**inputs, labels=inputs["input_ids"], **call).loss
        loss.backward()
        grad = next(iter(model.base_model.molex_alpha["default"].weights.values())).grad
        return loss.detach(), grad

    cached_loss, cached_grad = loss_and_alpha_grad(True)
    uncached_loss, uncached_grad = loss_and_alpha_grad(True, use_cache=False)
    one_pass_loss, _ = loss_and_alpha_grad(False, use_cache=False)
    assert torch.equal(cached_loss, uncached_loss) and torch.equal(cached_grad, uncached_grad)
    assert cached_grad.abs().max() > 0 and not torch.equal(cached_loss, one_pass_loss)


def test_a_shared_alpha_set_by_hand_is_kept_at_injection():
    """A field set after construction is checked as in the constructor, not replaced by the default it had."""
    for gate_shared, chosen in ((True, False), (False, True)):
        config = MoLExConfig(task_type="CAUSAL_LM", learn_alpha=True, molex_layers=[0, 1], shared_gate=gate_shared)
        config.shared_alpha = chosen
        model = get_peft_model(tiny_llama(), config)
        keys = sorted(model.base_model.molex_alpha["default"].weights)
        assert keys == (["shared"] if chosen else ["layer0", "layer1"])
        assert model.peft_config["default"].shared_alpha is chosen
