"""DLO's MLP skip on every layer layout transformers uses: the mask, the scale ŝ and the cosine labels apply to the
branch that joins the residual stream, ``h' + post_norm(mlp(pre_norm(h')))``, whichever norms a family puts around
its MLP (methods.md, DLO: label = cos(h', h' + MLP branch); output = h' + selected · ŝ · branch).

The truth is computed from the decoder layer itself, with no knowledge of its layout: ``y`` = the layer's output, and
``h'`` = its output with the MLP replaced by zeros (every family's post-MLP norm maps zero to zero). Before the fix,
Gemma-2/3 and OLMo-2 labels compared the attention output instead of ``h'``, and a post-MLP RMSNorm cancelled ŝ.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import VOCAB, batch, tiny_decoder
from torch import nn
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

import peft_depth
from peft_depth.core.layer_stack import find_layer_stack
from peft_depth.tuners.dlo import DLOConfig, DLOModel
from peft_depth.tuners.dlo.layer import DLOBlock

BUILDERS = {
    "llama": lambda: tiny_decoder(LlamaForCausalLM, LlamaConfig),
    "gemma2": lambda: tiny_decoder(Gemma2ForCausalLM, Gemma2Config, head_dim=8),
    "gemma3": lambda: tiny_decoder(Gemma3ForCausalLM, Gemma3TextConfig, head_dim=8),
    "olmo2": lambda: tiny_decoder(Olmo2ForCausalLM, Olmo2Config),
    "glm4": lambda: tiny_decoder(Glm4ForCausalLM, Glm4Config, head_dim=8),
    "gpt_neox": lambda: tiny_decoder(GPTNeoXForCausalLM, GPTNeoXConfig, use_parallel_residual=False),
    # adds its branches times residual_multiplier: the labels compare h' with h' + 0.22 · MLP branch
    "granite": lambda: tiny_decoder(GraniteForCausalLM, GraniteConfig, residual_multiplier=0.22),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128, pad_token_id=0,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ),
}  # fmt: skip


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[family]()
    with torch.no_grad():  # norms that are not the identity, so a norm put in the wrong place shows
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


class _ZeroMLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _output(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_mask_scale_and_labels_apply_to_the_mlp_branch_that_joins_the_residual(family, training):
    """In training every token runs and the skipped ones are masked; in eval only the selected tokens run the MLP."""
    model = get_peft_model(
        build(family),
        DLOConfig(
            task_type="CAUSAL_LM",
            routed_layers="all",
            capacity=0.5,
            capacity_annealing_steps=0,
            scale_gap=1.0,
            inference_selection="capacity",  # half the tokens in eval too, whatever the random routers score
        ),
    )
    tuner: DLOModel = model.base_model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for router in tuner.dlo_routers["default"].values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 3.0)
    stack = find_layer_stack(model.base_model.model).layers  # the expanded stack DLO runs
    blocks = [block for block in stack if isinstance(block, DLOBlock) and block.router is not None]
    calls = {}
    handles = [
        block.register_forward_hook(
            lambda m, args, kwargs, out, b=block: calls.__setitem__(b, (args, kwargs, _output(out).detach())),
            with_kwargs=True,
        )
        for block in blocks
    ]
    model.train(training)
    model(**batch(batch_size=2, seq_len=7, left_pad=0), use_cache=False)  # the layers are called again below
    for handle in handles:
        handle.remove()
    assert len(calls) == len(blocks) >= 4
    for block, (args, kwargs, output) in calls.items():
        layer, hidden = block.inner, args[0]
        mlp_name = "mlp"
        with torch.no_grad():  # outside the block's call, its shadows pass everything through unchanged
            full = _output(layer(hidden, *args[1:], **kwargs))
            shadow = layer.__dict__[mlp_name]
            object.__setattr__(layer, mlp_name, _ZeroMLP())
            try:
                residual = _output(layer(hidden, *args[1:], **kwargs))
            finally:
                object.__setattr__(layer, mlp_name, shadow)
        record = block.last_record
        width = hidden.shape[-1]
        h, y = residual.reshape(-1, width), full.reshape(-1, width)
        if training:
            torch.testing.assert_close(record.cos, F.cosine_similarity(h, y, dim=-1), atol=1e-5, rtol=1e-5)
        scale = 1.0 + 1.0 * (torch.sigmoid(record.logits.detach()) - 0.5)
        gate = (record.selected.float() * scale).unsqueeze(-1)
        assert 0 < int(record.selected.sum()) < record.selected.numel()  # some tokens skipped, some scaled
        torch.testing.assert_close(output.reshape(-1, width), h + gate * (y - h), atol=1e-5, rtol=1e-5)


def test_a_parallel_residual_layer_is_refused_for_mlp_skipping_naming_the_way_out():
    base = tiny_decoder(GPTNeoXForCausalLM, GPTNeoXConfig, use_parallel_residual=True)
    with pytest.raises(ValueError, match=r"in parallel.*use_parallel_residual.*skip_mode='block'"):
        get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", routed_layers="all"))
    model = get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", routed_layers="all", skip_mode="block"))
    assert model(**batch(batch_size=1, seq_len=4, left_pad=0)).logits.isfinite().all()


ZERO_OUT_FAMILIES = {
    "gpt_neox": lambda: tiny_decoder(GPTNeoXForCausalLM, GPTNeoXConfig),  # attention.dense
    "falcon": lambda: tiny_decoder(FalconForCausalLM, FalconConfig, new_decoder_architecture=False),  # .dense
    "phi": lambda: tiny_decoder(PhiForCausalLM, PhiConfig),  # self_attn.dense
    "gptj": lambda: tiny_decoder(GPTJForCausalLM, GPTJConfig, n_embd=32, n_layer=4, n_head=4, rotary_dim=4),  # fc_out
}


@pytest.mark.parametrize("family", list(ZERO_OUT_FAMILIES))
def test_zero_out_new_layers_start_as_an_identity_on_every_family(family):
    """The default init='zero_out' zeroes each branch's output projection; these families name theirs `dense` or
    `fc_out`, and only half of each new layer used to be zeroed (logits up to 0.23 off the base; BLOOM, also affected,
    is now refused as an ALiBi decoder)."""
    base = ZERO_OUT_FAMILIES[family]().eval()
    inputs = batch(left_pad=0)
    with torch.no_grad():
        expected = base(**inputs).logits
        model = get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="none")).eval()
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_default_zero_out_names_that_miss_a_branch_are_refused(monkeypatch):
    from peft_depth.tuners.dlo import expansion

    monkeypatch.setattr(expansion, "DEFAULT_ZERO_OUT_MODULES", ("o_proj",))  # a family whose MLP output is unknown
    with pytest.raises(ValueError, match="zeroes no projection in mlp of LlamaDecoderLayer"):
        get_peft_model(BUILDERS["llama"](), DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="none"))
    # naming the modules explicitly is the way out
    get_peft_model(
        BUILDERS["llama"](),
        DLOConfig(
            task_type="CAUSAL_LM", expand_every=2, routed_layers="none", zero_out_modules=["o_proj", "down_proj"]
        ),
    )


@pytest.mark.parametrize("new_decoder_architecture", [False, True])
def test_block_skip_keeps_a_tuple_returning_layer_s_output_structure(new_decoder_architecture):
    """Falcon's layers return ``(hidden, attn_weights)`` and its stack reads ``outputs[0]``: block skip used the tuple
    as a tensor (crash) and must hand the stack the same structure back."""
    base = tiny_decoder(FalconForCausalLM, FalconConfig, new_decoder_architecture=new_decoder_architecture).eval()
    inputs = batch(left_pad=0)
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(base, DLOConfig(task_type="CAUSAL_LM", expand_every=2, skip_mode="block"))
    model.eval()
    with torch.no_grad():  # zero_out new layers: an identity whichever tokens run them
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    new_layer = next(iter(model.base_model.dlo_new_layers["default"].values()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in new_layer.parameters())


def _falcon_layers_take_alibi() -> bool:
    """transformers < 5.25 passes Falcon's ALiBi bias to each layer (``alibi=``); 5.25 adds it to the attention mask."""
    from transformers.models.falcon.modeling_falcon import FalconDecoderLayer

    return "alibi" in inspect.signature(FalconDecoderLayer.forward).parameters


@pytest.mark.parametrize("new_decoder_architecture", [False, True])
def test_block_skip_runs_alibi_falcon_exactly_or_refuses_it(new_decoder_architecture):
    """Where the bias comes as its own argument, block skip cannot pack it and refuses by name. Where transformers
    adds it to the attention mask, the packed call must carry it: with identity new layers and every token chosen, the
    logits are the base model's (they were 0.33 off when the packed mask kept only the keys with zero bias)."""
    config = dict(alibi=True, new_decoder_architecture=new_decoder_architecture)
    inputs = batch(left_pad=2)
    base = tiny_decoder(FalconForCausalLM, FalconConfig, **config)
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(
        tiny_decoder(FalconForCausalLM, FalconConfig, **config),
        DLOConfig(task_type="CAUSAL_LM", expand_every=2, skip_mode="block", routed_layers="all"),
    )
    model.eval()
    if _falcon_layers_take_alibi():
        with pytest.raises(ValueError, match="ALiBi position biases"):
            model(**inputs)
        return
    with torch.no_grad():
        logits = model(**inputs).logits
    assert peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction"] == 1
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-5)
