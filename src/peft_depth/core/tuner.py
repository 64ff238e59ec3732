"""What every peft-depth tuner shares on top of peft's ``BaseTuner``."""

from __future__ import annotations

from functools import cached_property

from peft.tuners.tuners_utils import BaseTuner

from .aux import DepthAuxSource
from .layer_stack import LayerStack, find_layer_stack
from .token_mask import TokenMaskTracker

__all__ = ["DepthTuner"]


class DepthTuner(BaseTuner, DepthAuxSource):
    """Base class of the peft-depth tuners.

    Gives each tuner the model's block stack, a tracker of the current padding mask, and a clear refusal to merge
    when the adapted function depends on the input (set ``merge_refusal_reason`` to allow nothing to merge).
    """

    #: Why this method cannot be merged into the base weights; ``None`` means merging is allowed.
    merge_refusal_reason: str | None = None

    @cached_property
    def layer_stack(self) -> LayerStack | None:
        return find_layer_stack(self.model)

    @cached_property
    def token_mask(self) -> TokenMaskTracker:
        return TokenMaskTracker(self.model)

    def _check_merge_allowed(self) -> None:
        if self.merge_refusal_reason is not None:
            raise ValueError(f"{type(self).__name__} adapters cannot be merged: {self.merge_refusal_reason}")
        super()._check_merge_allowed()

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
