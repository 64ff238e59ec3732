"""Copying one adapter's weights into another adapter of the same shape, and the TRL idiom that needs it.

TRL's preference and RL trainers (DPO, GRPO, KTO, RLOO), given a ``PeftModel`` that already holds a trained
``"default"`` adapter and no reference model, add an adapter ``"ref"`` with the same config and copy into it every
parameter whose name contains ``".default."``. The low-rank weights of these methods are ``nn.ParameterDict`` entries
named ``...mola_A.default`` (no trailing dot), so that substring test skipped them, and the reference silently kept
its fresh initialisation (peft's IA3 is named the same way). ``copy_adapter`` copies by the module tree instead
(``core.adapter_keys``), every parameter and buffer of the adapter, and the tuner calls it when it recognises that
idiom (``copies_trl_reference_adapter``), so the reference is the trained adapter whatever TRL's test matches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .adapter_keys import adapter_key_prefixes

__all__ = ["copy_adapter", "copies_trl_reference_adapter"]

#: The adapter names TRL's trainers use for the trained adapter and its frozen reference copy.
TRL_SOURCE_ADAPTER, TRL_REFERENCE_ADAPTER = "default", "ref"


def _adapter_prefixes(
    model: nn.Module, adapter_name: str, tuner_module_names: Iterable[str], include_modules_to_save: bool
) -> set[str]:
    """Every state-dict prefix of ``adapter_name``: the tuner layers' and tuner-level dicts (``core.adapter_keys``)
    and peft's own per-adapter wrappers (``modules_to_save`` copies, which DLO's trained original modules are)."""
    prefixes = adapter_key_prefixes(model, adapter_name, tuner_module_names)
    for module_name, module in model.named_modules() if include_modules_to_save else ():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for container_name in getattr(module, "adapter_layer_names", ()):
                container = getattr(module, container_name, None)
                if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in container:
                    prefixes.add(".".join(p for p in (module_name, container_name, adapter_name) if p))
    return prefixes


def _entries(state: dict[str, torch.Tensor], prefixes: set[str], adapter_name: str) -> dict[str, torch.Tensor]:
    """``{path with the adapter segment replaced by "{}": tensor}`` for the entries under ``prefixes``."""
    found = {}
    for prefix in prefixes:
        template = prefix[: -len(adapter_name)] + "{}"
        for key, tensor in state.items():
            if key == prefix or key.startswith(prefix + "."):
                found[template + key[len(prefix) :]] = tensor
    return found


def copy_adapter(model: nn.Module, source: str, target: str, include_modules_to_save: bool = True) -> int:
    """Copy every weight and buffer of adapter ``source`` into adapter ``target`` (both already on ``model``, of the
    same method and shapes: peft keeps one method per model, and the target is typically added with the source's config); returns how many tensors were copied.

    ``model`` is a ``PeftModel`` or its tuner. ``include_modules_to_save``: also the adapters' ``modules_to_save``
    copies (peft creates those only after the tuner has injected an adapter). The target's trainability is left as it
    is. Raises ``ValueError``, before anything is copied, when an adapter is missing or the two
    adapters' tensors do not correspond one to one with equal shapes.
    """
    tuner = model.base_model if isinstance(model, PeftModel) else model
    configs = getattr(tuner, "peft_config", None)
    if not isinstance(tuner, BaseTuner) or not isinstance(configs, dict):
        raise ValueError("copy_adapter needs a PeftModel (or its tuner) holding both adapters.")
    missing = [name for name in (source, target) if name not in configs]
    if missing:
        raise ValueError(f"copy_adapter: no adapter named {missing[0]!r}; the model has {sorted(configs)}.")
    if source == target:
        raise ValueError(f"copy_adapter: source and target are both {source!r}.")
    names = getattr(type(tuner), "tuner_module_names", ())
    # from the tuner itself: block-level methods keep gates, routers and new layers on it, beside the model
    state = dict(tuner.state_dict(keep_vars=True))
    source_entries = _entries(state, _adapter_prefixes(tuner, source, names, include_modules_to_save), source)
    target_entries = _entries(state, _adapter_prefixes(tuner, target, names, include_modules_to_save), target)
    if not source_entries:
        raise ValueError(f"copy_adapter: adapter {source!r} has no weights on this model.")
    if set(source_entries) != set(target_entries):
        only = sorted(set(source_entries) ^ set(target_entries))[:3]
        raise ValueError(
            f"copy_adapter: adapters {source!r} and {target!r} do not have the same tensors (e.g. "
            f"{[k.format('<adapter>') for k in only]}); add the target with the source's config."
        )
    for key, tensor in sorted(source_entries.items()):
        if tensor.shape != target_entries[key].shape:
            raise ValueError(
                f"copy_adapter: {key.format('<adapter>')} is {tuple(tensor.shape)} in {source!r} and "
                f"{tuple(target_entries[key].shape)} in {target!r}; add the target with the source's config."
            )
    with torch.no_grad():
        for key, tensor in source_entries.items():
            target_entries[key].copy_(tensor)
    return len(source_entries)


def copies_trl_reference_adapter(configs: dict, adapter_name: str, max_depth: int = 12) -> bool:
    """Whether this injection is TRL's "add a reference adapter, then copy the trained one into it" idiom: adapter
    ``"ref"`` added with the very config object of ``"default"``, from inside a ``trl.trainer`` module."""
    if adapter_name != TRL_REFERENCE_ADAPTER or TRL_SOURCE_ADAPTER not in configs:
        return False
    if configs.get(adapter_name) is not configs[TRL_SOURCE_ADAPTER]:
        return False
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith("trl.trainer."):
            return True
        frame = frame.f_back
    return False
