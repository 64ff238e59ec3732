"""Original-layer modules trained in full (``trained_original_modules``), as peft ``modules_to_save`` copies.

The paper trains every weight of the expanded model. Here an original layer's module chosen by
``trained_original_modules`` / ``trained_original_layers`` is resolved, at injection, to its full path in the model
(``model.layers.3.mlp``) and added to the config's ``modules_to_save``: peft then wraps it in a
``ModulesToSaveWrapper``, which trains a copy for the adapter and keeps the original module untouched. So:

- the saved config lists every module the adapter replaces (``modules_to_save``), and the adapter file holds exactly
  those copies (peft-depth's loads accept exactly the keys the config builds, nothing of the base);
- a load writes the copies only, never a base weight; ``disable_adapter`` runs the original modules, ``unload``
  gives them back (peft's own unload would leave the trained copy in the base, and fails on a module without a
  ``weight`` such as an MLP: ``unwrap_trained_modules``), and ``merge_and_unload`` (dense expansion only) installs the
  trained copies;
- DLO's skip shadows wrap whatever module the layer holds, so a trained MLP is skipped as the original one was.

Resolution depends only on the config and the base's depth and module names (checked against the base model's facts
on load), so reloading a saved config resolves to the same paths.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ...core.quantization import is_quantized_linear
from .config import DLOConfig
from .expansion import _plain_modules, is_routed_original, matches_module_name

__all__ = ["check_lora_outside_trained_modules", "trained_original_module_paths", "unwrap_trained_modules"]


def _chosen_layers(config: DLOConfig, num_layers: int) -> list[int]:
    chosen = config.trained_original_layers
    if chosen == "routed":
        return [i for i in range(num_layers) if is_routed_original(config, i, num_layers)]
    if chosen == "all":
        return list(range(num_layers))
    bad = [i for i in chosen if i >= num_layers]
    if bad:
        raise ValueError(
            f"`trained_original_layers` lists layers {bad[:10]} outside the model's {num_layers} original layers "
            f"(valid: 0..{num_layers - 1})."
        )
    return list(chosen)


def _module_paths(layer: nn.Module) -> list[str]:
    """Paths of the modules of ``layer`` that hold weights and of every module above them, as in a plain copy of the
    layer (adapter wrappers left out)."""
    paths: set[str] = set()
    for path in _plain_modules(layer):
        parts = path.split(".") if path else []
        paths.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return sorted(paths)


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` without those inside another one (a wrapped module's children are trained with it)."""
    return [p for p in paths if not any(p != q and p.startswith(q + ".") for q in paths)]


def trained_original_module_paths(config: DLOConfig, originals: Sequence[nn.Module], stack_path: str) -> list[str]:
    """Full module paths (``<stack_path>.<index>.<name>``) of the original-layer modules ``config`` trains in full;
    ValueError naming the field when the names match nothing trainable or a quantized module."""
    names = config.trained_original_modules
    if names is None:
        return []
    indices = _chosen_layers(config, len(originals))
    if not indices:
        return []
    modules = _module_paths(originals[indices[0]])  # every original layer has the same structure
    matched = [path for path in modules if matches_module_name(path, names)]
    layer_name = type(originals[indices[0]]).__name__
    if not matched:
        raise ValueError(
            f"`trained_original_modules` ({names}) matches no module of {layer_name}; name modules inside a decoder "
            f"layer, e.g. {', '.join(p for p in modules if '.' not in p) or 'mlp'}."
        )
    inside = _outermost(matched)
    paths = []
    for index in indices:
        for name in inside:
            module = originals[index].get_submodule(name)
            if any(is_quantized_linear(m) for m in module.modules()):
                raise ValueError(
                    f"`trained_original_modules` names {name!r}, which holds quantized weights in this model; a "
                    "quantized weight cannot train in full. Train it with LoRA (r > 0) or load the base unquantized."
                )
            paths.append(f"{stack_path}.{index}.{name}")
    return paths


def check_lora_outside_trained_modules(model: nn.Module, lora_config: object, paths: list[str]) -> None:
    """ValueError when LoRA on the original layers (``lora_config``: the config with its resolved target_modules)
    would target a linear inside a module trained in full: peft drops such LoRA in the trained copy."""
    for path in paths:
        for name, module in model.get_submodule(path).named_modules():
            key = f"{path}.{name}" if name else path
            if isinstance(module, nn.Linear) and check_target_module_exists(lora_config, key):
                raise ValueError(
                    f"`trained_original_modules` trains {path!r} in full, but LoRA on the original layers (r > 0, "
                    f"`target_modules`) also targets {key!r} inside it. Leave the trained modules out of "
                    "`target_modules` (e.g. LoRA on attention, the MLP trained in full) or set "
                    "lora_on_original_layers=False."
                )


def unwrap_trained_modules(model: nn.Module, *, merge: bool) -> None:
    """Replace every ``modules_to_save`` wrapper in ``model`` by its original module (``merge=False``: unload gives
    the base back) or by the active adapter's trained copy (``merge=True``, as peft's merge-and-unload does)."""
    wrappers = [(name, module) for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if merge:
            replacement = wrapper.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            replacement = wrapper.original_module
        setattr(parent, child, replacement)
