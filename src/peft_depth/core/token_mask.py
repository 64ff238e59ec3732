"""Know which tokens of the current forward are padding, from inside any submodule.

Adapter layers deep in a model (a projection inside attention) never see the attention mask, yet routing statistics
must exclude padding. ``TokenMaskTracker`` is a forward pre-hook on the top-level transformers model that keeps the
2-D ``attention_mask`` of the latest call; layers ask it for a flat ``[N]`` mask matching their own token count.

The mask is kept until the next forward (not cleared on exit) so that gradient-checkpointing recomputation, which runs
during backward after the forward returned, sees the same mask as the original pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TokenMaskTracker"]


class TokenMaskTracker:
    """Records the attention mask of each forward of ``model`` (a transformers model or any ``nn.Module``)."""

    def __init__(self, model: nn.Module) -> None:
        self._attention_mask: torch.Tensor | None = None
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        # Only the plain [batch, seq] padding mask is meaningful here; 4-D masks are already-expanded attention biases.
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def remove(self) -> None:
        self._handle.remove()

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._attention_mask

    def flat_mask(self, hidden_shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
        """Boolean ``[N]`` mask for a tensor of shape ``[batch, seq, ...features]`` flattened to ``[N, features]``.

        With a KV cache the mask covers past plus current tokens, so its last ``seq`` columns are used. Returns
        ``None`` (every token is real) when there is no mask or the shapes do not line up (e.g. a layer that sees a
        gathered subset of tokens).
        """
        mask = self._attention_mask
        if mask is None or len(hidden_shape) < 3:
            return None
        batch, seq = hidden_shape[0], hidden_shape[1]
        if mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, mask.shape[1] - seq :].reshape(-1).bool()
