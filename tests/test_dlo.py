"""DLO expands depth consistently, skips real work per token, trains its routers, and behaves as a PEFT method."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import batch, tiny_decoder, tiny_llama, tiny_qwen3
from training_checks import assert_same_loss_and_gradients, backward_once, train_steps
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import peft_depth
from peft_depth.tuners.dlo import DLOConfig, DLOModel, SkipMLP, expansion_plan
from peft_depth.tuners.dlo.selection import select_top_fraction


def clone_model(model):
    """Same weights, own config: DLO changes `config.num_hidden_layers`, which a shared config would leak."""
    fresh = type(model)(copy.deepcopy(model.config))
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def dlo(model, **kwargs):
    """DLO with the paper's routing of every layer unless a test says otherwise (the default routes only the new
    layers while the original layers are frozen: ``test_default_routing_*``)."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("routed_layers", "all")
    return get_peft_model(model, DLOConfig(**kwargs))


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def tuner(model) -> DLOModel:
    return model.base_model


def stack(model):
    return model.base_model.model.model.layers


def randomise_routers(model, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in tuner(model).dlo_routers["default"].values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * scale)


def perturb_new_layers(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in tuner(model).dlo_new_layers["default"].values():
            for param in layer.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(expansion="sideways"), "expansion"),
        (dict(expansion=[]), "expansion"),
        (dict(expansion=[1, -2]), r"expansion\[1\]"),
        (dict(expand_every=0), "expand_every"),
        (dict(stack_range=[3, 1]), "stack_range"),
        (dict(init="xavier"), "init"),
        (dict(routed_layers="some"), "routed_layers"),
        (dict(skip_mode="attention"), "skip_mode"),
        (dict(capacity=0.0), "capacity"),
        (dict(capacity=1.5), "capacity"),
        (dict(capacity_annealing_steps=-1), "capacity_annealing_steps"),
        (dict(loss_type="mse"), "loss_type"),
        (dict(router_loss_coef=-1.0), "router_loss_coef"),
        (dict(scale_gap=-0.1), "scale_gap"),
        (dict(new_layer_training="partial"), "new_layer_training"),
        (dict(new_layer_training="lora", r=0), "r"),
        (dict(inference_selection="random"), "inference_selection"),
        (dict(inference_capacity=0.0), "inference_capacity"),
        (dict(r=-1), "r"),
        (dict(bias="lora_only"), "bias"),
        (dict(zero_out_modules="o_proj"), "zero_out_modules"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DLOConfig(**kwargs)


def test_bad_values_that_need_the_model_raise_before_anything_is_built():
    with pytest.raises(ValueError, match="outside the model's 8 layers"):
        dlo(tiny_llama(num_layers=8), expansion=[2, 8])
    with pytest.raises(ValueError, match="stack_range"):
        dlo(tiny_llama(num_layers=8), expansion="stack", stack_range=[4, 9])
    with pytest.raises(ValueError, match="adds no layer"):
        dlo(tiny_llama(num_layers=4), expand_every=5)
    with pytest.raises(ValueError, match="zero_out_modules"):
        dlo(tiny_llama(num_layers=4), zero_out_modules=["no_such_proj"])


def test_expansion_plans():
    assert expansion_plan("interleave", 8, 4, None) == [(3, 3), (7, 7)]
    assert len(expansion_plan("interleave", 30, 4, None)) == 7  # 30 -> 37, as in the issue
    assert len(expansion_plan("interleave", 32, 4, None)) == 8  # 32 -> 40, the paper
    assert expansion_plan("stack", 8, 4, None) == [(7, 6), (7, 7)]  # the top 8 // 4 layers repeated
    assert expansion_plan("stack", 8, 4, [2, 5]) == [(4, 2), (4, 3), (4, 4)]
    assert expansion_plan([5, 1, 1], 8, 4, None) == [(1, 1), (1, 1), (5, 5)]


# ---------------------------------------------------------------- the expanded model is a consistent transformers model


def test_interleave_8_to_10_with_renumbered_indices_and_config():
    model = dlo(tiny_llama(num_layers=8))
    config = model.base_model.model.config
    assert config.num_hidden_layers == 10 and len(stack(model)) == 10
    assert [block.self_attn.layer_idx for block in stack(model)] == list(range(10))
    assert sorted(tuner(model).dlo_new_layers["default"].keys()) == ["new4", "new9"]
    assert len(tuner(model).dlo_routers["default"]) == 10  # routed_layers='all', the paper's
    # the registered ModuleList (state-dict keys, parameters) is untouched
    registered = model.base_model.model.model._modules["layers"]
    assert len(registered) == 8
    assert not any(".layers.8." in n or ".layers.9." in n for n, _ in model.named_parameters())
    # output_hidden_states reports every layer that ran, the new ones included (the zero-out copy is an identity)
    hidden = model(**batch(), output_hidden_states=True).hidden_states
    assert len(hidden) == 11 and torch.equal(hidden[5], hidden[4])
    with model.disable_adapter():
        assert config.num_hidden_layers == 8 and stack(model) is registered
        assert [block.self_attn.layer_idx for block in stack(model)] == list(range(8))
        assert len(model(**batch(), output_hidden_states=True).hidden_states) == 9
    assert config.num_hidden_layers == 10


def test_qwen3_layer_types_follow_the_sources():
    base = tiny_qwen3(num_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4)
    model = dlo(base, expansion=[0, 3])
    config = model.base_model.model.config
    assert config.num_hidden_layers == 6
    assert (
        config.layer_types
        == ["sliding_attention"] * 2 + ["full_attention", "sliding_attention"] + ["full_attention"] * 2
    )
    assert [b.self_attn.layer_idx for b in stack(model)] == list(range(6))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3])
