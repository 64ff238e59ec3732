"""MoD behaves as a PEFT method and computes the reconstructed ensemble and distillation loss exactly."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from tiny_models import batch, clone_model, tiny_decoder, tiny_llama, tiny_qwen3
from training_checks import assert_same_loss_and_gradients, backward_once, train_steps
from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

import peft_depth
from peft_depth.core.lora_layer import DepthLoraLinear
from peft_depth.tuners.mod import MoDConfig, MoDModel, chunked_distillation_kl

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mod(model, **kwargs):
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return get_peft_model(model, MoDConfig(**kwargs))


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def randomise_router(model, adapter="default", seed=0):
    """Give the router non-trivial weights (it starts at zero = uniform weights)."""
    generator = torch.Generator().manual_seed(seed)
    router = model.base_model.mod_ensemble[adapter].router
    with torch.no_grad():
        for param in router.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def nontrivial(model, adapter="default", gate=0.7, seed=0):
    randomise_router(model, adapter, seed)
    with torch.no_grad():
        model.base_model.mod_ensemble[adapter].gate.fill_(gate)
        for norm in model.base_model.mod_ensemble[adapter].norms.values():
            norm.weight.mul_(1.5)
    return model


def reference_pieces(base, inputs, layers):
    """Block outputs h_l and N_L(h_L) of the plain base model, captured with hooks."""
    captured = {}
    handles = [
        base.model.layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)) for i in layers
    ]
    with torch.no_grad():
        out = base(**inputs, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    return captured, out.hidden_states[-1], out.logits


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_late_layers=1), "num_late_layers"),
        (dict(num_late_layers=0), "num_late_layers"),
        (dict(router_granularity="layer"), "router_granularity"),
        (dict(mix_space="probs"), "mix_space"),
        (dict(router_temperature=0.0), "router_temperature"),
        (dict(distill_temperature=-1.0), "distill_temperature"),
        (dict(distill_fraction=0.0), "distill_fraction"),
        (dict(distill_fraction=1.5), "distill_fraction"),
        (dict(distill_loss_coef=-0.1), "distill_loss_coef"),
        (dict(distill_chunk_size=0), "distill_chunk_size"),
        (dict(gate_init="zero"), "gate_init"),
        (dict(r=-1), "r"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(bias="lora_only"), "bias"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoDConfig(**kwargs)


def test_more_late_layers_than_the_depth_is_an_error():
    with pytest.raises(ValueError, match=r"`num_late_layers` \(5\) is larger than the model's depth \(4"):
        mod(tiny_llama(), num_late_layers=5)
    model = mod(tiny_llama(), num_late_layers=4)  # the whole depth is allowed
    assert model.base_model.mod_ensemble["default"].layer_indices == [0, 1, 2, 3]


def test_output_head_cannot_carry_lora():
    with pytest.raises(ValueError, match="output head"):
        mod(tiny_llama(), target_modules=["q_proj", "lm_head"])


def test_log_probs_mixing_is_refused_with_soft_capping():
    base = tiny_llama()
    base.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        mod(base, mix_space="log_probs")


def test_mod_alone_and_mod_with_lora_in_one_adapter():
    alone = mod(tiny_llama())
    assert not any(isinstance(m, DepthLoraLinear) for m in alone.modules())
    trainable = {n for n, p in alone.named_parameters() if p.requires_grad}
    # 3 norms + router weight/bias + gate, nothing else
    # K = 4 on a 4-block model: norms for blocks 0-2 (block 3 keeps the frozen final norm), router, gate
    assert trainable == {
        "base_model.mod_ensemble.default.norms.layer0.weight",
        "base_model.mod_ensemble.default.norms.layer1.weight",
        "base_model.mod_ensemble.default.norms.layer2.weight",
        "base_model.mod_ensemble.default.router.weight",
        "base_model.mod_ensemble.default.router.bias",
        "base_model.mod_ensemble.default.gate",
    }
    with pytest.warns(UserWarning, match="r=0"):
        config = MoDConfig(r=0, target_modules=ALL_PROJ, task_type="CAUSAL_LM")
    zero_rank = get_peft_model(tiny_llama(), config)
    assert not any(isinstance(m, DepthLoraLinear) for m in zero_rank.modules())
    combined = mod(tiny_llama(), target_modules=ALL_PROJ, r=4)
    lora_layers = [n for n, m in combined.named_modules() if isinstance(m, DepthLoraLinear)]
    assert len(lora_layers) == 4 * 7
    names = {n for n, p in combined.named_parameters() if p.requires_grad}
    assert names and all(("mod_ensemble" in n) or (".lora_" in n) for n in names)
    assert {n for n in names if "mod_ensemble" in n} == {n for n, p in alone.named_parameters() if p.requires_grad}


def test_static_router_has_only_a_vector_and_sequence_router_a_linear():
    static = mod(tiny_llama(), router_granularity="static")
    router = static.base_model.mod_ensemble["default"].router
    assert router.weight is None and router.bias.shape == (4,)
    sequence = mod(tiny_llama(), router_granularity="sequence")
    assert sequence.base_model.mod_ensemble["default"].router.weight.shape == (4, 32)


# ---------------------------------------------------------------- forward = the reconstructed algorithm


@pytest.mark.parametrize("granularity", ["token", "sequence", "static"])
@pytest.mark.parametrize("lora", [False, True])
def test_fresh_adapter_equals_base_exactly(granularity, lora):
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    extra = dict(target_modules=ALL_PROJ) if lora else {}
    model = mod(clone_model(base), router_granularity=granularity, **extra)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


def test_logit_mixing_equals_the_issue_formula_on_per_layer_logits():
    base = tiny_llama()
    inputs = batch()
    model = nontrivial(mod(clone_model(base), num_late_layers=3))
    ensemble = model.base_model.mod_ensemble["default"]
    reference = clone_model(base)
    captured, final_state, final_logits = reference_pieces(reference, inputs, [1, 2])
    head = reference.lm_head.weight
    z_final = final_state @ head.T
    with torch.no_grad():
        weights = torch.softmax(F.linear(final_state, ensemble.router.weight, ensemble.router.bias), dim=-1)
        expected = z_final.clone()
        for k, layer in enumerate([1, 2]):
            z_layer = ensemble.norms[f"layer{layer}"](captured[layer]) @ head.T
            expected += ensemble.gate * weights[..., k : k + 1] * (z_layer - z_final)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    assert (logits(model, inputs) - final_logits).abs().max() > 1e-2


def test_log_prob_mixing_equals_mixing_per_layer_log_probabilities():
    base = tiny_llama()
    inputs = batch()
    model = nontrivial(mod(clone_model(base), mix_space="log_probs", router_temperature=0.5))
    ensemble = model.base_model.mod_ensemble["default"]
    captured, final_state, _ = reference_pieces(clone_model(base), inputs, [0, 1, 2])
    head = base.lm_head.weight
    with torch.no_grad():
        weights = torch.softmax(F.linear(final_state, ensemble.router.weight, ensemble.router.bias) / 0.5, dim=-1)
        log_p = torch.log_softmax(final_state @ head.T, -1)
        expected = log_p.clone()
        for k, layer in enumerate([0, 1, 2]):
            log_q = torch.log_softmax(ensemble.norms[f"layer{layer}"](captured[layer]) @ head.T, -1)
            expected += ensemble.gate * weights[..., k : k + 1] * (log_q - log_p)
        expected = torch.log_softmax(expected, -1)  # a weighted geometric mean, renormalised
    got = torch.log_softmax(logits(model, inputs), -1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # logits_to_keep=1: the head sees only the last position; the mix follows
    last = logits(model, inputs, logits_to_keep=1)
    torch.testing.assert_close(torch.log_softmax(last, -1), expected[:, -1:], rtol=1e-5, atol=1e-5)


def test_static_router_weights_are_the_softmax_of_its_vector():
    model = nontrivial(mod(tiny_llama(), router_granularity="static", router_temperature=2.0))
    model(**batch())
    stats = peft_depth.routing_stats(model)["mod"]["default"]
    expected = torch.softmax(model.base_model.mod_ensemble["default"].router.bias / 2.0, -1)
    assert stats["mean_weight"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert stats["layers"] == [0, 1, 2, 3] and stats["gate"] == pytest.approx(0.7)


def test_logits_to_keep_and_last_hidden_state_carry_the_mix():
    model = nontrivial(mod(tiny_llama(), target_modules=["q_proj"], init_lora_weights=False))
    inputs = batch()
    full = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs, logits_to_keep=2), full[:, -2:], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        state = model(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.base_model.model.lm_head(state), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_routing_is_causal_and_ignores_padding(granularity):
    model = nontrivial(mod(tiny_llama(), router_granularity=granularity))
    inputs = batch(left_pad=3)
    out = logits(model, inputs)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % 128
    changed["input_ids"][0, :3] = torch.tensor([5, 6, 7])  # other padding content, still masked
    out2 = logits(model, changed)
    torch.testing.assert_close(out2[0, 3:-1], out[0, 3:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2[1, :-1], out[1, :-1], rtol=1e-5, atol=1e-6)
    assert peft_depth.routing_stats(model)["mod"]["default"]["num_tokens"] == 11


def test_sequence_router_reads_the_running_mean_of_real_tokens():
    model = nontrivial(mod(tiny_llama(), router_granularity="sequence", num_late_layers=2))
    ensemble = model.base_model.mod_ensemble["default"]
    inputs = batch(left_pad=2)
    with torch.no_grad():
        captured, final_state, _ = reference_pieces(_plain_copy(model), inputs, [2])
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        running = (final_state * mask).cumsum(1) / mask.cumsum(1).clamp(min=1)
        weights = torch.softmax(F.linear(running, ensemble.router.weight, ensemble.router.bias), -1)
        real = inputs["attention_mask"].bool()
    model(**inputs)
    got = peft_depth.routing_stats(model)["mod"]["default"]["mean_weight"]
    assert got == pytest.approx(weights[real].mean(0).tolist(), abs=1e-5)


def _plain_copy(peft_model):
    """The base model without MoD (the backbone MoD alone leaves untouched)."""
    base = peft_model.base_model.model
    fresh = type(base)(base.config)
    fresh.load_state_dict(base.state_dict())
    return fresh.eval()


# ---------------------------------------------------------------- distillation


def naive_distillation(students, teacher, weight, temperature, softcap=None, multiplier=1.0):
    def head(x):
        z = (x @ weight.T) * multiplier
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    p = torch.softmax(head(teacher).detach() / temperature, -1)
    log_q = torch.log_softmax(head(students) / temperature, -1)
    return (p * (torch.log(p) - log_q)).sum(-1).mean(-1)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("softcap, multiplier", [(None, 1.0), (3.0, 1.0), (None, 0.25), (3.0, 4.0)])
def test_chunked_distillation_matches_autograd(chunk_size, softcap, multiplier):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator)
    teacher = torch.randn(9, 8, generator=generator)
    students = torch.randn(3, 9, 8, generator=generator, requires_grad=True)
    reference_students = students.detach().clone().requires_grad_(True)
    got = chunked_distillation_kl(
        students, teacher, weight, temperature=2.0, multiplier=multiplier, softcap=softcap, chunk_size=chunk_size
    )
    expected = naive_distillation(reference_students, teacher, weight, 2.0, softcap, multiplier)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.tensor([1.0, -0.5, 2.0])
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(students.grad, reference_students.grad, rtol=1e-4, atol=1e-6)


def test_distillation_loss_uses_label_positions_and_matches_the_formula():
    base = tiny_llama()
    model = nontrivial(mod(clone_model(base), distill_temperature=2.0, distill_loss_coef=0.3))
    ensemble = model.base_model.mod_ensemble["default"]
    inputs = batch(batch_size=2, seq_len=7, left_pad=0)
    labels = inputs["input_ids"].clone()
    labels[:, :4] = -100  # a prompt: only the completion is learned
    model.eval()
    out = model(**inputs, labels=labels)
    terms = peft_depth.core.raw_aux_losses(model)
    assert set(terms) == {"distill"} and terms["distill"].coefficient == 0.3
    captured, final_state, _ = reference_pieces(clone_model(base), inputs, [0, 1, 2])
    positions = torch.zeros(2, 7, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != -100
    with torch.no_grad():
        students = torch.stack([ensemble.norms[f"layer{i}"](captured[i])[positions] for i in range(3)])
        expected = naive_distillation(students, final_state[positions], base.lm_head.weight, 2.0).sum() * 4.0
    # float32 logits of near-identical distributions: the KL itself is only good to ~1e-4 relative
    torch.testing.assert_close(terms["distill"].value, expected, rtol=3e-4, atol=1e-8)
    assert peft_depth.aux_losses(model)["distill"].item() == pytest.approx(0.3 * terms["distill"].value.item())
    assert peft_depth.routing_stats(model)["mod"]["default"]["distill_positions"] == int(positions.sum()) == 6
    assert out.loss is not None


def test_distillation_fraction_subsamples_positions():
    model = mod(tiny_llama(), distill_fraction=0.25)
    model.train()
    inputs = batch(batch_size=2, seq_len=9, left_pad=1)
    model(**inputs)  # training, no labels: the real tokens are distilled
    assert peft_depth.routing_stats(model)["mod"]["default"]["distill_positions"] == round(0.25 * 17)


def test_an_eval_forward_distils_every_position_and_repeats_exactly():
    # distill_fraction subsamples training forwards only: an evaluation with labels is exact, repeatable and draws
    # nothing from the global RNG (it drew a fresh subset each call, so eval_loss moved between identical evaluations)
    model = mod(tiny_llama(), distill_fraction=0.25)
    full = mod(tiny_llama(), distill_fraction=1.0)
    full.load_state_dict(model.state_dict())
    inputs = batch(batch_size=2, seq_len=9, left_pad=1)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.eval()
    full.eval()
    losses = []
    with torch.no_grad():
        for _ in range(2):
            rng = torch.get_rng_state()
            model(**inputs, labels=labels)
            assert torch.equal(torch.get_rng_state(), rng)
            losses.append(peft_depth.aux_losses(model)["distill"])
        full(**inputs, labels=labels)
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(losses[0], peft_depth.aux_losses(full)["distill"])
    stats = peft_depth.routing_stats(model)["mod"]["default"]
    assert stats["distill_positions"] == peft_depth.routing_stats(full)["mod"]["default"]["distill_positions"] == 16


def test_distillation_runs_in_training_or_with_labels_only():
    model = mod(tiny_llama())
    inputs = batch()
    model.eval()
    with torch.no_grad():
        model(**inputs)
    assert peft_depth.aux_losses(model) == {}
    assert peft_depth.routing_stats(model)["mod"]["default"]["distill_kl"] is None
    with torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])
    assert set(peft_depth.aux_losses(model)) == {"distill"}
    switched_off = mod(tiny_llama(), distill_loss_coef=0.0)
    switched_off.train()
    switched_off(**inputs)
    assert peft_depth.aux_losses(switched_off) == {}


def test_fresh_gate_gets_gradient_and_router_after_one_step():
    model = mod(tiny_llama(), target_modules=["q_proj"])
    model.train()
    inputs = batch(batch_size=2, seq_len=8)
    ensemble = model.base_model.mod_ensemble["default"]
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()  # LM loss only: the path through the mix
    assert ensemble.gate.grad.abs().item() > 0
    assert ensemble.router.weight.grad.abs().max() == 0  # g = 0 blocks it at step 0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert ensemble.router.weight.grad.abs().max() > 0


def test_routing_stats_report_the_gate_of_their_forward_after_an_optimizer_step():
    """The record keeps the gate's value, not the parameter (which the step moves, and FSDP2 frees once resharded)."""
    model = mod(tiny_llama())
    model.train()
    inputs = batch(batch_size=2, seq_len=8)
    ensemble = model.base_model.mod_ensemble["default"]
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    before = ensemble.gate.detach().item()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert ensemble.gate.detach().item() != before
    assert peft_depth.routing_stats(model)["mod"]["default"]["gate"] == before


