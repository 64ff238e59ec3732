"""DLO's options from the official code (``DaizeDong/LLaMA-DLO``) that the PEFT port lacked or got wrong.

- ``unrouted_edge_layers``: the official ``original_dlo_shrink_num`` (first/last N original layers get no router);
- ``capacity_lr_scaling``: the per-layer learning rates follow the capacities every step, on top of the LR schedule
  (they were computed once, when the optimizer was built and every capacity was 1.0);
- ``capacity_annealing_fraction``: annealing over a fraction of the training run, whose length the trainer supplies;
- ``trained_original_modules``: original-layer modules trained in full, as declared ``modules_to_save`` copies.

The official tie rule (every token tied at the capacity threshold runs) is tested in ``test_dlo.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_dlo_unload import assert_same_base, base_snapshot
from tiny_models import batch, tiny_llama
from trainer_fixtures import counting_dataset, make_trainer, train_logs
from transformers import TrainerCallback

import peft_depth
from peft_depth.trainer.hooks import apply_lr_multipliers, depth_tuners
from peft_depth.tuners.dlo import DLOConfig

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def dlo(model, **kwargs):
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("routed_layers", "all")  # the paper's routing, whose options these tests exercise
    return get_peft_model(model, DLOConfig(**kwargs))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def train_steps(model, steps=3, lr=1e-2):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs = batch(batch_size=2, seq_len=8)
    for step in range(steps):
        model.base_model.set_dlo_step(step)
        loss = model(**inputs, labels=inputs["input_ids"]).loss + sum(peft_depth.aux_losses(model).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# ---------------------------------------------------------------- unrouted_edge_layers (original_dlo_shrink_num)


def test_unrouted_edge_layers_leave_the_first_and_last_original_layers_unrouted(tmp_path):
    # 8 layers, a copy after layers 3 and 7: positions 0-3 = originals 0-3, 4 = new (of 3), 5-8 = originals 4-7,
    # 9 = new (of 7). N=2 unroutes originals 0, 1, 6, 7 (positions 0, 1, 7, 8); the new layers stay routed, the one
    # after the last original layer too (the official code routes the new layers by a switch of their own).
    model = dlo(tiny_llama(num_layers=8), unrouted_edge_layers=2)
    assert sorted(model.base_model.dlo_routers["default"], key=lambda k: int(k[1:])) == [
        "l2", "l3", "l4", "l5", "l6", "l9"
    ]  # fmt: skip
    model.train()
    model(**batch())
    stats = peft_depth.routing_stats(model)["dlo"]["default"]
    assert [row["layer"] for row in stats["layers"]] == [2, 3, 4, 5, 6, 9]
    model.eval()
    expected = logits(model, batch())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k.split(".")[-2] for k in saved if ".dlo_routers." in k) == ["l2", "l3", "l4", "l5", "l6", "l9"]
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=8), tmp_path).eval()
    assert torch.equal(logits(loaded, batch()), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(unrouted_edge_layers=-1), "`unrouted_edge_layers` must be an integer >= 0"),
        (dict(unrouted_edge_layers=1.0), "`unrouted_edge_layers` must be an integer >= 0"),
        (
            dict(unrouted_edge_layers=1, routed_layers="new"),
            "`unrouted_edge_layers`=1 applies to .*routed_layers='all'",
        ),
        (dict(capacity_annealing_fraction=0.0), r"`capacity_annealing_fraction` must be a number in \(0, 1\]"),
        (dict(capacity_annealing_fraction=1.5), r"`capacity_annealing_fraction` must be a number in \(0, 1\]"),
        (dict(capacity_annealing_fraction="half"), r"`capacity_annealing_fraction` must be a number in \(0, 1\]"),
        (dict(trained_original_modules=[]), "`trained_original_modules` must be null or a non-empty list"),
        (dict(trained_original_modules="mlp"), "`trained_original_modules` must be null or a non-empty list"),
        (dict(trained_original_layers="some"), "`trained_original_layers` must be 'routed', 'all' or"),
        (dict(trained_original_layers=[0, -1]), "`trained_original_layers` must be 'routed', 'all' or"),
        (
            dict(trained_original_modules=["mlp"], routed_layers="new"),
            "`trained_original_layers`='routed' picks no layer with routed_layers='new'",
        ),
    ],
)
def test_bad_values_of_the_new_fields_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLOConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(unrouted_edge_layers=2), r"`unrouted_edge_layers`=2 leaves no original layer .* \(allowed: 0..1\)"),
        (dict(trained_original_modules=["mlp"], trained_original_layers=[1, 4]), r"lists layers \[4\] outside"),
        (dict(trained_original_modules=["no_such_module"]), "`trained_original_modules` .* matches no module"),
        (dict(trained_original_modules=["mlp"], r=4), "LoRA on the original layers .* also targets"),
    ],
)
def test_fields_that_do_not_fit_the_base_fail_and_leave_it_unchanged(kwargs, message):
    base = tiny_llama(num_layers=4).eval()
    before = base_snapshot(base)
    config = DLOConfig(task_type="CAUSAL_LM", **kwargs)
    saved = config.modules_to_save
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config)
    assert_same_base(before, base_snapshot(base))
    assert config.modules_to_save == saved


def test_a_config_saved_before_the_new_fields_keeps_its_meaning():
    """The v1 fixture (written before these fields existed) gets defaults that change nothing: every layer routed,
    fixed-step annealing, original layers frozen, nothing added to modules_to_save."""
    config = PeftConfig.from_pretrained(FIXTURES / "dlo_v1")
    assert (config.unrouted_edge_layers, config.capacity_annealing_fraction) == (0, None)
    assert config.trained_original_modules is None
    config.base_model_name_or_path = None  # (the tiny model has no Hub name)
    model = get_peft_model(tiny_llama(num_layers=4), config)
    assert len(model.base_model.dlo_routers["default"]) == 6  # 4 originals + 2 copies (every 2nd layer)
    assert config.modules_to_save is None
    assert not [n for n, p in model.named_parameters() if p.requires_grad and ".layers." in n]


# ---------------------------------------------------------------- capacity_lr_scaling: every step, on the schedule


class _LearningRates(TrainerCallback):
    """Per optimizer step: the DLO multipliers at the step's start, and the groups' rates and the scheduler's own
    rates right before the optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.multipliers, self.rates, self.scheduled, self.router_groups = [], [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        (tuner,) = depth_tuners(self.trainer.model)
        self.multipliers.append(tuner.depth_lr_multipliers())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        groups = self.trainer.optimizer.param_groups
        scheduled = self.trainer.lr_scheduler.get_last_lr()
        named = [(i, g["name"]) for i, g in enumerate(groups) if str(g.get("name", "")).startswith("dlo_layer_")]
        self.rates.append({name: groups[i]["lr"] for i, name in named})
        self.scheduled.append({name: scheduled[i] for i, name in named})
        (tuner,) = depth_tuners(self.trainer.model)
        routers = {id(p) for p in tuner.dlo_routers["default"].parameters()}
        holding = [i for i, g in enumerate(groups) if routers & {id(p) for p in g["params"]}]
        self.router_groups.append([(groups[i].get("name"), groups[i]["lr"], scheduled[i]) for i in holding])


def test_layer_learning_rates_follow_the_capacities_every_step_under_the_lr_schedule(tmp_path):
    config = DLOConfig(
        task_type="CAUSAL_LM",
        routed_layers="all",
        capacity=0.6,
        capacity_annealing_steps=0,
        capacity_lr_scaling=True,
        min_capacity=0.01,
        r=2,
        target_modules=["q_proj"],
    )
    trainer = make_trainer(
        config,
        str(tmp_path),
        max_steps=5,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        model=tiny_llama(num_layers=8),
    )
    probe = _LearningRates(trainer)
    trainer.add_callback(probe)
    trainer.train()
    (tuner,) = depth_tuners(trainer.model)
    # every routed layer holds weights that train (a new layer's own, LoRA on an original one); the new layers' norm
    # weights sit in no-decay groups that ride the same multiplier
    new = [int(k[1:]) for k, kind in _layer_kinds(tuner) if kind == "new"]
    names = {f"dlo_layer_{int(k[1:])}" for k in tuner.dlo_routers["default"]}
    names |= {f"dlo_layer_{p}_no_decay" for p in new}
    assert len(probe.rates) == 5 and all(set(r) == names for r in probe.rates)
    # the routers train at the scheduled rate, in the trainer's own groups (the official trainer's static groups)
    for router_groups in probe.router_groups:
        assert router_groups and all(not str(name).startswith("dlo_layer_") for name, _, _ in router_groups)
        assert all(lr == scheduled for _, lr, scheduled in router_groups)
    # the scheduler is active (warmup, then linear decay): each layer's rate is the scheduled rate x its multiplier
    assert len({round(s[f"dlo_layer_{new[0]}"], 12) for s in probe.scheduled}) == 5
    for multipliers, rates, scheduled in zip(probe.multipliers, probe.rates, probe.scheduled):
        for name in names:
            assert rates[name] == pytest.approx(scheduled[name] * multipliers[name], rel=1e-12)
    # step 0 runs every layer at the same capacity (multiplier 1); cos_global then gives layers their own capacities,
    # and each layer's rate moves with its capacity
    assert {name: probe.multipliers[0][name] for name in names} == pytest.approx(dict.fromkeys(names, 1.0))
    later = probe.multipliers[2]
    assert max(later.values()) - min(later.values()) > 0.05
    assert sum(later.values()) / len(later) == pytest.approx(1.0)  # capacity_l + 1 - mean: they average to 1
    ratios = [probe.rates[2][name] / probe.scheduled[2][name] for name in names]
    assert min(ratios) < 0.97 and max(ratios) > 1.03  # the effective rates really differ from the schedule
    assert probe.multipliers[-1] != pytest.approx(later)  # recomputed every step, not fixed once


def _layer_kinds(tuner) -> list[tuple[str, str]]:
    layouts = tuner._dlo["layouts"]["default"]
    return [(key, layouts[int(key[1:])][0]) for key in tuner.dlo_routers["default"]]


def test_capacity_lr_groups_leave_one_dimensional_parameters_undecayed():
    """As the official trainer (and the Trainer, for every other parameter): norm weights and biases take no decay."""
    model = dlo(tiny_llama(num_layers=4), capacity_lr_scaling=True, capacity_annealing_steps=0)
    tuner = model.base_model
    groups = {g["name"]: g for g in tuner.depth_optimizer_groups(1e-3, 0.1)}
    new = next(key for key, kind in _layer_kinds(tuner) if kind == "new")
    decay, no_decay = groups[f"dlo_layer_{new[1:]}"], groups[f"dlo_layer_{new[1:]}_no_decay"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    layer = tuner.dlo_new_layers["default"][f"new{new[1:]}"]
    norms = {id(p) for n, p in layer.named_parameters() if "norm" in n}
    assert norms and norms == {id(p) for p in no_decay["params"]}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter in two groups
    multipliers = tuner.depth_lr_multipliers()
    assert multipliers[f"dlo_layer_{new[1:]}_no_decay"] == multipliers[f"dlo_layer_{new[1:]}"]


def test_lr_multipliers_never_compound_and_ride_on_the_scheduler():
    model = dlo(tiny_llama(num_layers=4), capacity_lr_scaling=True, capacity_annealing_steps=0)
    tuner = model.base_model
    groups = tuner.depth_optimizer_groups(0.1, 0.0)
    assert {g["lr"] for g in groups} == {0.1}  # built at the unscaled rate: the scheduler's base rates stay 0.1
    optimizer = torch.optim.SGD(groups, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    tuner._dlo["capacities"]["default"] = {0: 0.5, 1: 0.7, 2: 0.9, 3: 1.0, 4: 0.9, 5: 0.8}
    tuner.peft_config["default"].loss_type = "cos_global"
    multipliers = tuner.depth_lr_multipliers()
    assert multipliers["dlo_layer_0"] == pytest.approx(0.5 + 1 - 0.8)
    for _ in range(3):  # once per micro-batch: the same rates
        apply_lr_multipliers(model, optimizer)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
            [0.1 * multipliers[g["name"]] for g in optimizer.param_groups]
        )
    optimizer.step()
    scheduler.step()  # LambdaLR writes initial_lr x lambda(1) = 0.05 into every group
    tuner._dlo["capacities"]["default"][0] = 0.9
    multipliers = tuner.depth_lr_multipliers()
    apply_lr_multipliers(model, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [0.05 * multipliers[g["name"]] for g in optimizer.param_groups]
    )


def test_a_plateau_schedule_is_refused_with_lr_multipliers_and_accepted_without(tmp_path):
    # ReduceLROnPlateau multiplies the rate a group already has (which holds the last DLO multiplier): the
    # multipliers would compound at every reduction, so the trainer refuses the pair before any work.
    def plateau_trainer(capacity_lr_scaling: bool):
        config = DLOConfig(task_type="CAUSAL_LM", routed_layers="all", capacity_lr_scaling=capacity_lr_scaling)
        return make_trainer(
            config,
            str(tmp_path / str(capacity_lr_scaling)),
            lr_scheduler_type="reduce_lr_on_plateau",
            eval_strategy="steps",  # the plateau scheduler steps on the eval loss
            eval_steps=1,
            eval_dataset=counting_dataset(),
            max_steps=2,
            model=tiny_llama(num_layers=4),
        )

    with pytest.raises(ValueError, match="reduce_lr_on_plateau.*capacity_lr_scaling"):
        plateau_trainer(capacity_lr_scaling=True)
    trainer = plateau_trainer(capacity_lr_scaling=False)
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


# ---------------------------------------------------------------- capacity_annealing_fraction


def test_annealing_over_a_fraction_of_max_steps(tmp_path):
    config = DLOConfig(task_type="CAUSAL_LM", capacity=0.5, capacity_annealing_fraction=0.5)
    trainer = make_trainer(config, str(tmp_path), max_steps=4)
    trainer.train()
    # 4 steps, half of them annealing: 1.0 -> 0.5 over 2 steps, then the target
    assert [e["routing/dlo/capacity_target"] for e in train_logs(trainer)] == pytest.approx([1.0, 0.75, 0.5, 0.5])


def test_annealing_over_a_fraction_of_the_epochs(tmp_path):
    config = DLOConfig(task_type="CAUSAL_LM", capacity=0.5, capacity_annealing_fraction=0.5)
    # 16 rows, batch 4: 4 steps per epoch, 2 epochs -> 8 steps, annealing over 4
    trainer = make_trainer(config, str(tmp_path), max_steps=-1, num_train_epochs=2, dataset=counting_dataset(16))
    trainer.train()
    assert [e["routing/dlo/capacity_target"] for e in train_logs(trainer)] == pytest.approx(
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.5, 0.5, 0.5]
    )


@pytest.mark.filterwarnings("ignore:peft-depth. this training loop drops")
def test_annealing_fraction_without_a_total_raises_in_training_only():
    model = dlo(tiny_llama(num_layers=4), capacity=0.5, capacity_annealing_fraction=0.25)
    model.eval()
    model(**batch())  # eval never needs the training capacity
    assert peft_depth.routing_stats(model)["dlo"]["default"]["capacity_target"] is None
    model.train()
    with pytest.raises(ValueError, match="`capacity_annealing_fraction`=0.25 .*DepthSFTTrainer.*set_dlo_total_steps"):
        model(**batch())
    model.base_model.set_dlo_total_steps(8)  # anneal over 2 of 8 steps
    model.base_model.set_dlo_step(1)
    model(**batch())
    assert peft_depth.routing_stats(model)["dlo"]["default"]["capacity_target"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="`total_steps` must be a positive integer"):
        model.base_model.set_dlo_total_steps(0)


# ---------------------------------------------------------------- trained_original_modules


def test_trained_original_modules_are_declared_saved_and_reload_exactly(tmp_path):
    base = tiny_llama(num_layers=4)
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    # routed originals with one edge layer unrouted: 1 and 2
    model = dlo(base, unrouted_edge_layers=1, trained_original_modules=["mlp"], capacity_annealing_steps=2)
    config = model.peft_config["default"]
    assert config.modules_to_save == ["model.layers.1.mlp", "model.layers.2.mlp"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".layers." in n}
    assert trained == {
        f"base_model.model.model.layers.{i}.mlp.modules_to_save.default.{proj}.weight"
        for i in (1, 2)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    train_steps(model)
    copy_weight = model.base_model.model.model.layers[1].mlp.modules_to_save["default"].down_proj.weight
    assert not torch.equal(copy_weight, pristine["model.layers.1.mlp.down_proj.weight"])  # it trained
    # the base weights themselves never change
    original = model.base_model.model.model.layers[1].mlp.original_module.down_proj.weight
    assert torch.equal(original, pristine["model.layers.1.mlp.down_proj.weight"])
    expected = logits(model, batch())

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    layer_keys = {k for k in keys if ".layers." in k}
    assert layer_keys == {
        f"base_model.model.model.layers.{i}.mlp.{proj}.weight"
        for i in (1, 2)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }

    fresh = tiny_llama(num_layers=4)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(logits(loaded, batch()), expected)
    assert loaded.peft_config["default"].modules_to_save == ["model.layers.1.mlp", "model.layers.2.mlp"]
    # the load wrote the copies only: every base weight of the fresh model is as it was
    layers = loaded.base_model.model.model.layers
    for i in range(4):
        mlp = layers[i].mlp
        module = mlp.original_module if i in (1, 2) else mlp
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(module, proj).weight, pristine[f"model.layers.{i}.mlp.{proj}.weight"])
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, batch()), logits(tiny_llama(num_layers=4), batch()))


