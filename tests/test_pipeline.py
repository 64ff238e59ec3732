"""transformers' ``pipeline`` with peft-depth adapters: an in-memory ``PeftModel`` works for every method;
``pipeline(model=ADAPTER_DIR)`` (transformers' own adapter loader) is refused and says to load with
``PeftModel.from_pretrained``."""

from __future__ import annotations

import pytest
import torch
from hub_cases import METHODS, adapted, perturb_adapter
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, pipeline


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", unk_token="w1", eos_token="w2")


PROMPT = "w5 w6 w7 w9"


def _greedy_text(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _adapted_with_other_text(method: str):
    """An adapted model whose greedy text differs from the base's, so that a pipeline that ran the base is seen
    (the common 0.05 perturbation leaves MoD's four greedy tokens as the base's)."""
    model, pristine = adapted(method)
    perturb_adapter(model, seed=1, scale=0.5)
    assert _greedy_text(model, _tokenizer()) != _greedy_text(pristine, _tokenizer())
    return model, pristine


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_accepts_a_depth_peft_model(method):
    model, _ = _adapted_with_other_text(method)
    tokenizer = _tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(PROMPT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.replace(" ", "") == _greedy_text(model, tokenizer).replace(" ", "")


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_from_an_adapter_folder_names_peft_model_from_pretrained(tmp_path, method):
    """``pipeline(model=ADAPTER_DIR)`` loads through transformers' load_adapter, which runs none of peft-depth's load
    checks (MoLA included): refused, naming the load that works."""
    model, pristine = _adapted_with_other_text(method)
    tokenizer = _tokenizer()
    pristine.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"PeftModel\.from_pretrained"):
        pipeline("text-generation", model=str(tmp_path / "adapter"))
