"""Tiny random models built from configs (no Hub access) for the test suite."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 128
#: The tiny decoder shape of the test models, for families built from their own config class (``tiny_decoder``).
TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)


def tiny_decoder(model_class, config_class, seed: int = 0, **overrides):
    """``model_class`` in eval mode, random weights from ``seed``, on ``TINY_DECODER`` with ``overrides``."""
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY_DECODER, **overrides})).eval()


def tiny_llama(
    num_layers: int = 4, seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64, **overrides
) -> LlamaForCausalLM:
    """``hidden_size`` >= 64 for bitsandbytes' CPU 4-bit kernels (they quantize in blocks of 64 inputs)."""
    return tiny_decoder(
        LlamaForCausalLM,
        LlamaConfig,
        seed,
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        **overrides,
    )


def tiny_qwen3(num_layers: int = 4, seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """Qwen3 with `layer_types` (sliding + full attention), for methods that must respect layer types."""
    return tiny_decoder(Qwen3ForCausalLM, Qwen3Config, seed, num_hidden_layers=num_layers, head_dim=8, **overrides)


def tiny_gpt2(num_layers: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=num_layers,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(num_layers: int = 4, seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_roberta(num_layers: int = 4, seed: int = 0, num_labels: int = 2) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=130,
        num_labels=num_labels,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh model of the same class and config carrying the same weights (for base-vs-adapter comparisons)."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def batch(batch_size: int = 2, seq_len: int = 7, seed: int = 1, left_pad: int = 2) -> dict[str, torch.Tensor]:
    """Random token ids with the first row left-padded by `left_pad` tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if left_pad:
        input_ids[0, :left_pad] = 0
        attention_mask[0, :left_pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words "w4" ... "w127" over the tiny models' vocabulary; specials named so no word contains
    one (an added token "w1" would otherwise split "w10")."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {name: i for i, name in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