@pytest.mark.parametrize("routed_layers", ["all", "new", "none"])
def test_fresh_zero_out_adapter_equals_base_exactly(factory, routed_layers):
    base = factory(num_layers=8)
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = dlo(clone_model(base), routed_layers=routed_layers)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


def test_initialisations():
    base = tiny_llama(num_layers=8)
    originals = base.model.layers
    zero = dlo(clone_model(base))
    new4 = tuner(zero).dlo_new_layers["default"]["new4"]
    assert torch.count_nonzero(new4.self_attn.o_proj.weight) == 0
    assert torch.count_nonzero(new4.mlp.down_proj.weight) == 0
    assert torch.equal(new4.self_attn.q_proj.weight, originals[3].self_attn.q_proj.weight)
    assert new4.self_attn.q_proj.weight.data_ptr() != originals[3].self_attn.q_proj.weight.data_ptr()  # a copy
    copied = tuner(dlo(clone_model(base), init="copy")).dlo_new_layers["default"]["new4"]
    assert torch.equal(copied.mlp.down_proj.weight, originals[3].mlp.down_proj.weight)
    mean = tuner(dlo(clone_model(base), init="mean")).dlo_new_layers["default"]["new9"]
    expected = (originals[7].mlp.up_proj.weight + originals[6].mlp.up_proj.weight) / 2
    assert torch.equal(mean.mlp.up_proj.weight, expected)
    random = tuner(dlo(clone_model(base), init="random")).dlo_new_layers["default"]["new4"]
    assert not torch.equal(random.self_attn.q_proj.weight, originals[3].self_attn.q_proj.weight)
    assert random.self_attn.q_proj.weight.std() > 0
    # plain copies change the function; zero-out does not
    inputs = batch()
    assert (logits(dlo(clone_model(base), init="copy"), inputs) - logits(base, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen3])
def test_generate_with_cache_equals_without_while_skipping(factory):
    model = dlo(factory(num_layers=8))
    randomise_routers(model)
    perturb_new_layers(model)
    prompt = batch(batch_size=2, seq_len=5, left_pad=2)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**prompt, use_cache=True, **kwargs)
    without = model.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    stats = peft_depth.routing_stats(model)["dlo"]["default"]
    assert 0 < stats["executed_fraction"] < 1  # tokens really were skipped


# ---------------------------------------------------------------- inference skipping


def test_inference_runs_the_mlp_on_the_selected_tokens_only():
    model = dlo(tiny_llama(num_layers=8))
    randomise_routers(model)
    perturb_new_layers(model)
    model.eval()
    seen: dict[int, int] = {}
    handles = []
    for position, block in enumerate(stack(model)):
        mlp = block._shadows["mlp"].inner
        handles.append(
            mlp.register_forward_hook(lambda m, a, o, p=position: seen.__setitem__(p, a[0].reshape(-1, 32).shape[0]))
        )
    inputs = batch(batch_size=2, seq_len=9, left_pad=0)
    out = logits(model, inputs)
    for handle in handles:
        handle.remove()
    rows = {row["layer"]: row for row in peft_depth.routing_stats(model)["dlo"]["default"]["layers"]}
    total = 18
    assert sum(seen.values()) < 10 * total  # less MLP work overall
    for position, tokens in seen.items():
        assert tokens == round(rows[position]["executed_fraction"] * total)  # exactly the selected tokens ran
    assert any(tokens < total for tokens in seen.values())

    # The gathered computation equals the dense reference h' + 1[s>=0.5]·ŝ·MLP(h') for every token.
    def dense(self, x):
        plan = self.plan
        if plan is None:
            return self.inner(x)
        gate = plan.selected.to(x.dtype) * plan.scale.to(x.dtype)
        return self.inner(x) * gate.view(*x.shape[:-1], 1)

    original = SkipMLP.forward
    SkipMLP.forward = dense
    try:
        reference = logits(model, inputs)
    finally:
        SkipMLP.forward = original
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_inference_threshold_is_inclusive_and_capacity_mode_fixes_the_budget():
    model = dlo(tiny_llama(num_layers=8))
    model.eval()
    logits(model, batch())
    rows = peft_depth.routing_stats(model)["dlo"]["default"]["layers"]
    assert all(row["executed_fraction"] == 1.0 for row in rows)  # s = 0.5 exactly runs (official s > 0.5 would not)
    fixed = dlo(tiny_llama(num_layers=8), inference_selection="capacity", inference_capacity=0.5)
    randomise_routers(fixed)
    fixed.eval()
    logits(fixed, batch(left_pad=0, seq_len=8))
    rows = peft_depth.routing_stats(fixed)["dlo"]["default"]["layers"]
    assert all(row["executed_fraction"] == 0.5 for row in rows)


# ---------------------------------------------------------------- training: capacity, labels, loss, annealing


