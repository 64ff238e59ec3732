"""Per-tuner state that adapter layers read during the forward: the padding mask and cross-process syncing."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .forward_context import ForwardContext
from .token_mask import TokenMaskTracker

__all__ = ["RoutingContext"]


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradient.

    Every process computes the same loss from the summed statistic, and DDP averages the parameter gradients over
    processes; summing the incoming gradients here makes each process's share of that average exact. (Our own
    Function rather than ``torch.distributed.nn.functional.all_reduce``, deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class RoutingContext:
    """Shared by a tuner and all its layers.

    Attributes:
        sync_across_processes: when True (set by ``DepthSFTTrainer`` from ``sync_routing_stats``), batch-level routing
            statistics are summed over all processes of the default process group during the forward, so that
            routing decisions and balance losses are those of the global batch, not of each process's shard.
        loss_coefficient_overrides: ``{aux-loss name: coefficient}`` of this training run (set by
            ``DepthSFTTrainer`` from ``DepthSFTConfig``), read through ``loss_coefficient``: a method that skips
            computing a loss whose configured coefficient is 0 must still compute it when the run weights it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tracker = TokenMaskTracker(model)
        self.sync_across_processes = False
        self.loss_coefficient_overrides: dict[str, float] = {}

    def loss_coefficient(self, name: str, configured: float) -> float:
        """The weight of the auxiliary loss ``name`` in this run: the trainer's override, else ``configured``."""
        return float(self.loss_coefficient_overrides.get(name, configured))

    @property
    def forward(self) -> ForwardContext:
        """This thread's context of the model's latest top-level forward (``core.forward_context``)."""
        return self.tracker.context

    def flat_mask(self, hidden_shape: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
        """Boolean ``[N]`` real-token mask for activations of shape ``[batch, seq, ...]`` (None: all real)."""
        return self.tracker.flat_mask(hidden_shape)

    @property
    def syncing(self) -> bool:
        return (
            self.sync_across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )

    @property
    def process_index(self) -> int:
        """This process's rank in the default group while syncing, else 0."""
        return dist.get_rank() if self.syncing else 0

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes when syncing (differentiable), else return it unchanged."""
        if not self.syncing:
            return tensor
        if tensor.requires_grad:
            return _SumOverProcesses.apply(tensor)
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[num_processes, *shape]`` stack of every process's ``tensor`` (same shape everywhere; not differentiable).

        Without syncing: ``tensor.unsqueeze(0)``.
        """
        if not self.syncing:
            return tensor.unsqueeze(0)
        tensor = tensor.detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)
