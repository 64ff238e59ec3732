"""Where a loaded or new adapter's tensors go, so that a ``low_cpu_mem_usage`` load gives what a plain load gives.

A plain load copies each saved tensor into the adapter built for it, converting to that adapter's dtype (float32 under
peft's ``autocast_adapter_dtype``, else the base layer's). peft's ``low_cpu_mem_usage=True`` load instead builds the
adapter on the meta device, *assigns* the saved tensors (keeping their dtype) and then moves each layer adapter to its
base layer's device and dtype, rounding float32 weights through bf16/fp16 before ``_cast_adapter_dtype`` upcasts them
again: on a half-precision base every loaded weight differed from the saved one (peft 0.21.2's own LoRA still does).

Here each meta placeholder is given its final dtype when built (:meth:`DtypeKeepingPlacement._place_adapter`), an
assigned tensor takes its placeholder's dtype (:func:`saved_tensors_take_placeholder_dtypes`, a load pre-hook on the
tuner) and the move after the load sets the device only.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from .trainability import requires_grad_kept

__all__ = ["DtypeKeepingPlacement", "saved_tensors_take_placeholder_dtypes"]


class DtypeKeepingPlacement:
    """Mixin (listed before ``BaseTunerLayer``) for the package's tuner layers."""

    def _place_adapter(self, adapter_name: str) -> None:
        """Put a newly built adapter on the base layer's device and float dtype, as peft does; a meta placeholder
        (``low_cpu_mem_usage``) gets the dtype only (peft leaves it as built)."""
        self._relocate(adapter_name, None, with_dtype=True)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        # peft's entry after a low_cpu_mem_usage load has assigned the saved tensors: the device only, so the values
        # arrive in the dtype the placeholder had (a half-precision round trip here changed every weight)
        self._relocate(adapter_name, device, with_dtype=False)

    def _relocate(self, adapter_name: str, device: Any, *, with_dtype: bool) -> None:
        base_device, base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        device = device if device is not None else base_device
        dtype = base_dtype if with_dtype and base_dtype is not None and base_dtype.is_floating_point else None
        if device is None:
            return  # as peft: no device can be told, nothing is moved
        # peft re-assigns the ParameterDict entries as new, trainable Parameters (core.trainability)
        with requires_grad_kept(self):
            for attribute in self.adapter_layer_names + self.other_param_names:
                container = getattr(self, attribute, None)
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                    continue
                item = container[adapter_name]
                tensors = list(item.parameters()) if isinstance(item, nn.Module) else [item]
                target: dict[str, Any] = {}
                if not any(tensor.is_meta for tensor in tensors):
                    target["device"] = device
                if dtype is not None and all(tensor.is_floating_point() for tensor in tensors):
                    target["dtype"] = dtype
                if target and tensors:
                    container[adapter_name] = item.to(**target)


def saved_tensors_take_placeholder_dtypes(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: dict[str, Any], *_: Any
) -> None:
    """Load pre-hook: under ``load_state_dict(assign=True)`` a saved float tensor takes the dtype of the tensor it
    replaces, as copying into that tensor would give it."""
    if not local_metadata.get("assign_to_params_buffers"):
        return
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        saved = state_dict.get(prefix + name)
        if (
            saved is not None
            and saved.dtype != tensor.dtype
            and saved.is_floating_point()
            and tensor.is_floating_point()
        ):
            state_dict[prefix + name] = saved.to(tensor.dtype)
