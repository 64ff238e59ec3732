"""The one place that knows how transformers hands a block its KV cache, and the guards around it.

transformers 5.24 renamed the decoder layers' cache argument (``past_key_values`` -> ``cache``); code that looked for
one name silently stopped seeing the cache. These tests pin the behaviour down: the cache is found by what it is,
an unrecognised convention raises ``CallConventionError`` naming the transformers version, and activation
checkpointing (which drops the cache on purpose) stays quiet.
"""

import warnings

import pytest
import torch
import transformers
from peft import get_peft_model
from tiny_models import batch, tiny_gpt2, tiny_llama
from transformers.cache_utils import DynamicCache
from warning_guard import GUARD

from peft_depth import DLOConfig, MoLExConfig
from peft_depth.core.layer_call import CACHE_KEYWORDS, CallConventionError, bind_block_call, output_cache


def molex(model, **kwargs):
    return get_peft_model(model, MoLExConfig(task_type="CAUSAL_LM", molex_layers=[1, 2], **kwargs))


def _layers(model):
    return model.base_model.layer_stack.layers


def _rename_cache_to(model, keyword: str | None, blocks=None):
    """Pre-hooks on every block (or ``blocks``) moving the cache to ``keyword`` (None: dropping it, ``use_cache`` left on)."""

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        for name in CACHE_KEYWORDS:
            cache = kwargs.pop(name, None)
            if cache is not None:
                if keyword is not None:
                    kwargs[keyword] = cache
                kwargs["use_cache"] = True
        return args, kwargs

    blocks = _layers(model) if blocks is None else blocks
    return [block.register_forward_pre_hook(hook, with_kwargs=True) for block in blocks]


def test_the_cache_is_found_under_any_known_keyword_and_positionally():
    block = tiny_llama().model.layers[0]
    hidden = torch.zeros(1, 3, 32)
    cache = DynamicCache()
    for keyword in ("cache", "past_key_values"):
        call = bind_block_call(block, block.forward, (hidden,), {keyword: cache, "use_cache": True})
        assert call.cache is cache and call.without_cache()["use_cache"] is False
        assert all(value is not cache for value in call.without_cache().values())
    gpt2_block = tiny_gpt2().transformer.h[0]
    call = bind_block_call(gpt2_block, gpt2_block.forward, (hidden, cache), {"use_cache": True})  # GPT-2: positional
    assert call.cache is cache and call.cache_keyword in CACHE_KEYWORDS


def test_a_cache_under_an_unknown_keyword_raises_naming_the_transformers_version():
    model = molex(tiny_llama(), routing="token").eval()
    handles = _rename_cache_to(model, "kv_state")
    with pytest.raises(CallConventionError, match=rf"transformers {transformers.__version__}.*'kv_state'"):
        model(**batch())
    for handle in handles:
        handle.remove()
    model(**batch())  # the normal convention works again


def test_use_cache_without_a_cache_raises_outside_checkpointing():
    model = molex(tiny_llama()).eval()
    _rename_cache_to(model, None)
    with pytest.raises(CallConventionError, match="`use_cache` is on but no `transformers.Cache` reached the block"):
        model(**batch())


def test_dlo_block_skipping_checks_the_same_convention():
    model = get_peft_model(tiny_llama(), DLOConfig(task_type="CAUSAL_LM", expand_every=2, skip_mode="block"))
    model.eval()
    _rename_cache_to(model, "kv_state", model.base_model._dlo["blocks"])  # the expanded stack's routed blocks
    with pytest.raises(CallConventionError, match="'kv_state'"):
        model(**batch(), use_cache=True)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_guard_stays_quiet_under_activation_checkpointing(factory):
    """GPT-2 drops the cache before its blocks under checkpointing while `use_cache` stays on; Llama drops it inside
    the block. Both train exactly as without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = molex(factory(), init_lora_weights=False, lora_dropout=0.0, target_modules=None)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        inputs = batch()
        loss = model(**inputs, labels=inputs["input_ids"], use_cache=True).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name])


def test_output_cache_reads_either_field_name():
    cache = DynamicCache()
    model = tiny_llama()
    out = model(**batch(), use_cache=True)
    assert output_cache(out) is not None
    assert output_cache({"logits": torch.zeros(1), "past_key_values": cache}) is cache
    assert output_cache({"logits": torch.zeros(1)}) is None


# ------------------------------------------------------------------------------------------------ the warning guard


class _DeprecatedOutput(dict):
    """An output object whose ``values()`` is a deprecated API (a stand-in for a renamed transformers field)."""

    def values(self):
        warnings.warn("`values` is deprecated", FutureWarning, stacklevel=2)
        return super().values()


@pytest.mark.allow_peft_depth_deprecations
def test_the_warning_guard_catches_a_deprecation_our_code_causes():
    GUARD.take()
    output_cache(_DeprecatedOutput(cache=None))  # peft_depth calls the deprecated method
    caught = GUARD.take()
    assert len(caught) == 1 and "values" in caught[0].message and caught[0].our_frame.startswith("core/layer_call.py")


@pytest.mark.allow_peft_depth_deprecations
def test_the_warning_guard_ignores_deprecations_other_code_causes():
    GUARD.take()
    _DeprecatedOutput(cache=None).values()  # the test itself calls it: not peft_depth's doing
    warnings.warn("a user warning from anywhere", UserWarning, stacklevel=1)
    assert GUARD.take() == []


def test_binding_calls_keeps_no_model_alive_and_no_cache_growth():
    """The signature cache is keyed by functions, never by the blocks a forward is bound to: a MoLEx model (whose
    expert calls bind a fresh ``functools.partial`` per call) is freed once dropped, and calls add no entries."""
    import gc
    import weakref

    from peft_depth.core import layer_call

    base = tiny_llama()
    model = molex(base)
    model(**batch())
    entries = len(layer_call._SIGNATURES)
    model(**batch())
    assert len(layer_call._SIGNATURES) == entries
    freed = weakref.ref(base)
    del model, base
    gc.collect()
    assert freed() is None


def test_a_bound_forward_and_a_partial_of_its_function_bind_alike():
    import functools

    block = tiny_llama().model.layers[0]
    hidden = torch.zeros(1, 2, 32)
    for forward in (block.forward, functools.partial(type(block).forward, block), block.forward):
        call = bind_block_call(block, forward, (hidden,), {"use_cache": False})
        assert call.hidden is hidden and call.arguments["use_cache"] is False