def test_training_selects_top_capacity_of_real_tokens_batch_wide():
    model = dlo(tiny_llama(num_layers=8), capacity=0.5, capacity_annealing_steps=0, loss_type="cos")
    randomise_routers(model)
    model.train()
    inputs = batch(batch_size=3, seq_len=7, left_pad=3)
    model(**inputs)
    real = inputs["attention_mask"].reshape(-1).bool()
    for block in tuner(model)._dlo["blocks"]:
        record = block.last_record
        assert int(record.selected.sum()) == math.ceil(0.5 * int(real.sum()))
        assert not bool((record.selected & ~real).any())  # padding never runs
        chosen = torch.sigmoid(record.logits)[record.selected]
        rest = torch.sigmoid(record.logits)[real & ~record.selected]
        assert chosen.min() >= rest.max()  # the top scores, over the whole batch


def test_capacity_annealing_follows_the_step():
    config = DLOConfig(capacity=0.9, capacity_annealing_steps=1000)
    assert [config.capacity_at(s) for s in (0, 500, 1000, 5000)] == pytest.approx([1.0, 0.95, 0.9, 0.9])
    model = dlo(tiny_llama(num_layers=8), capacity=0.5, capacity_annealing_steps=10, loss_type="cos")
    randomise_routers(model)  # distinct scores: a zero-initialised router ties every token, and ties all run
    model.train()
    inputs = batch(batch_size=2, seq_len=10, left_pad=0)
    model(**inputs)
    assert peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] == 1.0
    tuner(model).set_training_step(5)
    assert tuner(model).dlo_step == 5
    model(**inputs)
    assert peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] == pytest.approx(0.75)
    tuner(model).set_dlo_step(10)
    model(**inputs)
    assert peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="step"):
        tuner(model).set_dlo_step(-1)


def _capture_mlp_io(model):
    """Record h' (input of the pre-MLP norm) and the MLP output for every routed layer."""
    captured, handles = {}, []
    for position, block in enumerate(stack(model)):
        norm = block._shadows["post_attention_layernorm"].inner
        mlp = block._shadows["mlp"].inner
        handles.append(
            norm.register_forward_hook(lambda m, a, o, p=position: captured.setdefault(p, {}).update(h=a[0]))
        )
        handles.append(mlp.register_forward_hook(lambda m, a, o, p=position: captured[p].update(out=o)))
    return captured, handles


def _reference_bce(logits_, labels, valid):
    return F.binary_cross_entropy_with_logits(logits_[valid], labels[valid].float())


def test_cos_labels_and_bce_per_layer():
    model = dlo(
        tiny_llama(num_layers=8), capacity=0.5, capacity_annealing_steps=0, loss_type="cos", router_loss_coef=0.3
    )
    randomise_routers(model, scale=0.5)
    perturb_new_layers(model)
    model.train()
    captured, handles = _capture_mlp_io(model)
    inputs = batch(batch_size=2, seq_len=8, left_pad=2)
    model(**inputs)
    for handle in handles:
        handle.remove()
    valid = inputs["attention_mask"].reshape(-1).bool()
    expected = []
    for block in tuner(model)._dlo["blocks"]:
        record = block.last_record
        h = captured[block.position]["h"].reshape(-1, 32)
        cos = F.cosine_similarity(h, h + captured[block.position]["out"].reshape(-1, 32), dim=-1)
        torch.testing.assert_close(record.cos, cos, rtol=1e-5, atol=1e-6)
        k = math.ceil(0.5 * int(valid.sum()))
        lowest = torch.where(valid, cos, torch.full_like(cos, float("inf"))).topk(k, largest=False).indices
        labels = torch.zeros_like(valid)
        labels[lowest] = True
        expected.append(_reference_bce(record.logits, labels, valid))
    raw = peft_depth.core.raw_aux_losses(model)["router"]
    assert raw.coefficient == 0.3
    torch.testing.assert_close(raw.value, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(peft_depth.aux_losses(model)["router"], 0.3 * raw.value)


def test_cos_global_ranks_all_layers_together_and_sets_capacities():
    model = dlo(tiny_llama(num_layers=8), capacity=0.6, capacity_annealing_steps=0, min_capacity=0.01)
    randomise_routers(model, scale=0.5)
    perturb_new_layers(model)
    model.train()
    inputs = batch(batch_size=2, seq_len=8, left_pad=2)
    model(**inputs)
    valid = inputs["attention_mask"].reshape(-1).bool()
    records = [b.last_record for b in tuner(model)._dlo["blocks"]]
    cos = torch.cat([r.cos for r in records])
    all_valid = valid.repeat(len(records))
    k = math.ceil(0.6 * int(all_valid.sum()))
    lowest = torch.where(all_valid, cos, torch.full_like(cos, float("inf"))).topk(k, largest=False).indices
    labels = torch.zeros_like(all_valid)
    labels[lowest] = True
    per_layer = labels.view(len(records), -1)
    expected = torch.stack([_reference_bce(r.logits, per_layer[i], valid) for i, r in enumerate(records)]).mean()
    torch.testing.assert_close(peft_depth.aux_losses(model)["router"], expected, rtol=1e-5, atol=1e-6)
    capacities = tuner(model).dlo_layer_capacities()
    shares = [max(0.01, float(per_layer[i][valid].float().mean())) for i in range(len(records))]
    assert [capacities[p] for p in sorted(capacities)] == pytest.approx(shares)
    assert len(set(round(c, 6) for c in capacities.values())) > 1  # layers really get different capacities
    model(**inputs)  # the next forward uses them
    for block in tuner(model)._dlo["blocks"]:
        assert block.last_record.capacity == pytest.approx(capacities[block.position])
        assert int(block.last_record.selected.sum()) == math.ceil(capacities[block.position] * int(valid.sum()) - 1e-9)


def test_selection_takes_the_top_fraction_of_real_tokens():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(257, generator=generator)
    valid = torch.rand(257, generator=generator) > 0.2
    for fraction in (0.1, 0.5, 0.9, 1.0):
        k = math.ceil(fraction * int(valid.sum()))
        expected = torch.zeros_like(valid).index_fill(0, scores.masked_fill(~valid, -1e9).topk(k).indices, True)
        for keep_ties in (True, False):  # distinct scores: both rules take the same k entries
            chosen = select_top_fraction(scores, valid, fraction, keep_ties=keep_ties)
            assert int(chosen.sum()) == k and not bool((chosen & ~valid).any())
            assert torch.equal(chosen, expected)


def test_selection_keeps_every_tie_at_the_threshold_as_the_official_code():
    # official: threshold = k-th largest score, selected = real & (score >= threshold)
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1, 0.5])
    valid = torch.tensor([True, True, True, True, True, False])
    chosen = select_top_fraction(scores, valid, 0.4)  # k = 2: 0.9 and the three real 0.5s, never the padding
    assert chosen.tolist() == [True, True, True, True, False, False]
    # all tied (a zero-initialised router): every real token, whatever the fraction
    tied = select_top_fraction(torch.full((10,), 0.5), torch.tensor([False] + [True] * 9), 0.34)
    assert tied.tolist() == [False] + [True] * 9
    # segments ranked jointly: the tie spans segments
    joint = select_top_fraction(torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]]), None, 0.5)
    assert joint.tolist() == [[False, True, True], [True, False, True]]
    # keep_ties=False (the fixed eval budget): exactly k, ties to the earliest entries, segment by segment
    exact = select_top_fraction(torch.full((10,), 0.5), torch.tensor([False] + [True] * 9), 0.34, keep_ties=False)
    assert exact.nonzero().flatten().tolist() == [1, 2, 3, 4]
    joint = select_top_fraction(torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]]), None, 0.5, keep_ties=False)
    assert joint.tolist() == [[False, True, True], [True, False, False]]


