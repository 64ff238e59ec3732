"""A plain LoRA layer for the methods that carry LoRA next to their block-level machinery (MoLEx, MoD, DLO).

Parameters keep LoRA's ``lora_`` names; A and B are stored as single tensors (``[r, in]``, ``[out, r]``) and use the
same math as MoLA's experts (``core.low_rank``), so there is one implementation of the low-rank update.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapter_placement import DtypeKeepingPlacement
from .low_rank import init_low_rank, linear_features, low_rank_delta
from .quantization import check_merge_into_quantized

__all__ = ["DepthLoraLayer", "DepthLoraLinear", "WeightDeltaMerge", "storage_layout"]


def storage_layout(delta: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
    """An ``[out, in]`` weight update in the base layer's storage layout (``[in, out]`` for GPT-2's Conv1D)."""
    return delta.T if isinstance(base_layer, Conv1D) else delta


class WeightDeltaMerge:
    """``merge`` / ``unmerge`` for a tuner layer whose adapter is a fixed weight delta (``get_delta_weight``)."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        # The model-level merges refuse quantized bases; a layer's own merge must too: adding a float delta to
        # bitsandbytes storage truncates it to 0 on 8-bit (the layer would count as merged and stop adapting) and
        # does not fit the packed 4-bit layout.
        check_merge_into_quantized(self, f"The adapter of this {type(self).__name__}")
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in getattr(self, self.adapter_layer_names[0]):
                continue
            weight = self.get_base_layer().weight
            merged = weight.data + self.get_delta_weight(adapter_name).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter_name} seems to be broken.")
            weight.data = merged
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data -= self.get_delta_weight(adapter_name).to(weight.dtype)


class DepthLoraLayer(DtypeKeepingPlacement, BaseTunerLayer):
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("lora_r", "lora_scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        #: peft's switch for casting the input to the adapter's dtype (peft.helpers.disable_input_dtype_casting)
        self.cast_input_dtype_enabled = True
        self.lora_A = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_dropout = nn.ModuleDict({})
        self.lora_r: dict[str, int] = {}
        self.lora_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool,
        inference_mode: bool = False,
    ) -> None:
        self.lora_r[adapter_name] = r
        self.lora_scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name].train(self.training)
        lora_A = torch.empty(r, self.in_features)
        lora_B = torch.empty(self.out_features, r)
        init_low_rank(lora_A, lora_B, r, zero_B=init_lora_weights)
        self.lora_A[adapter_name] = nn.Parameter(lora_A)
        self.lora_B[adapter_name] = nn.Parameter(lora_B)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Weight update in the base layer's storage layout (``[out, in]``, or ``[in, out]`` for Conv1D)."""
        delta = (self.lora_B[adapter_name] @ self.lora_A[adapter_name]) * self.lora_scaling[adapter_name]
        return storage_layout(delta, self.get_base_layer())


class DepthLoraLinear(WeightDeltaMerge, nn.Module, DepthLoraLayer):
    """``y = W0 x + B A dropout(x) · α/r`` on an ``nn.Linear`` or ``Conv1D``; mergeable."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **update_kwargs: Any) -> None:
        super().__init__()
        DepthLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **update_kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.lora_A:
                continue
            lora_A = self.lora_A[adapter_name]
            x_flat = self._cast_input_dtype(x.reshape(-1, self.in_features), lora_A.dtype)
            delta = low_rank_delta(
                x_flat,
                lora_A,
                self.lora_B[adapter_name],
                self.lora_scaling[adapter_name],
                self.lora_dropout[adapter_name],
            )
            result = result + delta.view(result.shape).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "depth_lora." + super().__repr__()
