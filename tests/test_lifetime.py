"""A deleted model is freed: the per-forward contexts (kept per thread, see core/forward_context.py) must not keep a
model's layers, and with them its base weights, alive after the model is gone."""

from __future__ import annotations

import copy
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import get_peft_model
from tiny_models import batch, tiny_llama

import peft_depth

CONFIGS = {
    "mola": lambda: peft_depth.MoLAConfig(r=2, target_modules=["q_proj"]),
    "molex": lambda: peft_depth.MoLExConfig(r=2, target_modules=["q_proj"]),
    "mod": lambda: peft_depth.MoDConfig(num_late_layers=2, r=2, target_modules=["q_proj"]),
    "dlo": lambda: peft_depth.DLOConfig(expand_every=2, r=2, target_modules=["q_proj"]),
}


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def _targeted_layer(model) -> torch.nn.Module:
    return model.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_deleted_model_is_freed_after_a_forward(method):
    model = get_peft_model(tiny_llama(), CONFIGS[method]())
    _run(model)
    layer, base = weakref.ref(_targeted_layer(model)), weakref.ref(model.get_base_model())
    del model
    gc.collect()
    assert layer() is None and base() is None  # MoLA's routing records kept its layers (and their weights) alive


def test_a_model_run_in_another_thread_is_freed_at_that_thread_next_forward():
    """The collecting thread drops its own context at once; a worker thread drops the dead model's at its next forward
    of any tracked model."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        model = get_peft_model(tiny_llama(), CONFIGS["mola"]())
        worker.submit(_run, model).result()
        layer = weakref.ref(_targeted_layer(model))
        del model
        gc.collect()
        other = get_peft_model(tiny_llama(), CONFIGS["mola"]())
        worker.submit(_run, other).result()
        gc.collect()
        assert layer() is None


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_deep_copy_after_a_forward_is_independent_and_freed(method):
    model = get_peft_model(tiny_llama(), CONFIGS[method]()).eval()
    expected = _run(model)
    duplicate = copy.deepcopy(model)
    assert torch.equal(_run(duplicate), expected)
    layer = weakref.ref(_targeted_layer(duplicate))
    del duplicate
    gc.collect()
    assert layer() is None
    assert torch.equal(_run(model), expected)  # the original keeps working, with its own context


@pytest.mark.parametrize("method", ["mola", "mod"])
def test_a_pickled_and_loaded_model_is_another_model_with_its_own_contexts(method):
    """torch.save(model) / torch.load: the loaded model computes what the saved one did, keeps its own per-forward
    contexts (not the original's key), and is freed when deleted."""
    import io

    model = get_peft_model(tiny_llama(), CONFIGS[method]()).eval()
    expected = _run(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_run(loaded), expected)
    assert loaded.base_model.routing_context.forward is not model.base_model.routing_context.forward
    layer = weakref.ref(_targeted_layer(loaded))
    del loaded
    gc.collect()
    assert layer() is None
    assert torch.equal(_run(model), expected)