def test_zero_initialised_routers_execute_every_token_in_training_at_capacity_below_one():
    # The official rule keeps every token tied with the k-th score: a fresh (zero) router scores every token 0.5, so
    # at capacity 0.9 every real token runs every routed layer (keeping k by index skipped the batch's last tokens).
    model = dlo(tiny_llama(num_layers=8), capacity=0.9, capacity_annealing_steps=0, loss_type="cos")
    model.train()
    inputs = batch(batch_size=3, seq_len=9, left_pad=2)
    model(**inputs)
    real = inputs["attention_mask"].reshape(-1).bool()
    stats = peft_depth.routing_stats(model)["dlo"]["default"]
    assert stats["executed_fraction"] == 1.0
    assert all(row["executed_fraction"] == 1.0 and row["capacity"] == 0.9 for row in stats["layers"])
    for block in tuner(model)._dlo["blocks"]:
        assert torch.equal(block.last_record.selected, real)


def test_training_moves_only_dlo_parameters_and_losses_decrease():
    model = dlo(tiny_llama(num_layers=8), capacity=0.75, capacity_annealing_steps=4, lora_dropout=0.0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dlo_new_layers.default." in n or ".dlo_routers.default." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(batch_size=4, seq_len=12, left_pad=2)
    history = train_steps(model, optimizer, inputs, steps=20, before_step=tuner(model).set_dlo_step)
    lm, router = [step["lm"] for step in history], [step["router"] for step in history]
    assert lm[-1] < lm[0] - 0.1
    assert router[-1] < router[0] - 0.02  # the routers learn their labels
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trainable)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "dlo_routers" in n)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    def run(checkpointing):
        model = dlo(tiny_llama(num_layers=8), capacity=0.6, capacity_annealing_steps=0)
        randomise_routers(model, scale=0.5)
        perturb_new_layers(model)
        result = backward_once(model, checkpointing)
        new_layer = tuner(model).dlo_new_layers["default"]["new4"]
        assert new_layer.gradient_checkpointing == checkpointing  # the new layers follow the switch
        return result

    run_a, run_b = run(False), run(True)
    assert_same_loss_and_gradients(run_a, run_b)
    assert run_a[2] == run_b[2]  # the routing statistics


# ---------------------------------------------------------------- PEFT behaviour: save/load, disable, merge


