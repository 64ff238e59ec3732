"""Keeping ``requires_grad`` through peft operations that re-assign ``nn.ParameterDict`` entries.

peft moves and upcasts an adapter's tensors by assigning ``container[name] = tensor.to(...)``. For an
``nn.ParameterDict`` (MoLA's experts, the shared low-rank layers) the assignment wraps the result in a new
``nn.Parameter``, whose ``requires_grad`` is True whatever the old one's was: a frozen adapter (loaded in inference
mode, or added inactive) came back partly trainable on a half-precision base or with ``low_cpu_mem_usage=True``.
peft's LoRA keeps ``nn.Linear`` modules in a ``ModuleDict`` and is not affected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["requires_grad_kept"]


@contextlib.contextmanager
def requires_grad_kept(module: nn.Module) -> Iterator[None]:
    """Every parameter of ``module`` leaves the block with the ``requires_grad`` it entered with (by name, so a
    Parameter replaced inside the block gets its predecessor's); parameters new in the block keep their own."""
    trainable = {name: param.requires_grad for name, param in module.named_parameters()}
    yield
    for name, param in module.named_parameters():
        if trainable.get(name, param.requires_grad) != param.requires_grad:
            param.requires_grad_(trainable[name])
