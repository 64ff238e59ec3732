"""A parameter-free adapter layer that stands, inside the model, for a tuner's tuner-level modules."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["TunerStateMarker", "install_state_marker", "remove_state_marker"]


class TunerStateMarker(nn.Module, BaseTunerLayer):
    """Registered in the model when a method's weights live only on the tuner.

    MoD without LoRA targets (ensemble routers and norms) and DLO with ``r=0`` (new layers, routers) put no adapter
    layer inside the model, and peft's ``disable_adapter()`` and ``get_model_status()`` then refuse the model ("No
    adapter layers found"). The marker gives them a layer to report; it has no tensors (no state-dict key changes),
    follows the tuner's active adapters, and its name starts with the tuner's prefix, so peft's unloading skips it.
    """

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_tuner", tuner)  # not a child: the tuner owns the model, not the reverse
        self.merged_adapters = []
        self._disable_adapters = False
        self.cast_input_dtype_enabled = True  # read and set by peft.helpers.disable_input_dtype_casting

    @property
    def active_adapter(self) -> str | list[str]:
        return self._tuner.active_adapter

    # peft's BaseTunerLayer reads ``weight``/``bias`` off its base layer, and the marker is its own base layer: without
    # these, ``hasattr(marker, "weight")`` (peft's FSDP auto-wrap policy asks it of every module) recursed forever.
    @property
    def weight(self) -> Any:
        raise AttributeError("TunerStateMarker has no weight: it holds no tensors")

    @property
    def bias(self) -> Any:
        raise AttributeError("TunerStateMarker has no bias: it holds no tensors")

    def _get_available_adapters(self) -> set[str]:
        return set(self._tuner.marked_adapters())

    def set_adapter(self, adapter_names: Any, inference_mode: bool = False) -> None:
        return None  # the tuner activates its own modules

    def delete_adapter(self, adapter_name: str) -> None:
        return None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Any = None) -> None:
        return None  # nothing to move: the marker holds no tensors

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("TunerStateMarker only marks a model adapted at tuner level; it is never called.")


def _marker_name(tuner: nn.Module) -> str:
    return f"{tuner.prefix}state_marker"


def install_state_marker(tuner: nn.Module, model: nn.Module) -> None:
    """Add the marker to ``model`` once (after peft's first injection, which must see no adapter layer)."""
    if not any(isinstance(module, TunerStateMarker) for module in model.modules()):
        model.add_module(_marker_name(tuner), TunerStateMarker(tuner))


def remove_state_marker(tuner: nn.Module, model: nn.Module) -> None:
    """Take the marker out of ``model`` (unloading gives back the plain base model)."""
    if isinstance(getattr(model, _marker_name(tuner), None), TunerStateMarker):
        delattr(model, _marker_name(tuner))
