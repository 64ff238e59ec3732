"""A wrapper module that answers for the module it wraps: DLO's shadows and bridges stand in for a layer's modules."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["Delegating"]


class Delegating(nn.Module):
    """Unregistered wrapper that forwards unknown attributes to the module it wraps (``inner``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)
