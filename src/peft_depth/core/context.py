"""Per-tuner state that adapter layers read during the forward: the padding mask and cross-process syncing."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .token_mask import TokenMaskTracker

__all__ = ["RoutingContext"]


class RoutingContext:
    """Shared by a tuner and all its layers.

    Attributes:
        sync_across_processes: when True (set by ``DepthSFTTrainer`` from ``sync_routing_stats``), batch-level routing
            statistics are summed over all processes of the default process group during the forward, so that
            routing decisions and balance losses are those of the global batch, not of each process's shard.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tracker = TokenMaskTracker(model)
        self.sync_across_processes = False

    def flat_mask(self, hidden_shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
        """Boolean ``[N]`` real-token mask for activations of shape ``[batch, seq, ...]`` (None: all real)."""
        return self.tracker.flat_mask(hidden_shape)

    @property
    def syncing(self) -> bool:
        return (
            self.sync_across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes when syncing (differentiable), else return it unchanged."""
        if not self.syncing:
            return tensor
        if tensor.requires_grad:
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(tensor, op=dist.ReduceOp.SUM)
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced
