"""transformers' per-layer output recording (``output_hidden_states`` / ``output_attentions``) on layers we add.

transformers 5 records hidden states and attention maps with forward hooks that it installs once, at the first
forward that asks for them, on the modules registered in the model. Layers a tuner adds need the same hooks, exactly
once: a deep copy of a hooked layer carries its source's hooks along, and a model that installs its hooks later
(after a merge made the layers its own) hooks them again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = [
    "drop_output_capture",
    "drop_output_capture_mark",
    "install_output_capture",
    "output_capture_unavailable",
    "output_recording_paused",
    "records_outputs_inside_layers",
    "refuse_unrecorded_outputs",
]

_CAPTURE_MODULE = "transformers.utils.output_capturing"
#: What transformers collects once per layer (its output, its attention map), as opposed to outputs of modules inside
#: a layer such as a mixture of experts' router logits.
_PER_LAYER_KEYS = frozenset({"hidden_states", "attentions", "_hidden_states_layers"})
_FLAG = "_depth_output_capture"
_UNAVAILABLE = "_depth_output_capture_unavailable"


def _is_capture_hook(hook: Any) -> bool:
    return getattr(hook, "__module__", None) == _CAPTURE_MODULE and getattr(hook, "__name__", "") == (
        "output_capturing_hook"
    )


@contextlib.contextmanager
def output_recording_paused() -> Iterator[dict[str, Any] | None]:
    """Pause transformers' per-layer output recording for the calls inside (passes that are no layer of this
    forward, such as a layer run again as another's expert); yields what the forward collects, or None when it
    collects nothing."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without this recorder records nothing through layer hooks
        yield None
        return
    collected = _active_collector.get()
    if not collected:
        yield None
        return
    token = _active_collector.set(None)
    try:
        yield collected
    finally:
        _active_collector.reset(token)


def records_outputs_inside_layers() -> bool:
    """Whether the forward in progress collects outputs of modules inside the layers (a mixture of experts' router
    logits for its load-balancing loss): such a module run on part of the tokens would record part of them."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and any(key not in _PER_LAYER_KEYS for key in collected)


def drop_output_capture(layer: nn.Module) -> None:
    """Remove transformers' output-recording hooks from ``layer`` and its submodules (other hooks stay)."""
    for module in layer.modules():
        for key, hook in list(module._forward_hooks.items()):
            if _is_capture_hook(hook):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
    drop_output_capture_mark(layer)


def drop_output_capture_mark(layer: nn.Module) -> None:
    """Forget that ``install_output_capture`` hooked ``layer`` (its hooks stay)."""
    layer.__dict__.pop(_FLAG, None)
    layer.__dict__.pop(_UNAVAILABLE, None)


def output_capture_unavailable(layer: nn.Module) -> bool:
    """Whether ``install_output_capture`` could not hook ``layer`` (transformers records outputs another way)."""
    return layer.__dict__.get(_UNAVAILABLE, False)


def refuse_unrecorded_outputs(layers: list[nn.Module], output: Any) -> None:
    """Raise when ``output`` reports per-layer hidden states or attention maps but some of ``layers`` could not be
    hooked to record theirs: the tuple would silently lack those layers."""
    asked = [key for key in ("hidden_states", "attentions") if getattr(output, key, None) is not None]
    if asked and any(output_capture_unavailable(layer) for layer in layers):
        raise RuntimeError(
            f"This model's output reports {' and '.join(asked)}, but the installed transformers records them "
            f"without `{_CAPTURE_MODULE}`, which peft-depth uses to record the layers it adds: they would be missing. "
            "Call the model without output_hidden_states / output_attentions, or install a transformers version "
            "peft-depth supports (see pyproject.toml)."
        )


def install_output_capture(backbone: nn.Module, layer: nn.Module, name: str) -> None:
    """Give ``layer`` (registered in ``backbone``'s stack as ``name``, or standing in for it) the output-recording
    hooks transformers puts on ``backbone``'s own layers, once; hooks it carries from a copied layer are replaced."""
    if layer.__dict__.get(_FLAG, False):
        return
    try:
        from transformers.utils.output_capturing import (
            _CAN_RECORD_REGISTRY,
            OutputRecorder,
            recursively_install_hooks,
        )
    except ImportError:  # another transformers layout: refuse_unrecorded_outputs raises if outputs are asked for
        layer.__dict__[_UNAVAILABLE] = True
        return
    drop_output_capture(layer)
    tasks: list[tuple[str, Any]] = []
    for key, specs in _CAN_RECORD_REGISTRY.get(backbone).items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, OutputRecorder):
                spec = OutputRecorder(
                    target_class=None if isinstance(spec, str) else spec,
                    index=0 if "hidden_states" in key else 1,
                    class_name=spec if isinstance(spec, str) else None,
                )
            tasks.append((key, spec))
    recursively_install_hooks(layer, name, tasks)
    layer.__dict__[_FLAG] = True
