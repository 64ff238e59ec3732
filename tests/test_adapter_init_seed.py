"""Creating an adapter is reproducible: ``torch.manual_seed(s)`` before ``get_peft_model`` fixes every initial weight.

The quality sweep's seeds and a user's ``set_seed`` both rest on this. A method that drew from its own unseeded
generator (or Python's ``random``) would make two runs "with the same seed" start from different adapters, and nothing
else would show it. The second half checks the seed is used at all: different seeds give different starts.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

import peft_depth

LORA = dict(task_type="CAUSAL_LM", lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(num_experts=[2, 3, 2, 3], top_k=2, **LORA),
    "molex_linear": lambda: peft_depth.MoLExConfig(molex_layers=[1, 2], **LORA),
    "molex_cosine": lambda: peft_depth.MoLExConfig(molex_layers=[1, 2], gate_type="cosine", gate_proj_dim=8, **LORA),
    "mod": lambda: peft_depth.MoDConfig(num_late_layers=3, **LORA),
    "dlo": lambda: peft_depth.DLOConfig(expand_every=2, r=4, **LORA),
    "dlo_random_new_layers": lambda: peft_depth.DLOConfig(expand_every=2, init="random", r=4, **LORA),
}
#: the trainable tensors each method draws at random (name endings); every other one is a zero, a constant or a copy of
#: base weights (LoRA B, MoD's router and gate, DLO's routers and its copied new layers), the same under any seed
DRAWN = {
    "mola": ("mola_A.default", "mola_router.default.weight"),
    "molex_linear": ("lora_A.default", "proj.weight", "proj.bias"),
    "molex_cosine": ("lora_A.default", "proj.weight", "proj.bias", "shared.experts"),
    "mod": ("lora_A.default",),
    "dlo": ("lora_A.default",),
    "dlo_random_new_layers": ("lora_A.default", "proj.weight"),  # every linear of the new layers
}


def _initial_state(case: str, seed: int) -> dict[str, torch.Tensor]:
    base = tiny_llama()  # seeds itself: the base is the same in every call
    torch.manual_seed(seed)
    model = get_peft_model(base, CONFIGS[case]())
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_the_same_seed_gives_the_same_adapter_and_another_seed_another(case):
    first, again, other = _initial_state(case, 0), _initial_state(case, 0), _initial_state(case, 1)
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), f"{case}: {name} differs between two runs with seed 0"
    drawn = {name for name in first if name.endswith(DRAWN[case])}
    assert drawn, f"{case}: no trainable tensor is drawn at random"
    follows_seed = {name for name in first if not torch.equal(first[name], other[name])}
    assert follows_seed == drawn, (
        f"{case}: drawn but the same under seed 1: {sorted(drawn - follows_seed)}; "
        f"changed by the seed though not drawn: {sorted(follows_seed - drawn)}"
    )
