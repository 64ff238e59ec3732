"""Which of a DLO adapter's tensors are saved, and how a load finds the ones that were not.

The config, never the tensor values, fixes the saved keys: with ``new_layer_training='full'`` every weight of the
new layers is saved; with ``'lora'`` the frozen copies are left out (a load rebuilds them from the base model when the
adapter is injected) and their LoRA is saved.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["AdapterStateDict"]

_NEW_KEY = re.compile(r"(^|\.)dlo_new_layers\.(?P<adapter>[^.]+)\.(?P<layer>new\d+)\.(?P<rest>.+)$")


class AdapterStateDict:
    """Mixin of ``DLOModel``: peft's save and load hooks (``_get_adapter_state_dict``, the load remap)."""

    @classmethod
    def _find_tuner(cls, model: nn.Module) -> Any:
        for module in model.modules():
            if isinstance(module, cls):
                return module
        return None

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's keys are fixed by its config, never by tensor values: with ``new_layer_training='full'``
        every weight of the new layers is saved; with ``'lora'`` the frozen copies are left out (a load rebuilds them
        from the base model) and their LoRA is saved. A load then refuses any missing key."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.new_layer_training == "full":
            return selected
        kept = {}
        for key, value in selected.items():
            match = _NEW_KEY.search(key)
            if match is not None and match.group("adapter") == adapter_name and "lora_" not in match.group("rest"):
                continue  # a frozen copy of an original layer: rebuilt from the base model on load
            kept[key] = value
        return kept

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = cls._find_tuner(model)
        if tuner is None or adapter_name not in getattr(tuner, "dlo_new_layers", {}):
            return remapped
        # Tensors left out of the checkpoint were rebuilt from the base model when the adapter was injected: load
        # them as they are, so that peft does not report them missing.
        own_prefix = next((n for n, m in model.named_modules() if m is tuner.dlo_new_layers[adapter_name]), None)
        if own_prefix is None:
            return remapped
        for name, tensor in tuner.dlo_new_layers[adapter_name].state_dict(keep_vars=True).items():
            key = f"{own_prefix}.{name}"
            if key not in remapped:
                remapped[key] = tensor.detach()
        return remapped
