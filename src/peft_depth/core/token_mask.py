"""Know which tokens of the current forward are padding, from inside any submodule.

Adapter layers deep in a model (a projection inside attention) never see the attention mask, yet routing statistics
must exclude padding. ``TokenMaskTracker`` reads the 2-D ``attention_mask`` of the model's latest top-level call from
that call's ``ForwardContext`` (``core.forward_context``: per thread, kept for checkpoint recomputation), and gives
layers a flat ``[N]`` mask matching their own token count.
"""

from __future__ import annotations

import torch

from .forward_context import ForwardContext, ForwardContextTracker

__all__ = ["TokenMaskTracker"]


class TokenMaskTracker(ForwardContextTracker):
    """The per-forward context of ``model`` with the padding-mask reads adapter layers need."""

    @property
    def context(self) -> ForwardContext:
        """This thread's context of the latest forward.

        Before the first forward (a layer called on its own, outside a tracked model call) an empty context is made
        and kept for this thread, so what layers record there stays readable until the next forward.
        """
        return self.current or self.begin_context(ForwardContext())

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.context.attention_mask

    def flat_mask(self, hidden_shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
        """Boolean ``[N]`` mask for a tensor of shape ``[batch, seq, ...features]`` flattened to ``[N, features]``.

        With a KV cache the mask covers past plus current tokens, so its last ``seq`` columns are used. Returns
        ``None`` (every token is real) when there is no mask or the shapes do not line up (e.g. a layer that sees a
        gathered subset of tokens).
        """
        mask = self.attention_mask
        if mask is None or len(hidden_shape) < 3:
            return None
        batch, seq = hidden_shape[0], hidden_shape[1]
        if mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, mask.shape[1] - seq :].reshape(-1).bool()
