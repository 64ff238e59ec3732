"""DLO's new layers in float32 on a half-precision or quantized base, as peft keeps adapter weights.

A new layer trained in full (``new_layer_training='full'``) is an adapter weight: with peft's
``autocast_adapter_dtype=True`` (the default) its bf16/fp16 weights are kept in float32, like LoRA's, for stable
training. It then computes in float32 too: ``PrecisionBridge`` casts what enters it (hidden states, position
embeddings, a float attention mask) to the layer's dtype and its output back to the dtype of the stack around it,
as peft's LoRA layers hand back their output in the base layer's dtype. A layer in the stack's own dtype is not
bridged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .delegating import Delegating

__all__ = ["PrecisionBridge", "cast_floating", "new_layer_weight"]


def new_layer_weight(layer: nn.Module) -> torch.Tensor | None:
    """A floating weight of a new layer's own (its LoRA factors excluded): its dtype is the dtype the layer runs in."""
    for name, param in layer.named_parameters():
        if param.is_floating_point() and not name.endswith(("lora_A", "lora_B")):
            return param
    return None


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it (inside tuples, lists and dicts too) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(cast_floating(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


class PrecisionBridge(Delegating):
    """Runs ``inner`` (a new layer, or the ``DLOBlock`` around one) in the dtype of ``weight``.

    The dtype is read from the weight at each call, so a later ``model.to(dtype)`` that brings the layer back to the
    stack's dtype turns the bridge into a pass-through.
    """

    def __init__(self, inner: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self._weight = (weight,)  # a plain tuple: the weight is registered in the tuner's new layers

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtype = self._weight[0].dtype
        outer = hidden_states.dtype
        if outer == dtype or not hidden_states.is_floating_point():
            return self.inner(hidden_states, *args, **kwargs)
        output = self.inner(hidden_states.to(dtype), *cast_floating(args, dtype), **cast_floating(kwargs, dtype))
        return cast_floating(output, outer)
