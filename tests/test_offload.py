"""A base whose weights accelerate offloads (``device_map`` with "disk") is refused by every method before anything
is built: MoLA/MoLEx/MoD read their LoRA tensors outside the offloaded modules' calls (uninitialised memory, no
error), DLO copied layers with their offload hooks (new layers ran the source's weights) and MoD copied the final norm
the same way. A ``device_map`` that offloads nothing keeps working."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_llama
from transformers import AutoModelForCausalLM

import peft_depth

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, target_modules=["q_proj"]),
    "molex": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
    "mod": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM", num_late_layers=2),
    "dlo": lambda: peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2),
}


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_disk_offloaded_base_is_refused_before_anything_is_built(saved_base, tmp_path, method):
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}
    base = AutoModelForCausalLM.from_pretrained(saved_base, device_map=device_map, offload_folder=str(tmp_path))
    modules_before = [name for name, _ in base.named_modules()]
    with pytest.raises(ValueError, match=r"weights accelerate offloads \(model\.layers\.1\..*Load the base"):
        get_peft_model(base, CONFIGS[method]())
    assert [name for name, _ in base.named_modules()] == modules_before


def test_a_device_map_that_offloads_nothing_is_accepted(saved_base):
    base = AutoModelForCausalLM.from_pretrained(saved_base, device_map={"": "cpu"})
    model = get_peft_model(base, CONFIGS["mola"]())
    with torch.no_grad():
        assert torch.isfinite(model(**batch()).logits).all()
