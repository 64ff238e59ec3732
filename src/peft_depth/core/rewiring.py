"""Change which blocks a transformers model runs, and in which order, without changing its registered modules.

A method that inserts, repeats or drops blocks must leave the model consistent (hf-integration notes §5): every
``layer_idx`` equal to the block's position (the KV cache is indexed by it), ``config.num_hidden_layers`` equal to
the number of blocks run (the forward loop slices by it and ``DynamicCache`` pre-allocates by it), and
``config.layer_types`` (sliding/full attention) one entry per block.

``StackRewiring`` does this reversibly. The new order is installed as a *shadow attribute*: the backbone's instance
``__dict__`` gets an unregistered ``ModuleList`` under the stack's attribute name. Python finds an instance attribute
before ``nn.Module.__getattr__`` consults ``_modules``, so the model's forward loop iterates the new order, while the
registered original ``ModuleList`` (and so every state-dict key, ``parameters()``, ``.to()``, ``.train()``) is
untouched. Removing the shadow restores the original model exactly. Looked up by name (``get_submodule``, torch's
distributed checkpoint), the shadow's blocks are the registered ones, so a name always means what its state-dict key
means (``RunOrder``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .layer_stack import LayerStack, text_config
from .output_capture import drop_output_capture
from .quantization import dequantized_linear, dequantized_weight, floating_dtype, is_quantized_linear

__all__ = [
    "RunOrder",
    "StackRewiring",
    "clear_shadow_attribute",
    "plain_layer_copy",
    "plain_state_dict",
    "renumber_layer_indices",
    "set_shadow_attribute",
]


def set_shadow_attribute(module: nn.Module, name: str, value: Any) -> None:
    """Make ``module.<name>`` return ``value`` without registering it (the registered child stays as it is)."""
    object.__setattr__(module, name, value)


def clear_shadow_attribute(module: nn.Module, name: str) -> None:
    """Undo ``set_shadow_attribute`` (no-op when there is no shadow)."""
    module.__dict__.pop(name, None)


def renumber_layer_indices(blocks: Sequence[nn.Module]) -> None:
    """Set every integer ``layer_idx`` attribute inside block ``i`` (attention, cache users) to ``i``."""
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and not isinstance(module.layer_idx, bool):
                module.layer_idx = position


def _unwrap_tuner_layers(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        elif isinstance(child, ModulesToSaveWrapper):  # a module trained as a copy: the original is the base
            setattr(module, name, child.original_module)
            _unwrap_tuner_layers(child.original_module)
        else:
            _unwrap_tuner_layers(child)


def plain_layer_copy(layer: nn.Module, *, dequantize: bool = True) -> nn.Module:
    """A deep copy of ``layer`` with any PEFT adapter wrappers inside replaced by their base layers.

    Quantized linears (bitsandbytes 4-bit / 8-bit) are copied as plain ``nn.Linear``s holding their dequantized
    weights, in the dtype the layer computes in (its norms' dtype): a copy is trained or kept apart from the quantized
    base, and its weights are exactly what the quantized layer computes with. Merged adapters are not undone: copy
    before merging.

    ``dequantize=False`` leaves those linears' tensors uninitialised, for a caller that loads every tensor next (a
    state dict from ``plain_state_dict``), so that each quantized weight is dequantized once, not twice.
    """
    dtype = floating_dtype(layer)
    # each quantized linear is copied as its dequantized twin, without copying its quantized data first
    memo: dict[int, Any] = {
        id(module): dequantized_linear(module, dtype, dequantize=dequantize)
        for module in layer.modules()
        if is_quantized_linear(module)
    }
    duplicate = copy.deepcopy(layer, memo)
    drop_output_capture(duplicate)  # the source's recording hooks would report the copy's outputs as its own
    if isinstance(duplicate, BaseTunerLayer):
        return duplicate.get_base_layer()
    _unwrap_tuner_layers(duplicate)
    return duplicate


def plain_state_dict(layer: nn.Module, *, dequantize: bool = True) -> dict[str, Any]:
    """State dict of ``layer`` as it would be without PEFT wrappers (base weights only, ``base_layer.`` removed, a
    ``modules_to_save`` wrapper's original module in its place), quantized linears dequantized as in
    ``plain_layer_copy``.

    ``dequantize=False`` gives a quantized linear's weight as a meta tensor of its plain shape and dtype: the keys and
    shapes of the plain layer, for a check that reads no values, without dequantizing anything.
    """
    adapter_prefixes = []
    originals = []  # "<path>.original_module." of each modules_to_save wrapper
    for name, module in layer.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            prefix = f"{name}." if name else ""
            adapter_prefixes.append(f"{prefix}modules_to_save.")
            originals.append(f"{prefix}original_module.")
        if isinstance(module, BaseTunerLayer):
            for child_name, _ in module.named_children():
                if child_name != "base_layer":
                    adapter_prefixes.append(f"{name}.{child_name}." if name else f"{child_name}.")
            for param_name, _ in module.named_parameters(recurse=False):
                adapter_prefixes.append(f"{name}.{param_name}" if name else param_name)
    # a quantized linear's entries (packed weight, scales, quantization state) become its dequantized weight and its
    # bias, as in plain_layer_copy
    dtype = floating_dtype(layer)
    quantized = {name: module for name, module in layer.named_modules() if is_quantized_linear(module)}
    state = layer.state_dict()
    for name, module in quantized.items():
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        if dequantize:
            state[prefix + "weight"] = dequantized_weight(module, dtype)
        else:
            state[prefix + "weight"] = torch.empty(module.out_features, module.in_features, dtype=dtype, device="meta")
        if module.bias is not None:
            state[prefix + "bias"] = module.bias.detach().to(dtype)
    plain = {}
    for key, value in state.items():
        if any(key.startswith(prefix) or key == prefix.rstrip(".") for prefix in adapter_prefixes):
            continue
        for prefix in originals:
            if key.startswith(prefix):
                key = prefix.removesuffix("original_module.") + key.removeprefix(prefix)
        plain[key.replace(".base_layer.", ".").removeprefix("base_layer.")] = value
    return plain


class RunOrder(nn.ModuleList):
    """The installed stack: positions follow the run order, names mean the registered blocks.

    ``stack[i]``, iteration and slices (the model's forward loop) give the blocks in the order they run. A name, looked
    up as an attribute (``getattr(stack, "2")``: ``get_submodule("model.layers.2")``, torch's distributed
    state-dict helpers resolving parameter names), means the registered block of that name, as in ``named_modules()``
    and every state-dict key, never the block that happens to run at that position.
    """

    def __init__(self, modules: Sequence[nn.Module] | None = None, registered: nn.ModuleList | None = None) -> None:
        super().__init__(modules)
        self.__dict__["_registered_blocks"] = registered  # a plain reference, not a child

    def __getattr__(self, name: str) -> Any:
        registered = self.__dict__.get("_registered_blocks")
        if registered is not None and name.isdigit():
            if name in registered._modules:
                return registered._modules[name]
            raise AttributeError(f"the model registers no block {name!r} in this stack ({len(registered)} blocks)")
        return super().__getattr__(name)


class StackRewiring:
    """Runs a model's block stack in a different order (``install``) and back (``uninstall``), reversibly.

    Args:
        model: the transformers model (its ``config`` is updated).
        stack: the model's block stack, found before any rewiring.
    """

    def __init__(self, model: nn.Module, stack: LayerStack) -> None:
        self.model = model
        self.stack = stack
        parent_path, _, self.attribute = stack.path.rpartition(".")
        self.parent = model.get_submodule(parent_path) if parent_path else model
        self.original_blocks = list(stack.layers)
        self._saved_config: dict[str, Any] | None = None
        self.installed: list[nn.Module] | None = None

    @property
    def config(self) -> Any:
        return text_config(self.model)

    def install(self, blocks: Sequence[nn.Module], sources: Sequence[int], extra_config: dict[str, Any] | None = None):
        """Run ``blocks`` in order. ``sources[i]`` is the original index whose per-layer config entries block ``i``
        takes (its own index for an original block, the copied layer's for a new one). ``extra_config`` sets more
        config attributes (restored by ``uninstall``)."""
        if self.installed is not None:
            self.uninstall()
        if len(blocks) != len(sources):
            raise ValueError("`blocks` and `sources` must have the same length.")
        blocks = RunOrder(blocks, registered=self.stack.layers)
        config = self.config
        if config is not None:
            saved = {"num_hidden_layers": getattr(config, "num_hidden_layers", None)}
            layer_types = getattr(config, "layer_types", None)
            if layer_types is not None:
                saved["layer_types"] = layer_types
            for key in extra_config or {}:
                saved[key] = getattr(config, key, None)
            self._saved_config = saved
            if hasattr(config, "num_hidden_layers"):
                config.num_hidden_layers = len(blocks)
            if layer_types is not None:
                config.layer_types = [layer_types[source] for source in sources]
            for key, value in (extra_config or {}).items():
                setattr(config, key, value)
        set_shadow_attribute(self.parent, self.attribute, blocks)
        renumber_layer_indices(blocks)
        self.installed = list(blocks)
        return blocks

    def uninstall(self) -> None:
        """Restore the original stack, layer indices and config."""
        if self.installed is None:
            return
        clear_shadow_attribute(self.parent, self.attribute)
        renumber_layer_indices(self.original_blocks)
        config = self.config
        if config is not None and self._saved_config is not None:
            for key, value in self._saved_config.items():
                setattr(config, key, value)
        self._saved_config = None
        self.installed = None

    def make_permanent(self) -> None:
        """Register the installed order as the model's real stack (for merge-and-unload); config stays updated."""
        if self.installed is None:
            return
        blocks = self.parent.__dict__[self.attribute]
        clear_shadow_attribute(self.parent, self.attribute)
        setattr(self.parent, self.attribute, nn.ModuleList(list(blocks)))
        self._saved_config = None
        self.installed = None