def _train_one_step(model, inputs, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    train_steps(model, optimizer, inputs, steps=1)
    model.eval()


def test_the_config_fixes_the_saved_keys_whatever_the_values(tmp_path):
    """new_layer_training='full' saves every new-layer weight even while it still equals its source (a load then
    refuses a file without them); 'lora' saves the LoRA and leaves the frozen copies to be rebuilt from the base."""
    model = dlo(tiny_llama(num_layers=8))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    new_layers = tuner(model).dlo_new_layers["default"]
    expected = [f"base_model.dlo_routers.l{p}.weight" for p in range(10)]
    expected += [f"base_model.dlo_new_layers.{name}" for name, _ in new_layers.named_parameters()]
    assert sorted(saved) == sorted(expected)
    lora = dlo(tiny_llama(num_layers=8), new_layer_training="lora", r=2)
    lora.save_pretrained(tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    new_layer_keys = [k for k in saved if "dlo_new_layers" in k]
    assert new_layer_keys and all("lora_" in k for k in new_layer_keys)


def test_save_load_round_trip_exact_after_a_training_step(tmp_path):
    base = tiny_llama(num_layers=8)
    model = dlo(clone_model(base), capacity=0.7)
    inputs = batch()
    _train_one_step(model, inputs)
    randomise_routers(model, scale=1.0)  # and make sure some tokens are skipped in eval
    expected = logits(model, inputs)
    assert peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] < 1
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    new_layer_keys = sorted(k for k in saved if "dlo_new_layers" in k)
    # every trained new-layer weight is saved (new_layer_training='full'), also those one step left unchanged
    assert len(new_layer_keys) == len(list(tuner(model).dlo_new_layers["default"].parameters()))
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(loaded.state_dict()[name], param, rtol=0, atol=0, msg=name)
    # after a second step too, and through the low_cpu_mem_usage path
    _train_one_step(model, inputs)
    model.save_pretrained(tmp_path / "two")
    saved = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert len([k for k in saved if "dlo_new_layers" in k]) == len(
        list(tuner(model).dlo_new_layers["default"].parameters())
    )
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path / "two", low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_auto_peft_model_loads_for_inference_and_training(tmp_path):
    base = tiny_llama(num_layers=8)
    base.save_pretrained(tmp_path / "base")
    model = dlo(clone_model(base), init="mean")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    randomise_routers(model)
    inputs = batch()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable = PeftModel.from_pretrained(clone_model(base), tmp_path / "adapter", is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all("dlo_" in n for n in names)


def test_lora_new_layers_and_lora_on_originals(tmp_path):
    base = tiny_llama(num_layers=8)
    model = dlo(clone_model(base), r=4, new_layer_training="lora", target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".layers.0.self_attn.q_proj.lora_A.default" in n for n in trainable)  # LoRA on the originals
    assert all(("lora_" in n) or ("dlo_routers" in n) for n in trainable)
    assert any("dlo_new_layers.default.new4.mlp.up_proj.lora_B" in n for n in trainable)
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)
    _train_one_step(model, inputs)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in saved)  # frozen copies are rebuilt, never saved
    assert all(("lora_" in k) or ("dlo_routers" in k) for k in saved)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    # also where peft builds the adapter on the meta device and assigns the loaded tensors (the new layers' LoRA
    # weights could not be moved off meta)
    loaded = PeftModel.from_pretrained(clone_model(base), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    assert not any(p.is_meta for p in loaded.parameters())
    only_new = dlo(clone_model(base), r=4, new_layer_training="lora", lora_on_original_layers=False)
    assert not any(".layers." in n and "lora_" in n for n, _ in only_new.named_parameters())


def test_disable_adapter_gives_the_original_model():
    base = tiny_llama(num_layers=8)
    inputs = batch()
    expected = logits(clone_model(base), inputs)
    model = dlo(clone_model(base), r=2, target_modules=["q_proj"], init_lora_weights=False)
    _train_one_step(model, inputs)
    adapted = logits(model, inputs)
    assert (adapted - expected).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        assert model.base_model.model.config.num_hidden_layers == 8
        assert peft_depth.routing_stats(model) == {} and peft_depth.aux_losses(model) == {}
        gen = model.generate(**batch(seq_len=4), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, base.generate(**batch(seq_len=4), max_new_tokens=4, do_sample=False, pad_token_id=0))
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)


