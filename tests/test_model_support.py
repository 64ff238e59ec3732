"""Models a method cannot serve are refused by name before anything is built, where they used to give wrong answers.

- Encoder-decoder models (T5, BART): the padding mask of a decoder layer was the encoder's (decoder tokens skipped
  MoLEx's mixture, MoLA's balance statistics counted the wrong tokens), and T5's expert passes ran without its
  position bias.
- DLO on an encoder: its block skip made BERT's attention causal whenever the batch had no padding.
- ALiBi decoders (BLOOM, MPT): their layers take a position bias per call that the rebuilt calls do not carry.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_bert
from transformers import BloomConfig, BloomForCausalLM, T5Config, T5ForConditionalGeneration

from peft_depth import DLOConfig, MoDConfig, MoLAConfig, MoLExConfig


def _t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )


def _bloom() -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))


@pytest.mark.parametrize(
    "config",
    [
        MoLAConfig(task_type="SEQ_2_SEQ_LM", num_experts=2, target_modules=["q", "v"]),
        MoLExConfig(task_type="SEQ_2_SEQ_LM"),
        DLOConfig(task_type="SEQ_2_SEQ_LM"),
        MoDConfig(task_type="SEQ_2_SEQ_LM"),
    ],
    ids=["mola", "molex", "dlo", "mod"],
)
def test_encoder_decoder_models_are_refused(config):
    model = _t5()
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        get_peft_model(model, config)
    assert not any("mola" in n or "molex" in n for n, _ in model.named_modules())  # nothing was built
    get_peft_model(_t5(), LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"]))  # plain LoRA serves it


@pytest.mark.parametrize("skip_mode", ["block", "mlp"])
def test_dlo_refuses_an_encoder(skip_mode):
    with pytest.raises(ValueError, match="DLO needs a decoder whose attention declares `is_causal`; BertLayer"):
        get_peft_model(tiny_bert(), DLOConfig(task_type="SEQ_CLS", skip_mode=skip_mode, init="copy"))


def test_alibi_decoders_are_refused_by_dlo_and_molex():
    with pytest.raises(ValueError, match="BloomBlock does not"):
        get_peft_model(_bloom(), DLOConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="BloomForCausalLM generates text, but its layers do not declare causal"):
        get_peft_model(_bloom(), MoLExConfig(task_type="CAUSAL_LM", target_modules=["query_key_value"]))


def test_encoders_still_serve_molex_and_mola():
    for config in (MoLExConfig(task_type="SEQ_CLS"), MoLAConfig(task_type="SEQ_CLS", num_experts=2)):
        model = get_peft_model(tiny_bert(), config)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