# ---------------------------------------------------------------- training


def test_training_moves_only_adapter_parameters_and_loss_decreases():
    model = mod(tiny_llama(), target_modules=ALL_PROJ, distill_loss_coef=0.1, lora_dropout=0.0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(batch_size=4, seq_len=12)
    losses = [step["lm"] for step in train_steps(model, optimizer, inputs, steps=15)]
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        is_adapter = "mod_ensemble" in name or ".lora_" in name
        assert moved == is_adapter, name  # the final norm and the LM head (teacher) stay frozen


def test_mod_alone_training_reduces_the_loss():
    model = mod(tiny_llama(), distill_loss_coef=0.1)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs = batch(batch_size=4, seq_len=12)
    losses = []
    for _ in range(20):
        out = model(**inputs, labels=inputs["input_ids"])
        (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.02
    assert peft_depth.routing_stats(model)["mod"]["default"]["gate"] != 0


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    def run(checkpointing):
        torch.manual_seed(0)
        model = nontrivial(mod(tiny_llama(), target_modules=ALL_PROJ, init_lora_weights=False, lora_dropout=0.0))
        return backward_once(model, checkpointing)

    run_a, run_b = run(False), run(True)
    assert_same_loss_and_gradients(run_a, run_b)
    stats_a, stats_b = run_a[2]["mod"]["default"], run_b[2]["mod"]["default"]
    assert stats_a["num_tokens"] == stats_b["num_tokens"] == 12
    assert stats_a["distill_kl"] == pytest.approx(stats_b["distill_kl"])


# ---------------------------------------------------------------- PEFT behaviour


@pytest.mark.parametrize("granularity", ["token", "static"])
def test_save_load_round_trip_is_exact(tmp_path, granularity):
    base = tiny_llama()
    model = nontrivial(
        mod(
            clone_model(base),
            router_granularity=granularity,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        )
    )
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all("mod_ensemble" in key or ".lora_" in key for key in saved), list(saved)
    assert "base_model.mod_ensemble.gate" in saved and "base_model.mod_ensemble.norms.layer0.weight" in saved
    assert not any(".default" in key for key in saved)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path)
    assert isinstance(loaded.base_model, MoDModel)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    trainable = PeftModel.from_pretrained(clone_model(base), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_load_with_low_cpu_mem_usage(tmp_path):
    base = tiny_llama()
    model = nontrivial(mod(clone_model(base), target_modules=["q_proj"], init_lora_weights=False))
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("lora", [False, True], ids=["mod_alone", "with_lora"])
def test_disable_adapter_gives_base_outputs(lora):
    """Also for MoD alone, whose weights all live on the tuner (a parameter-free marker layer stands for them)."""
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    kwargs = dict(target_modules=ALL_PROJ, init_lora_weights=False) if lora else {}
    model = nontrivial(mod(clone_model(base), **kwargs))
    assert model.get_model_status().available_adapters == ["default"]
    model.train()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        assert peft_depth.routing_stats(model) == {} and peft_depth.aux_losses(model) == {}
        assert not any(p.requires_grad for p in model.base_model.mod_ensemble.parameters())
    assert (logits(model, inputs) - expected).abs().max() > 1e-3
    assert all(p.requires_grad for p in model.base_model.mod_ensemble.parameters())
    assert "state_marker" not in str(dict(model.state_dict()).keys())
    unloaded = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, inputs), expected, rtol=0, atol=0)