def test_merge_and_unload_dense_expansion_gives_a_plain_deeper_model(tmp_path):
    base = tiny_llama(num_layers=8)
    inputs = batch()
    model = dlo(clone_model(base), routed_layers="none", r=2, target_modules=["q_proj"])
    _train_one_step(model, inputs)
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert len(merged.model._modules["layers"]) == 10 and merged.config.num_hidden_layers == 10
    assert [layer.self_attn.layer_idx for layer in merged.model.layers] == list(range(10))
    assert not any("lora_" in n or "dlo_" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_merge_is_refused_while_routing_and_unload_restores_the_base():
    base = tiny_llama(num_layers=8)
    model = dlo(clone_model(base))
    with pytest.raises(ValueError, match="routers decide per token"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    perturb_new_layers(model)
    unloaded = model.unload()
    assert unloaded.config.num_hidden_layers == 8 and len(unloaded.model.layers) == 8
    inputs = batch()
    torch.testing.assert_close(logits(unloaded, inputs), logits(base, inputs), rtol=0, atol=0)


def test_multiple_adapters_switch_depth():
    base = tiny_llama(num_layers=8)
    inputs = batch()
    model = dlo(clone_model(base), init="copy")
    model.add_adapter("deep", DLOConfig(expansion="stack", stack_range=[2, 6], init="copy"))
    config = model.base_model.model.config
    out_default = logits(model, inputs)
    assert config.num_hidden_layers == 10
    model.set_adapter("deep")
    assert config.num_hidden_layers == 12 and [b.self_attn.layer_idx for b in stack(model)] == list(range(12))
    assert (logits(model, inputs) - out_default).abs().max() > 1e-4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deep." in n for n in trainable)
    with pytest.raises(ValueError, match="one DLO adapter at a time"):
        model.base_model.set_adapter(["default", "deep"])
    model.set_adapter("default")
    model.delete_adapter("deep")
    assert config.num_hidden_layers == 10
    torch.testing.assert_close(logits(model, inputs), out_default, rtol=0, atol=0)


def test_deep_copy_is_an_independent_working_model():
    model = dlo(tiny_llama(num_layers=8), capacity=0.5, capacity_annealing_steps=0)
    randomise_routers(model)
    inputs = batch()
    expected = logits(model, inputs)
    duplicate = copy.deepcopy(model)
    torch.testing.assert_close(logits(duplicate, inputs), expected, rtol=0, atol=0)
    tuner(duplicate).set_dlo_step(3)
    assert tuner(model).dlo_step == 0
    duplicate.train()
    duplicate(**inputs)
    assert "router" in peft_depth.aux_losses(duplicate) and peft_depth.aux_losses(model) == {}
    assert peft_depth.routing_stats(duplicate)["dlo"]["default"]["executed_fraction"] < 1


def test_block_skip_mode():
    base = tiny_llama(num_layers=8)
    inputs = batch(left_pad=0)
    model = dlo(clone_model(base), skip_mode="block")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=1e-5, atol=1e-5)
    randomise_routers(model)
    perturb_new_layers(model)
    out = logits(model, inputs)
    assert 0 < peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] < 1
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="use_cache=False"):
        model(**inputs, use_cache=True)
    generated = model.generate(**batch(seq_len=4), max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert generated.shape == (2, 7)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    assert tuner(model).dlo_routers["default"]["l0"].weight.grad is not None


def _capture_layer_call(model, position):
    """The input, keyword arguments and output of the DLO layer at ``position`` in one forward of ``model``."""
    layer = stack(model)[position]
    seen = {}

    def before(module, args, kwargs):
        seen["h"], seen["kwargs"] = (args[0] if args else kwargs["hidden_states"]), dict(kwargs)

    def after(module, args, kwargs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output

    hooks = [layer.register_forward_pre_hook(before, with_kwargs=True)]
    hooks.append(layer.register_forward_hook(after, with_kwargs=True))
    return layer, seen, hooks


def _official_non_exattn(layer, h, kwargs):
    """modeling_llama_dlo.py's routed layer for tokens that run: h + attn + ŝ·mlp, ŝ = 1 + 0.05·(s − 0.5)."""
    inner = layer.inner
    s_hat = (1.0 + 0.05 * (torch.sigmoid(layer.router(h).float()) - 0.5)).to(h.dtype)
    attn = inner.self_attn(
        hidden_states=inner.input_layernorm(h),
        attention_mask=kwargs.get("attention_mask"),
        position_embeddings=kwargs["position_embeddings"],
    )[0]
    after_attention = h + attn
    return after_attention + s_hat * inner.mlp(inner.post_attention_layernorm(after_attention))


@pytest.mark.parametrize("training", [True, False])
def test_block_skip_scales_the_mlp_branch_only_as_the_official_layer(training, monkeypatch):
    """The official non-ExAttn layer scales the MLP output of the tokens that run; attention joins unscaled. Checked
    with every token running (one plain call) and with a packed prefix (its causal attention is the full one)."""
    model = dlo(tiny_llama(num_layers=4), skip_mode="block", routed_layers="all", capacity=1.0, init="copy")
    randomise_routers(model, scale=2.0)
    model.train(training)
    inputs = batch(batch_size=1, seq_len=10, left_pad=0)
    if not training:  # the router chooses the first 6 tokens: a packed call over a prefix
        prefix = torch.zeros(10, dtype=torch.bool)
        prefix[:6] = True
        monkeypatch.setattr(type(stack(model)[1]), "_select", lambda self, scores, *rest: prefix.clone())
    layer, seen, hooks = _capture_layer_call(model, 1)
    with torch.no_grad():
        model(**inputs, use_cache=False)
        for hook in hooks:
            hook.remove()
        official = _official_non_exattn(layer, seen["h"], seen["kwargs"])
    run = slice(None) if training else slice(0, 6)
    torch.testing.assert_close(seen["out"][:, run], official[:, run], rtol=0, atol=2e-6)
    if not training:
        assert torch.equal(seen["out"][:, 6:], seen["h"][:, 6:])  # the others pass through
    # the attention term differs from the scaled one by (ŝ − 1)·attn: far above the tolerance
    with torch.no_grad():
        inner, h = layer.inner, seen["h"]
        s_hat = 1.0 + 0.05 * (torch.sigmoid(layer.router(h)) - 0.5)
        attn = inner.self_attn(
            hidden_states=inner.input_layernorm(h),
            attention_mask=seen["kwargs"].get("attention_mask"),
            position_embeddings=seen["kwargs"]["position_embeddings"],
        )[0]
    assert ((s_hat - 1) * attn)[:, run].abs().max() > 1e-4


def _moe_families():
    import transformers as T

    return {
        "mixtral": (T.MixtralForCausalLM, T.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": (
            T.Qwen3MoeForCausalLM,
            T.Qwen3MoeConfig,
            dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
        ),
        "olmoe": (T.OlmoeForCausalLM, T.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2)),
    }


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("skip_mode", ["mlp", "block"])
def test_zero_out_new_layers_are_an_identity_on_mixture_of_experts_decoders(family, skip_mode):
    """transformers keeps a mixture of experts' down projections as parameters of one `experts` module, not as
    linears: zero_out must zero them (and their biases), or a fresh adapter moves the logits (0.004-0.015 here)."""
    model_class, config_class, options = _moe_families()[family]
    base = tiny_decoder(model_class, config_class, **options)
    inputs = batch()
    model = dlo(tiny_decoder(model_class, config_class, **options), skip_mode=skip_mode, routed_layers="all")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=1e-6)
    for layer in tuner(model).dlo_new_layers["default"].values():
        experts = [p for n, p in layer.named_parameters() if n.endswith(("experts.down_proj", "down_proj_bias"))]
        assert experts and all(not p.any() for p in experts)


