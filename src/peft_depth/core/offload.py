"""Refusing a base whose weights accelerate offloads (``device_map`` with "disk" or CPU offload of a GPU model).

accelerate keeps an offloaded module's weights on the ``meta`` device and puts them in place in a hook around that
module's own call. The depth methods read weights outside such calls: MoLA's experts and the LoRA that MoLEx and MoD
carry are parameter tensors read by the layer (never called as modules, so their hook never runs, and a product with
a ``meta`` weight returns uninitialised memory without an error), DLO deep-copies layers together with their hooks
(its new layers ran the source layer's offloaded weights and ignored ``zero_out``), MoD copies the final norm the same
way (its new norms never trained). Each gave wrong outputs without an error, and saving failed afterwards, so a depth
adapter refuses such a base by name before anything is built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["offloaded_modules", "refuse_offloaded_base"]


def _hooks(hook: Any) -> list[Any]:
    inner = getattr(hook, "hooks", None)  # accelerate's SequentialHook
    return [hook] if inner is None else [h for item in inner for h in _hooks(item)]


def offloaded_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weights an accelerate hook loads at call time (offloaded to CPU or disk)."""
    return [
        name
        for name, module in model.named_modules()
        if any(getattr(hook, "offload", False) for hook in _hooks(getattr(module, "_hf_hook", None)))
    ]


def refuse_offloaded_base(model: nn.Module, what: str) -> None:
    offloaded = offloaded_modules(model)
    if offloaded:
        shown = ", ".join(offloaded[:4]) + (f" and {len(offloaded) - 4} more" if len(offloaded) > 4 else "")
        raise ValueError(
            f"{what} cannot be put on a model whose weights accelerate offloads ({shown}: a `device_map` with 'disk' "
            "or CPU offload, or `max_memory` too small for the model): peft-depth's methods read weights outside "
            "the offloaded modules' own calls, which would run on placeholders. Load the base with every weight in "
            "place (no `device_map` offload; a quantized base fits more on one device)."
        )
