"""Every method trains under bfloat16 autocast (what the Trainer's ``bf16=True`` does, on CPU as on GPU): the loss
matches float32 closely and every parameter that trains gets a finite gradient."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_llama

import peft_depth
from peft_depth import DLOConfig, MoDConfig, MoLAConfig, MoLExConfig

QV = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, target_modules=QV),
    "mola": lambda: MoLAConfig(r=4, target_modules=QV),
    "molex_batch_vote": lambda: MoLExConfig(r=4, target_modules=QV),
    "molex_token": lambda: MoLExConfig(r=4, target_modules=QV, routing="token"),
    "mod_lora": lambda: MoDConfig(num_late_layers=3, gate_init=0.5, r=4, target_modules=["q_proj"]),
    "dlo_all_layers": lambda: DLOConfig(routed_layers="all", capacity=0.7, capacity_annealing_steps=0),
    "dlo_lora": lambda: DLOConfig(routed_layers="all", r=4, new_layer_training="lora", target_modules=["q_proj"]),
}


def _loss(model, inputs) -> torch.Tensor:
    out = model(**inputs, labels=inputs["input_ids"])
    return out.loss + sum(peft_depth.aux_losses(model).values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_under_bf16_autocast_matches_float32(name):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[name]()).train()
    inputs = batch(left_pad=2)
    reference = _loss(model, inputs)
    reference.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reached_in_fp32 = {n for n, p in trained if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, inputs)
    loss.backward()
    assert float(loss) == pytest.approx(float(reference), rel=2e-3)
    assert all(p.dtype == torch.float32 for _, p in trained)  # autocast leaves the master weights in float32
    assert reached_in_fp32  # the loss reaches something that trains
    # every parameter the float32 loss reaches (routers and gates included) gets a finite, non-zero gradient
    grads = {n: p.grad for n, p in trained}
    lost = sorted(n for n in reached_in_fp32 if grads[n] is None or not grads[n].abs().sum() > 0)
    assert not lost, f"no gradient under bf16 autocast: {lost}"
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