def test_block_skip_runs_a_mixture_of_experts_mlp_and_mlp_skip_refuses_it_by_name():
    """GPT-OSS's MLP returns (hidden, router scores): block mode scales the hidden part and keeps the scores; MLP
    skipping, which would run the experts on the chosen tokens only, is refused, naming block mode."""
    from transformers import GptOssConfig, GptOssForCausalLM

    def gpt_oss():
        return tiny_decoder(
            GptOssForCausalLM,
            GptOssConfig,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention"] * 4,
        )

    base = gpt_oss()
    inputs = batch()
    model = dlo(gpt_oss(), skip_mode="block", routed_layers="all")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=1e-6)  # zero_out start
    randomise_routers(model)
    perturb_new_layers(model)
    assert torch.isfinite(logits(model, inputs)).all()
    model.train()
    model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    assert tuner(model).dlo_routers["default"]["l1"].weight.grad.abs().max() > 0
    refused = dlo(gpt_oss(), skip_mode="mlp", routed_layers="all")
    with pytest.raises(ValueError, match=r"skip_mode='mlp' cannot skip GptOssMLP.*Use skip_mode='block'"):
        logits(refused, inputs)


def test_routing_stats_and_optimizer_groups():
    model = dlo(tiny_llama(num_layers=8), routed_layers="new", capacity_lr_scaling=True)
    logits(model, batch())
    stats = peft_depth.routing_stats(model)["dlo"]["default"]
    assert [row["layer"] for row in stats["layers"]] == [4, 9] and all(row["new"] for row in stats["layers"])
    assert stats["executed_fraction"] == 1.0
    assert stats["executed_fraction_by_kind"] == {"original": None, "new": 1.0}  # no routed original layer
    groups = tuner(model).depth_optimizer_groups(1e-3, 0.0)
    assert [g["name"] for g in groups] == [
        "dlo_layer_4",
        "dlo_layer_4_no_decay",
        "dlo_layer_9",
        "dlo_layer_9_no_decay",
    ]
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups)  # the unscaled rate: the trainer scales it per step


def test_routing_stats_split_the_executed_fraction_by_layer_kind():
    model = dlo(tiny_llama(num_layers=8), capacity=0.5, capacity_annealing_steps=0, loss_type="cos")
    randomise_routers(model)
    inputs = batch(batch_size=2, seq_len=10, left_pad=3)
    model.eval()
    model(**inputs)
    stats = peft_depth.routing_stats(model)["dlo"]["default"]
    for kind, new in (("original", False), ("new", True)):
        rows = [row for row in stats["layers"] if row["new"] is new]
        executed = sum(row["executed_fraction"] * row["num_tokens"] for row in rows)
        expected = executed / sum(row["num_tokens"] for row in rows)
        assert stats["executed_fraction_by_kind"][kind] == pytest.approx(expected)
    assert stats["executed_fraction_by_kind"]["original"] != stats["executed_fraction_by_kind"]["new"]


@pytest.mark.parametrize("settings", [dict(skip_mode="block"), dict(inference_selection="capacity", capacity=0.5)])
def test_generate_runs_uncached_where_dlo_keeps_no_cache_and_says_so(settings):
    """Block skipping keeps no cache; a capacity budget chooses among all the tokens of a forward, so a cached decode
    step would run every new token (executed fraction 1.0 for one row) and differ from uncached generation."""
    model = dlo(tiny_llama(num_layers=8), **settings)
    randomise_routers(model)
    perturb_new_layers(model)
    model.eval()
    prompt = batch(batch_size=1, seq_len=5, left_pad=0)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="generating with use_cache=False"):
        plain = model.generate(**prompt, **options)
    uncached = model.generate(**prompt, **options, use_cache=False)
    assert torch.equal(plain, uncached)
    with torch.no_grad():
        prefill = model(**prompt, use_cache=True) if "inference_selection" in settings else None
    if prefill is not None:  # a forward that reads a cache is refused, naming the way out
        step = {"input_ids": plain[:, 5:6], "attention_mask": torch.ones(1, 6, dtype=torch.long)}
        with pytest.raises(ValueError, match=r"inference_selection='capacity'.*use_cache=False"):
            model(**step, past_key_values=prefill.past_key_values)


def test_training_mode_generation_below_full_capacity_runs_uncached():
    """TRL's GRPO/RLOO generate in training mode. With a training capacity below 1, a cached decode step chose among
    its new tokens alone: the tokens were sampled from another policy than the one the loss forward then scores."""
    model = dlo(tiny_llama(num_layers=8), capacity=0.5, capacity_annealing_steps=0)
    randomise_routers(model)
    perturb_new_layers(model)
    model.train()
    prompt = batch(batch_size=2, seq_len=5, left_pad=0)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"training mode executes the top `capacity`.*use_cache=False"):
            plain = model.generate(**prompt, **options)
        assert torch.equal(plain, model.generate(**prompt, **options, use_cache=False))
        prefill = model(**prompt, use_cache=True)
        step = {"input_ids": plain[:, 5:6], "attention_mask": torch.ones(2, 6, dtype=torch.long)}
        with pytest.raises(ValueError, match=r"training-mode capacity of 0.5.*use_cache=False"):
            model(**step, past_key_values=prefill.past_key_values)
    full = dlo(tiny_llama(num_layers=8), capacity=0.5)  # annealing from 1: nothing to refuse at step 0
    full.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            full.generate(**prompt, **options)


