"""MoLA across architectures, under FSDP wrapping, and through the AutoPeftModel classes."""

import socket

import pytest
import torch
import torch.distributed as dist
from peft import (
    AutoPeftModelForSequenceClassification,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from tiny_models import TINY_DECODER, batch, clone_model, tiny_bert, tiny_llama, tiny_qwen3, tiny_roberta
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peft_depth
from peft_depth import MoLAConfig
from peft_depth.tuners.mola import MoLALinear

SMALL = {**TINY_DECODER, "max_position_embeddings": 64}


def _llama_family():
    torch.manual_seed(0)
    return {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**SMALL)),
        "qwen3": tiny_qwen3(),
        "mistral": MistralForCausalLM(MistralConfig(**SMALL)),
        "gemma2": Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8)),
    }


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma2"])
def test_llama_family_decoders(arch):
    base = _llama_family()[arch].eval()
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(clone_model(base), MoLAConfig(task_type="CAUSAL_LM", expert_pattern=[2, 4]))
    targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, MoLALinear)}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
    routers = [p.grad for n, p in model.named_parameters() if "mola_router" in n]
    assert routers and all(g is not None for g in routers)
    generated = model.eval().generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 11)


def test_auto_peft_model_for_sequence_classification(tmp_path):
    base = tiny_roberta()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        clone_model(base), MoLAConfig(task_type="SEQ_CLS", num_experts=4, top_k=2, init_lora_weights=False)
    )
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    inputs = batch()
    inputs["input_ids"][inputs["attention_mask"] == 0] = 1  # RoBERTa's pad id
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_bert_and_roberta_get_experts_in_every_encoder_layer():
    for base in (tiny_bert(), tiny_roberta()):
        model = get_peft_model(base, MoLAConfig(task_type="SEQ_CLS", expert_pattern=[2, 2, 4, 4]))
        layers = {m.mola_layer_index for m in model.modules() if isinstance(m, MoLALinear)}
        assert layers == {0, 1, 2, 3}


@pytest.fixture
def single_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_state_dict_round_trip_under_fsdp(single_process_group):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    base = tiny_llama()
    config = dict(task_type="CAUSAL_LM", expert_pattern=[2, 4], init_lora_weights=False)
    model = get_peft_model(clone_model(base), MoLAConfig(**config))
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adapter_state = get_peft_model_state_dict(model, state_dict=full)
    assert adapter_state and all(".mola_" in k for k in adapter_state)

    # into a plain model ...
    fresh = get_peft_model(clone_model(base), MoLAConfig(**{**config, "init_lora_weights": True}))
    result = set_peft_model_state_dict(fresh, adapter_state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "mola_" in k]
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=0, atol=0)

    # ... and back into an FSDP-wrapped one
    sharded = get_peft_model(clone_model(base), MoLAConfig(**{**config, "init_lora_weights": True}))
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    set_model_state_dict(sharded, full, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        torch.testing.assert_close(sharded(**inputs).logits, expected, rtol=0, atol=0)
