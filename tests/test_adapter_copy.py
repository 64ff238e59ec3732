"""copy_adapter, and TRL's preference trainers building their reference adapter from a trained one.

TRL's DPO/GRPO/KTO/RLOO trainers, given a PeftModel and no reference model, add an adapter "ref" with the "default"
adapter's config and copy the parameters whose names contain ".default." into it. The low-rank weights of these methods
are ParameterDict entries ("...mola_A.default", no trailing dot), which that test skipped: the reference kept its fresh
initialisation (MoLA: the base model; MoLEx: neither base nor adapter) and DPO's loss at step 0 was not ln 2.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from tiny_models import batch, tiny_llama, word_tokenizer

import peft_depth

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, expert_pattern=[2, 4], top_k=1),
    "molex": lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=4),
    "mod_lora": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]),
    "dlo_lora": lambda: peft_depth.DLOConfig(task_type="CAUSAL_LM", r=4, new_layer_training="lora"),
    "mod": lambda: peft_depth.MoDConfig(task_type="CAUSAL_LM"),
}


def trained(model: PeftModel, seed: int = 1) -> PeftModel:
    """Moves every trainable weight, as training would (a fresh adapter's zero B would hide a skipped copy)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def adapter_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in get_peft_model_state_dict(model, adapter_name=name).items()}


def logits_with(model: PeftModel, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.set_adapter(name)
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def preference_rows() -> Dataset:
    rows = []
    for i in range(4):
        prompt = " ".join(f"w{5 * i + j}" for j in range(3))
        rows.append({"prompt": prompt, "chosen": f" w{5 * i + 3} w{5 * i + 4}", "rejected": f" w{90 - i}"})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_copy_adapter_makes_the_target_compute_exactly_the_source(method):
    model = trained(get_peft_model(tiny_llama(), CONFIGS[method]()))
    model.add_adapter("other", CONFIGS[method]())
    inputs = batch()
    assert not torch.equal(logits_with(model, "other", inputs), logits_with(model, "default", inputs))
    copied = peft_depth.copy_adapter(model, "default", "other")
    assert copied > 0
    source, target = adapter_state(model, "default"), adapter_state(model, "other")
    assert source.keys() == target.keys()
    assert all(torch.equal(source[key], target[key]) for key in source)
    assert torch.equal(logits_with(model, "other", inputs), logits_with(model, "default", inputs))


def test_copy_adapter_includes_modules_to_save_and_keeps_the_target_frozen():
    def config():
        return peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, num_experts=2, modules_to_save=["lm_head"])

    model = trained(get_peft_model(tiny_llama(), config()))
    model.add_adapter("other", config())
    peft_depth.copy_adapter(model, "default", "other")
    wrapper = model.base_model.model.lm_head
    assert torch.equal(wrapper.modules_to_save["other"].weight, wrapper.modules_to_save["default"].weight)
    assert not any(param.requires_grad for name, param in model.named_parameters() if ".other" in name)


def test_copy_adapter_refuses_what_it_cannot_copy_before_copying_anything():
    model = get_peft_model(tiny_llama(), peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, num_experts=2))
    with pytest.raises(ValueError, match="no adapter named 'ref'"):
        peft_depth.copy_adapter(model, "default", "ref")
    model.add_adapter("wider", peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=8, num_experts=2))
    before = adapter_state(model, "wider")
    with pytest.raises(ValueError, match=r"mola_A.<adapter> is \(8, \d+\) in 'default' and \(16, \d+\) in 'wider'"):
        peft_depth.copy_adapter(model, "default", "wider")
    after = adapter_state(model, "wider")
    assert all(torch.equal(before[key], after[key]) for key in before)
    with pytest.raises(ValueError, match="both 'default'"):
        peft_depth.copy_adapter(model, "default", "default")


def test_a_user_adding_an_adapter_named_ref_gets_a_fresh_one_as_with_lora():
    # only TRL's idiom (called from trl.trainer, with the very config object of "default") copies
    model = trained(get_peft_model(tiny_llama(), CONFIGS["mola"]()))
    model.add_adapter("ref", model.peft_config["default"])
    # fresh means initialised, not copied: every expert's B starts at zero, so "ref" computes the base model
    fresh = adapter_state(model, "ref")
    assert [key for key in fresh if "mola_B" in key] and all(
        torch.count_nonzero(value) == 0 for key, value in fresh.items() if "mola_B" in key
    )
    inputs = batch()
    model.set_adapter("ref")
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        base = model(**inputs).logits
    assert torch.equal(logits_with(model, "ref", inputs), base)
    assert not torch.allclose(logits_with(model, "default", inputs), base)


@pytest.mark.parametrize(
    "method, dtype",
    [(m, torch.float32) for m in ("mola", "molex", "mod_lora", "dlo_lora")]
    # peft upcasts the new adapter after injecting it: a copy made before went into bf16 tensors (MoLA: 0.689)
    + [("mola", torch.bfloat16), ("molex", torch.float16)],
)
def test_dpo_reference_adapter_is_the_trained_adapter(method, dtype, tmp_path):
    trl = pytest.importorskip("trl")
    model = trained(get_peft_model(tiny_llama().to(dtype), CONFIGS[method]()))
    inputs = batch()
    expected = logits_with(model, "default", inputs)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        beta=0.1,
    )
    trainer = trl.DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=preference_rows(), processing_class=word_tokenizer()
    )
    assert not any(param.requires_grad for name, param in model.named_parameters() if ".ref" in name)
    source, reference = adapter_state(model, "default"), adapter_state(model, "ref")
    assert source.keys() == reference.keys()
    assert [key for key in source if not torch.equal(source[key], reference[key])] == []
    assert torch.equal(logits_with(model, "ref", inputs), expected)
    # at step 0 the policy is its own reference: DPO's loss is exactly ln 2
    model.set_adapter("default")
    model.train()
    loss = trainer.compute_loss(model, next(iter(trainer.get_train_dataloader())))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def test_a_failed_trl_add_leaves_no_copy_pending_for_a_later_ref_adapter(monkeypatch):
    model = trained(get_peft_model(tiny_llama(), CONFIGS["mola"]()))
    # TRL's idiom, from a frame of a trl.trainer module
    namespace = {"__name__": "trl.trainer.fake_trainer"}
    exec("def add_reference(model):\n    model.add_adapter('ref', model.peft_config['default'])\n", namespace)
    tuner = model.base_model
    monkeypatch.setattr(type(tuner), "_cast_adapter_dtype", lambda *a, **k: (_ for _ in ()).throw(OSError("cast")))
    with pytest.raises(OSError, match="cast"):  # peft's add_adapter does not roll back when the cast fails
        namespace["add_reference"](model)
    monkeypatch.undo()
    model.delete_adapter("ref")
    model.add_adapter("ref", CONFIGS["mola"]())  # a user's own adapter of that name: fresh, as with LoRA
    source, fresh = adapter_state(model, "default"), adapter_state(model, "ref")
    assert not any(torch.equal(source[key], fresh[key]) for key in source if "mola_B" in key)
