"""MoD's gate and router learning rates (issue 14: at g = 0 the router and norms learn nothing from the LM loss until
the gate moves, so the gate's rate decides how soon the method is active)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_llama

from peft_depth import MoDConfig
from peft_depth.trainer import collect_optimizer_groups


def _mod(**fields):
    return get_peft_model(tiny_llama(), MoDConfig(num_late_layers=3, **fields))


def _optimizer(model, lr: float, **overrides) -> torch.optim.Optimizer:
    groups = collect_optimizer_groups(model, lr, 0.0, **overrides)
    claimed = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    return torch.optim.AdamW([{"params": rest, "lr": lr, "weight_decay": 0.0}, *groups], lr=lr)


def _one_step(model, optimizer) -> None:
    inputs = batch()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    optimizer.step()


@pytest.mark.parametrize("field", ["gate_lr", "router_lr"])
@pytest.mark.parametrize("value", [0, -1e-3, math.nan, math.inf, True, "0.1"])
def test_bad_learning_rates_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be None .* finite number > 0"):
        MoDConfig(**{field: value})


def test_without_rates_only_the_gate_has_a_group_at_the_trainers_rate_and_decay():
    """As the trainer's default decay group would train it; its own group lets `gate_learning_rate` reach it."""
    model = _mod()
    ensemble = model.base_model.mod_ensemble["default"]
    groups = model.base_model.depth_optimizer_groups(1e-3, 0.01)
    assert groups == [{"name": "gate", "params": [ensemble.gate], "lr": 1e-3, "weight_decay": 0.01}]


def test_the_trainers_gate_learning_rate_reaches_a_gate_without_gate_lr():
    model = _mod()
    groups = collect_optimizer_groups(model, 1e-4, 0.0, gate_learning_rate=0.3)
    assert [g["lr"] for g in groups if g["name"] == "gate"] == [0.3]


def test_gate_lr_moves_the_gate_at_its_own_rate():
    # Adam's first step moves every parameter with a non-zero gradient by ~lr, so the gate moves by ~gate_lr while
    # the router (zero gradient at g = 0) stays where it is.
    model = _mod(gate_lr=0.05)
    groups = model.base_model.depth_optimizer_groups(1e-4, 0.0)
    ensemble = model.base_model.mod_ensemble["default"]
    assert [g["name"] for g in groups] == ["gate"]
    assert groups[0]["params"] == [ensemble.gate] and groups[0]["lr"] == 0.05
    router_before = ensemble.router.bias.detach().clone()
    _one_step(model, _optimizer(model, 1e-4))
    assert abs(ensemble.gate.item()) == pytest.approx(0.05, rel=1e-3)
    assert torch.equal(ensemble.router.bias, router_before)


def test_router_lr_covers_router_and_norms_with_the_trainers_decay_policy():
    model = _mod(router_lr=0.02, gate_init=0.5)
    ensemble = model.base_model.mod_ensemble["default"]
    groups = {g["name"]: g for g in model.base_model.depth_optimizer_groups(1e-4, 0.1)}
    assert set(groups) == {"gate", "router", "router_no_decay"}
    del groups["gate"]
    expected = {id(p) for p in ensemble.parameters()} - {id(ensemble.gate)}
    assert {id(p) for g in groups.values() for p in g["params"]} == expected
    assert groups["router"]["weight_decay"] == 0.1 and groups["router_no_decay"]["weight_decay"] == 0.0
    assert all(
        not n.startswith("norms.") and not n.endswith("bias")
        for n, p in ensemble.named_parameters()
        if any(p is q for q in groups["router"]["params"])
    )
    weight_before = ensemble.router.weight.detach().clone()
    _one_step(model, _optimizer(model, 1e-4))
    moved = (ensemble.router.weight.detach() - weight_before).abs()
    assert moved.max() == pytest.approx(0.02, rel=1e-2)  # router learns at its own rate once g != 0


def test_trainer_gate_learning_rate_overrides_the_config():
    model = _mod(gate_lr=0.05)
    groups = collect_optimizer_groups(model, 1e-4, 0.0, gate_learning_rate=0.3)
    assert [g["lr"] for g in groups if g["name"] == "gate"] == [0.3]


def test_rates_survive_save_and_load(tmp_path):
    model = _mod(gate_lr=0.05, router_lr=0.02)
    model.save_pretrained(tmp_path)
    loaded = MoDConfig.from_pretrained(tmp_path)
    assert (loaded.gate_lr, loaded.router_lr) == (0.05, 0.02)