def test_multiple_adapters_set_delete_and_combine():
    base = tiny_llama()
    inputs = batch()
    model = nontrivial(mod(clone_model(base), num_late_layers=2))
    model.add_adapter("other", MoDConfig(num_late_layers=3, target_modules=["q_proj"], init_lora_weights=False))
    nontrivial(model, "other", gate=0.4, seed=1)
    out_default = logits(model, inputs)
    model.set_adapter("other")
    out_other = logits(model, inputs)
    assert (out_default - out_other).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    # both active: both ensembles run and report
    model.base_model.set_adapter(["default", "other"])
    model.train()
    model(**inputs)
    assert set(peft_depth.aux_losses(model)) == {"distill.default", "distill.other"}
    assert set(peft_depth.routing_stats(model)["mod"]) == {"default", "other"}
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert "other" not in model.base_model.mod_ensemble
    torch.testing.assert_close(logits(model, inputs), out_default, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(router_granularity="sequence"),
        dict(router_granularity="static"),
        dict(mix_space="log_probs", target_modules=["q_proj"], init_lora_weights=False),
    ],
)
def test_generate_with_cache_equals_without(kwargs):
    model = nontrivial(mod(tiny_llama(), **kwargs))
    prompt = batch(batch_size=2, seq_len=5, left_pad=2)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**prompt, use_cache=True, **gen)
    without = model.generate(**prompt, use_cache=False, **gen)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("decoding", [dict(num_beams=3), dict(assistant=True)], ids=["beam", "assisted"])
