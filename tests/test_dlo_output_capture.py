"""Each layer of a DLO model reports its hidden state and attention map once, however the model got there.

transformers records ``output_hidden_states`` / ``output_attentions`` with hooks it installs on the registered layers
at the first forward that asks. New layers copied from an original that already had those hooks carried them along
(and got DLO's own set too), and a merged dense expansion kept DLO's set and then got transformers' own: both
reported the new layers twice, with the logits unchanged.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import batch, clone_model, tiny_llama
from transformers import LlamaForCausalLM

from peft_depth import DLOConfig

CONFIGS = {
    "dense": dict(expand_every=2, routed_layers="none"),
    "routed": dict(expand_every=2),
}


def _eager_base() -> LlamaForCausalLM:
    base = tiny_llama()
    base.config._attn_implementation = "eager"
    return base


def _recorded(model):
    with torch.no_grad():
        return model(**batch(), output_hidden_states=True, output_attentions=True)


def _trained(model) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_an_adapter_loaded_onto_a_base_that_already_recorded_reports_each_layer_once(tmp_path, kind):
    model = get_peft_model(_eager_base(), DLOConfig(task_type="CAUSAL_LM", **CONFIGS[kind]))
    _trained(model)
    model.eval()
    own = _recorded(model)
    assert len(own.hidden_states) == 7 and len(own.attentions) == 6  # 4 layers + 2 new, and the embeddings
    model.save_pretrained(tmp_path)
    used = _eager_base()
    _recorded(used)  # e.g. a logit lens on the base first: transformers hooks its layers now
    loaded = PeftModel.from_pretrained(used, tmp_path).eval()
    again = _recorded(loaded)
    assert len(again.hidden_states) == 7 and len(again.attentions) == 6
    for mine, theirs in zip(again.hidden_states, own.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("recorded_before_merge", [False, True], ids=["fresh", "recorded_before"])
def test_a_merged_dense_expansion_reports_like_a_plain_model_of_its_depth(recorded_before_merge):
    model = get_peft_model(_eager_base(), DLOConfig(task_type="CAUSAL_LM", **CONFIGS["dense"]))
    _trained(model)
    model.eval()
    if recorded_before_merge:
        _recorded(model)
    merged = model.merge_and_unload().eval()
    plain = clone_model(merged)
    plain.config._attn_implementation = "eager"
    mine, theirs = _recorded(merged), _recorded(plain)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 7
    assert len(mine.attentions) == len(theirs.attentions) == 6
    for a, b in zip(mine.hidden_states + mine.attentions, theirs.hidden_states + theirs.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for layer in merged.model.layers:
        assert not [key for key in vars(layer) if "output_capture" in key]


def test_a_transformers_without_its_output_recording_module_is_refused_when_outputs_are_asked_for(monkeypatch):
    """If transformers stops recording layer outputs through the module DLO hooks its new layers with, a forward
    that reports hidden states or attention maps would silently lack the new layers: it raises instead, and a plain
    forward still runs."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers.utils.output_capturing", None)  # its import now fails
    model = get_peft_model(_eager_base(), DLOConfig(task_type="CAUSAL_LM", **CONFIGS["routed"])).eval()
    with torch.no_grad():
        plain = model(**batch())
    assert plain.hidden_states is None and torch.isfinite(plain.logits).all()
    with pytest.raises(RuntimeError, match="hidden_states and attentions.*would be missing"):
        _recorded(model)
