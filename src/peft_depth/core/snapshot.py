"""Undo everything a failed adapter load did to a model: registered modules, hooks, flags, configs.

Building an adapter edits the caller's model in place (peft swaps target linears for tuner layers, MoLEx replaces
block forwards, DLO rewires the layer list and ``config.num_hidden_layers``, MoD hooks the final norm), and only then
are the weights read. When a load fails after that, the caller's model must be exactly what it was. Rather than each
method undoing its own edits (and missing one), ``ModelSnapshot`` records, for every module reachable from the root,
its attribute dict - with the contents of the dicts, lists and sets in it, two levels deep: the dicts torch keeps
state in (``_modules``, ``_parameters``, ``_buffers``, the hook dicts), a tuner's own state (DLO's layouts) and the
lists peft extends (``targeted_module_names``) - every parameter's ``requires_grad``, and every transformers config
object's attributes; ``restore`` puts all of that back in place (the same container objects, so a caller's
``RemovableHandle`` still removes its hook).

Tensor values are not copied: adapter loads never write base tensors (``hub.peft_hooks`` refuses any key outside the
adapter from the file header), so the snapshot costs a few dict copies, not a second model.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["ModelSnapshot"]


#: How deep plain containers inside a module's attributes are recorded: a tuner's own state is a dict of dicts
#: (DLO's ``_dlo["layouts"]``), and peft extends lists such as ``targeted_module_names`` in place.
_CONTAINER_DEPTH = 2


class _Contents:
    """A dict, list or set and what it held (and, to ``depth``, what the containers inside it held), put back into
    the same object: a caller holding it (a ``RemovableHandle`` holds a hook dict) sees the restored contents."""

    def __init__(self, container: dict | list | set, depth: int) -> None:
        self.container = container
        self.saved = copy.copy(container)
        values = container.values() if isinstance(container, dict) else container
        self.inner = [_Contents(v, depth - 1) for v in values if depth > 1 and _is_container(v)]

    def restore(self) -> None:
        if isinstance(self.container, dict):
            self.container.clear()
            self.container.update(self.saved)
        elif isinstance(self.container, list):
            self.container[:] = self.saved
        else:
            self.container.clear()
            self.container.update(self.saved)
        for inner in self.inner:
            inner.restore()


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list, set))


def _is_config(value: Any) -> bool:
    # transformers' PretrainedConfig without importing transformers here: it has to_dict and a model_type
    return hasattr(value, "to_dict") and hasattr(value, "model_type") and not isinstance(value, type)


class ModelSnapshot:
    """The restorable state of ``root`` and every module and config reachable from it."""

    def __init__(self, root: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, dict[str, Any], dict[str, _Contents]]] = []
        self._configs: list[tuple[Any, dict[str, Any]]] = []
        self._requires_grad = [(p, p.requires_grad) for p in root.parameters()]
        seen_configs: set[int] = set()
        for module in root.modules():
            attributes = dict(module.__dict__)
            contents = {
                key: _Contents(value, _CONTAINER_DEPTH) for key, value in attributes.items() if _is_container(value)
            }
            self._modules.append((module, attributes, contents))
            for value in attributes.values():
                if _is_config(value) and id(value) not in seen_configs:
                    self._add_config(value, seen_configs)

    def _add_config(self, config: Any, seen: set[int]) -> None:
        seen.add(id(config))
        # deep-copied values: a list such as ``layer_types`` may be edited in place
        self._configs.append((config, {k: copy.deepcopy(v) for k, v in vars(config).items() if not _is_config(v)}))
        for value in vars(config).values():
            if _is_config(value) and id(value) not in seen:
                self._add_config(value, seen)

    def restore(self) -> None:
        """Put every recorded module attribute, hook, child, parameter flag and config value back."""
        for module, attributes, contents in self._modules:
            for key in [k for k in module.__dict__ if k not in attributes]:
                del module.__dict__[key]
            for key, value in attributes.items():
                if key in contents:
                    contents[key].restore()
                module.__dict__[key] = value
        for parameter, requires_grad in self._requires_grad:
            parameter.requires_grad_(requires_grad)
        for config, values in self._configs:
            for key in [k for k in vars(config) if k not in values and not _is_config(getattr(config, k))]:
                delattr(config, key)
            for key, value in values.items():
                object.__setattr__(config, key, value)