def test_generation_with_beams_or_a_draft_model_equals_no_cache(granularity, decoding):
    """The sequence router's running mean lives on the cache and follows beam reordering and draft cropping."""
    model = nontrivial(mod(tiny_llama(), router_granularity=granularity))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, **decoding)
    if gen.pop("assistant", False):
        prompt = batch(batch_size=1, seq_len=5, left_pad=0)
        with_cache = model.generate(**prompt, use_cache=True, assistant_model=tiny_llama(seed=5), **gen)
    else:
        prompt = batch(batch_size=2, seq_len=5, left_pad=2)
        with_cache = model.generate(**prompt, use_cache=True, **gen)
    assert torch.equal(with_cache, model.generate(**prompt, use_cache=False, **gen))


def test_sequence_router_continues_a_cache_created_inside_the_first_forward():
    model = nontrivial(mod(tiny_llama(), router_granularity="sequence")).eval()
    inputs = batch(left_pad=0)
    full = logits(model, inputs)
    with torch.no_grad():
        first = model(input_ids=inputs["input_ids"][:, :-1], use_cache=True)  # no cache passed in: one is created
        last = model(input_ids=inputs["input_ids"][:, -1:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(last.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_sequence_router_refuses_a_cache_it_did_not_see():
    model = nontrivial(mod(tiny_llama(), router_granularity="sequence"))
    inputs = batch(left_pad=0)
    with torch.no_grad():
        past = model(**inputs, use_cache=True).past_key_values
        other = mod(tiny_llama(), router_granularity="sequence")
        with pytest.raises(ValueError, match="router_granularity"):
            other(input_ids=inputs["input_ids"][:, :1], past_key_values=past, use_cache=True)


def test_merge_and_unload_is_refused_and_unload_restores_the_base():
    base = tiny_llama()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = nontrivial(mod(clone_model(base), target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="cannot be merged.*not a weight delta"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not any(isinstance(m, DepthLoraLinear) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, inputs), expected, rtol=0, atol=0)


def _hook_counts(model):
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    return {
        (name, kind): len(getattr(m, kind)) for name, m in model.named_modules() for kind in kinds if getattr(m, kind)
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        dict(router_granularity="sequence", mix_space="log_probs"),
    ],
    ids=["mod_alone", "with_lora", "sequence_log_probs"],
)
def test_unload_gives_back_the_base_model_exactly_as_it_was(kwargs):
    """What a failed transactional load relies on: unload() leaves weights, config, hooks and modules as they were."""
    base = tiny_llama()
    user_hook = base.model.norm.register_forward_hook(lambda *args: None)  # the caller's own hooks stay
    modules = [(name, type(module), id(module)) for name, module in base.named_modules()]
    state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    config = base.config.to_dict()
    hooks = _hook_counts(base)
    attributes = set(base.__dict__)
    inputs = batch(batch_size=2, seq_len=5, left_pad=2)
    expected = logits(base, inputs)

    model = nontrivial(mod(base, **kwargs))
    model(**inputs, labels=inputs["input_ids"])
    model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    unloaded = model.unload()

    assert unloaded is base
    assert [(name, type(module), id(module)) for name, module in base.named_modules()] == modules
    assert _hook_counts(base) == hooks
    assert base.state_dict().keys() == state.keys()
    assert all(torch.equal(base.state_dict()[name], tensor) for name, tensor in state.items())
    assert base.config.to_dict() == config
    assert set(base.__dict__) == attributes
    assert peft_depth.routing_stats(model) == {} and _hook_counts(base) == hooks  # reading stats hooks nothing
    torch.testing.assert_close(logits(base, inputs), expected, rtol=0, atol=0)
    user_hook.remove()


def test_print_trainable_parameters_counts_norms_router_gate_and_lora():
    model = mod(tiny_llama(), target_modules=["q_proj"], r=2)
    expected = sum(p.numel() for n, p in model.named_parameters() if "mod_ensemble" in n or ".lora_" in n)
    # 3 norms of 32 + router 4x32 + 4 + gate 1, and LoRA q_proj 4 layers x (2x32 + 32x2)
    assert expected == 3 * 32 + 4 * 32 + 4 + 1 + 4 * (2 * 32 + 32 * 2)
    assert model.get_nb_trainable_parameters()[0] == expected


def test_model_in_eval_keeps_new_modules_in_eval():
    model = mod(tiny_llama())  # tiny_llama() is in eval mode
    assert not model.base_model.mod_ensemble.training


# ---------------------------------------------------------------- other architectures and dtypes


def test_qwen3_fresh_equals_base_and_trains():
    base = tiny_qwen3()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = mod(clone_model(base), target_modules=ALL_PROJ, num_late_layers=3)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    assert model.base_model.mod_ensemble["default"].gate.grad is not None


def test_bf16_model_trains_with_fp32_adapter_weights():
    model = mod(tiny_llama().to(torch.bfloat16), target_modules=["q_proj"])
    assert model.base_model.mod_ensemble["default"].gate.dtype == torch.float32
    model.train()
    inputs = batch()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    loss = out.loss + sum(peft_depth.aux_losses(model).values())
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.base_model.mod_ensemble["default"].norms["layer0"].weight.grad).all()


def test_trl_fused_lm_head_sees_the_mix_and_log_probs_is_refused():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    base = tiny_llama()
    inputs = batch(left_pad=0)
    labels = inputs["input_ids"].clone()
    plain = nontrivial(mod(clone_model(base), target_modules=["q_proj"], init_lora_weights=False))
    expected = plain(**inputs, labels=labels).loss
    fused_base = clone_model(base)
    trl_utils.add_fused_lm_head(fused_base)
    fused = mod(fused_base, target_modules=["q_proj"], init_lora_weights=False)
    fused.load_state_dict(plain.state_dict())
    out = fused(**inputs, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert "distill" in peft_depth.aux_losses(fused)
    log_probs_base = clone_model(base)
    trl_utils.add_fused_lm_head(log_probs_base)
    refused = mod(log_probs_base, mix_space="log_probs")
    with pytest.raises(ValueError, match="fused LM head"):
        refused(**inputs, labels=labels, fused_lm_head=True)


def test_gemma2_soft_cap_applies_after_mixing():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=2.0,
        pad_token_id=0,
    )
    base = Gemma2ForCausalLM(config).eval()
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = mod(clone_model(base), num_late_layers=3)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    nontrivial(model)
    with torch.no_grad():
        state = model(**inputs, output_hidden_states=True).hidden_states[-1]  # the mixed normalised state
        raw = model.base_model.model.lm_head(state)
    torch.testing.assert_close(logits(model, inputs), 2.0 * torch.tanh(raw / 2.0), rtol=1e-5, atol=1e-6)
    assert logits(model, inputs).abs().max() <= 2.0
    model.train()
    model(**inputs)
    assert torch.isfinite(peft_depth.aux_losses(model)["distill"])


LOGIT_SCALED_FAMILIES = {
    # family: (builder, the factor its causal-LM forward applies to the head's output)
    "cohere": (lambda: tiny_decoder(CohereForCausalLM, CohereConfig, logit_scale=0.25), 0.25),
    "granite": (lambda: tiny_decoder(GraniteForCausalLM, GraniteConfig, logits_scaling=4.0), 0.25),
}


@pytest.mark.parametrize("family", list(LOGIT_SCALED_FAMILIES))
def test_distillation_uses_the_familys_own_logit_scaling(family):
    """Cohere multiplies its head's output by `logit_scale` and Granite divides it by `logits_scaling`: the teacher
    and students are the distributions the model itself would give, so the KL uses the same scaling (it was computed
    from the unscaled head, about 13x too large at these scales)."""
    build, multiplier = LOGIT_SCALED_FAMILIES[family]
    base = build()
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)  # peaked distributions: unscaled and scaled KLs differ clearly
    inputs = batch(batch_size=2, seq_len=7, left_pad=0)
    with torch.no_grad():
        plain = base(**inputs)
    model = nontrivial(mod(clone_model(base), num_late_layers=3))
    ensemble = model.base_model.mod_ensemble["default"]
    model.eval()
    model(**inputs, labels=inputs["input_ids"])
    value = peft_depth.core.raw_aux_losses(model)["distill"].value
    captured, final_state, _ = reference_pieces(clone_model(base), inputs, [1, 2, 3])
    with torch.no_grad():
        # the family's own last-layer logits are the head's output times its factor
        torch.testing.assert_close(
            final_state @ base.lm_head.weight.T * multiplier, plain.logits, rtol=1e-5, atol=1e-5
        )
        positions = torch.zeros(2, 7, dtype=torch.bool)
        positions[:, :-1] = True
        students = torch.stack([ensemble.norms[f"layer{i}"](captured[i])[positions] for i in (1, 2)])
        expected = naive_distillation(students, final_state[positions], base.lm_head.weight, 1.0, None, multiplier)
        unscaled = naive_distillation(students, final_state[positions], base.lm_head.weight, 1.0)
    torch.testing.assert_close(value, expected.sum(), rtol=3e-4, atol=1e-8)
    assert not torch.allclose(value, unscaled.sum(), rtol=0.1)


def test_an_unknown_logit_scaling_is_refused_before_injection():
    base = tiny_llama()
    base.config.logits_scaling = 2.0  # a family MoD does not know scales its logits
    with pytest.raises(ValueError, match="sets logits_scaling, a scaling of its output logits"):
        mod(base)


def test_a_head_that_reads_a_projection_of_the_final_norm_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64
    )
    with pytest.raises(ValueError, match=r"final norm's width \(32\), but the output head reads 16 features"):
        mod(OPTForCausalLM(config))