def test_unload_gives_back_the_original_weights_of_trained_modules():
    base = tiny_llama(num_layers=4)
    before = base_snapshot(base)
    model = dlo(base, trained_original_modules=["mlp", "post_attention_layernorm"], trained_original_layers="all")
    assert len(model.peft_config["default"].modules_to_save) == 8
    train_steps(model)
    unloaded = model.unload()
    assert_same_base(before, base_snapshot(unloaded))


def test_trained_modules_of_chosen_layers_and_lora_beside_them(tmp_path):
    # LoRA on attention of every original layer, the MLPs of layers 0 and 3 trained in full
    model = dlo(
        tiny_llama(num_layers=4),
        r=4,
        target_modules=["q_proj", "v_proj"],
        trained_original_modules=["mlp"],
        trained_original_layers=[0, 3],
        init_lora_weights=False,
    )
    assert model.peft_config["default"].modules_to_save == ["model.layers.0.mlp", "model.layers.3.mlp"]
    train_steps(model, steps=2)
    expected = logits(model, batch())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(num_layers=4), tmp_path).eval()
    assert torch.equal(logits(loaded, batch()), expected)


def test_capacity_lr_groups_hold_what_trains_on_a_routed_original_layer():
    model = dlo(
        tiny_llama(num_layers=4),
        r=4,
        target_modules=["q_proj"],
        trained_original_modules=["mlp"],
        capacity_lr_scaling=True,
    )
    groups = {g["name"]: g for g in model.base_model.depth_optimizer_groups(1e-3, 0.0)}
    names = {id(p): n for n, p in model.named_parameters()}
    in_layer_1 = {names[id(p)] for p in groups["dlo_layer_1"]["params"]}
    # not the router: the official trainer leaves `model.routers.{i}` at the scheduled rate
    assert not any("dlo_routers" in n for g in groups.values() for n in (names[id(p)] for p in g["params"]))
    assert {n for n in in_layer_1 if ".layers.1." in n} == {
        n for n, p in model.named_parameters() if p.requires_grad and ".layers.1." in n
    }
    assert any("modules_to_save" in n for n in in_layer_1) and any("lora_A" in n for n in in_layer_1)


