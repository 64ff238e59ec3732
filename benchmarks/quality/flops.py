"""Training-FLOPs estimate of a run: FLOPs of one measured forward + backward, per token, times the tokens trained on.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products (linear layers, attention, the LM head) of
an actual forward and backward of the adapted model on a batch of the run's own training data, so every method's
extra work is included as it really runs: MoLA's experts and routers, MoLEx's second layer pass, MoD's
distillation heads, DLO's new layers and routers (DLO's training runs every token's MLP and zeroes the skipped ones,
so it saves nothing there; its saving is at inference, ``forward_flops`` via ``inference_cost``). Element-wise
operations are not counted (a few percent at this size). The estimate for the run is ``FLOPs of that step / its real
(non-padding) tokens × real tokens the run trains on``; optimizer updates are left out (linear in the trainable
parameters, negligible next to the matmuls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["step_flops", "forward_flops"]


def step_flops(loss_of_batch: Callable[[], torch.Tensor]) -> int:
    """FLOPs counted while computing ``loss_of_batch()`` and back-propagating it (the caller clears the gradients)."""
    with FlopCounterMode(display=False) as counter:
        loss = loss_of_batch()
        loss.backward()
    return int(counter.get_total_flops())


def forward_flops(forward: Callable[[], object]) -> int:
    """FLOPs counted while running ``forward()`` without gradients (an inference pass)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    return int(counter.get_total_flops())
