"""Which state-dict entries belong to one adapter, decided by the module tree rather than by key substrings.

peft first drops every key that contains ``.<other adapter name>.``, then keeps keys by prefix. With a second adapter
named ``"model"``, ``"proj"`` or ``"layer"`` - words that are also parts of parameter paths - that first filter
removes this adapter's own keys too, and a load was refused listing them as missing. Here an entry belongs to adapter
``name`` exactly when it lies under ``<module>.<container>.<name>``, where ``<container>`` is one of the per-adapter
dicts a tuner layer declares (``adapter_layer_names``) or one of the tuner's own ``tuner_module_names``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["adapter_key_prefixes", "select_adapter_entries"]


def adapter_key_prefixes(model: nn.Module, adapter_name: str, tuner_module_names: Iterable[str]) -> set[str]:
    """State-dict key prefixes (``module.container.adapter_name``) of every entry of ``adapter_name``."""
    tuner_module_names = tuple(tuner_module_names)
    prefixes = set()
    for module_name, module in model.named_modules():
        containers = tuple(getattr(module, "adapter_layer_names", ())) if isinstance(module, BaseTunerLayer) else ()
        containers += tuner_module_names
        for container_name in containers:
            container = getattr(module, container_name, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in container:
                prefixes.add(".".join(p for p in (module_name, container_name, adapter_name) if p))
    return prefixes


def select_adapter_entries(state_dict: Mapping[str, Any], prefixes: set[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` lying under one of ``prefixes`` (a whole path component, not a substring)."""
    return {
        key: value
        for key, value in state_dict.items()
        if any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)
    }