@pytest.mark.parametrize("layout", ["sliding_window_padded", "packed_sequences"])
def test_block_skipping_keeps_the_layers_own_attention_mask(layout):
    """The packed call used a plain causal mask among the chosen tokens, dropping a sliding window (a left-padded
    row differed from itself alone by 0.42) and packed-sequence boundaries (0.48). Zero routers choose every real
    token (random routers, for the packed row, skip the same tokens as alone), so each sequence must compute what it
    computes alone."""
    if layout == "sliding_window_padded":
        from transformers import MistralConfig, MistralForCausalLM

        base = tiny_decoder(MistralForCausalLM, MistralConfig, sliding_window=4)
    else:
        base = tiny_llama(num_layers=4)
    model = dlo(base, skip_mode="block", expand_every=2)
    perturb_new_layers(model)
    if layout == "packed_sequences":  # some tokens skipped, in the packed row and alone alike (routing is per token)
        randomise_routers(model)
    model.eval()
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randint(3, 128, (10,), generator=generator), torch.randint(3, 128, (7,), generator=generator)
    with torch.no_grad():
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in (first, second)]
        if layout == "sliding_window_padded":
            ids = torch.stack([first, torch.cat([torch.zeros(3, dtype=torch.long), second])])
            mask = (ids != 0).long()
            mask[0] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            together = [out[0], out[1, 3:]]
        else:  # padding-free packing: one row, positions restart at each sequence
            ids = torch.cat([first, second])[None]
            positions = torch.cat([torch.arange(10), torch.arange(7)])[None]
            out = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
            together = [out[:10], out[10:]]
    executed = peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"]
    assert 0 < executed < 1 if layout == "packed_sequences" else executed == 1
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_block_skipping_refuses_a_mask_it_cannot_take_at_the_chosen_tokens():
    from peft_depth.tuners.dlo.block_skip import _packed_mask

    order = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match=r"cannot read \(dict.*skip_mode='mlp'"):
        _packed_mask({"full_attention": None}, order, seq=3)
    with pytest.raises(ValueError, match=r"cannot read \(shape \(1, 3\)"):
        _packed_mask(torch.ones(1, 3), order, seq=3)
    blocked = torch.finfo(torch.float32).min
    bias = torch.tensor([[0.0, blocked, blocked], [0.0, 0.0, blocked], [blocked, 0.0, 0.0]])[
        None, None
    ]  # 2 cannot see 0
    allowed, packed_bias = _packed_mask(bias, order, seq=3)
    assert allowed.tolist() == [[[[True, False], [False, True]]]]
    assert packed_bias.tolist() == [[[[0.0, 0.0], [0.0, 0.0]]]]
    assert _packed_mask(bias == 0, order, seq=3)[0].tolist() == allowed.tolist()


def test_block_skipping_keeps_the_bias_an_additive_mask_carries_at_the_original_positions():
    """transformers >= 5.25 adds Falcon's ALiBi bias to the attention mask. Reading "may attend" as ``mask == 0``
    dropped every key with a bias (Falcon's block-skip logits were 0.33 off the base with identity new layers), and
    the packed call must see each pair's bias at the tokens' original positions, not at their packed slots."""
    from peft_depth.tuners.dlo.block_skip import _packed_mask

    blocked = torch.finfo(torch.float32).min
    slope = torch.tensor([0.5, 0.25])  # two heads
    keys = torch.arange(5.0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    mask = (slope[:, None, None] * keys).expand(2, 5, 5).masked_fill(~causal, blocked)[None]  # [1, 2, 5, 5]
    order = torch.tensor([[1, 3, 4], [0, 2, 4]])
    allowed, bias = _packed_mask(mask, order, seq=5)
    assert allowed.shape == bias.shape == (2, 2, 3, 3)
    for row in range(2):
        for i, p in enumerate(order[row].tolist()):
            for j, q in enumerate(order[row].tolist()):
                assert bool(allowed[row, 0, i, j]) == (q <= p)
                expected = [float(s * q) if q <= p else 0.0 for s in slope]
                assert bias[row, :, i, j].tolist() == expected


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_block_skipping_reports_one_hidden_state_per_layer_of_the_expanded_stack(training):
    """transformers records hidden states with hooks at every call of a layer; block skipping calls a layer up to
    three times (packed, label and base-path calls), which gave 21 entries of packed shapes for 10 layers."""
    model = dlo(tiny_llama(num_layers=8), skip_mode="block", capacity=0.5, capacity_annealing_steps=0)
    randomise_routers(model, scale=1.0)
    perturb_new_layers(model)
    model.train(training)
    outputs = []
    handles = [block.register_forward_hook(lambda m, a, o: outputs.append(o)) for block in stack(model)]
    inputs = batch(batch_size=2, seq_len=6, left_pad=0)
    with torch.no_grad():
        result = model(**inputs, output_hidden_states=True, use_cache=False)
    for handle in handles:
        handle.remove()
    assert 0 < peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] < 1
    states = result.hidden_states
    assert len(states) == len(stack(model)) + 1 == 11
    for state, output in zip(states[1:-1], outputs[:-1]):  # the last entry is after the final norm
        assert torch.equal(state, output)
    with pytest.raises(ValueError, match=r"cannot report attentions.*skip_mode='mlp'"):
        model(**inputs, output_attentions=True, use_cache=False)