def test_dense_expansion_merges_the_trained_copies_into_a_plain_model():
    model = dlo(
        tiny_llama(num_layers=4), routed_layers="none", trained_original_modules=["mlp"], trained_original_layers=[2]
    )
    train_steps(model, steps=2)
    expected = logits(model, batch())
    merged = model.merge_and_unload()
    assert type(merged.model.layers[2].mlp).__name__ == "LlamaMLP" and merged.config.num_hidden_layers == 5
    torch.testing.assert_close(logits(merged, batch()), expected, rtol=1e-5, atol=1e-6)


def test_a_second_adapter_copies_the_base_weights_not_the_first_adapters_trained_copy():
    model = dlo(tiny_llama(num_layers=4), trained_original_modules=["mlp"], trained_original_layers="all")
    train_steps(model, steps=2)
    model.add_adapter("other", DLOConfig(task_type="CAUSAL_LM", init="copy"))
    tuner = model.base_model
    new_layer = tuner.dlo_new_layers["other"]["new4"]  # a copy of original layer 3
    assert type(new_layer.mlp).__name__ == "LlamaMLP"
    base_mlp = tuner.model.model.layers[3].mlp.original_module
    assert torch.equal(new_layer.mlp.down_proj.weight, base_mlp.down_proj.weight)
    trained = tuner.model.model.layers[3].mlp.modules_to_save["default"]
    assert not torch.equal(new_layer.mlp.down_proj.weight, trained.down_proj.weight)
