"""Low-rank adapter math shared by the methods: one LoRA, or many LoRA experts computed as one batched product."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["linear_features", "init_low_rank", "low_rank_delta"]


def linear_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``; TypeError for anything else."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        weight = base_layer.weight
        in_features, out_features = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        return int(in_features), int(out_features)
    raise TypeError(
        f"Target module {type(base_layer).__name__} is not supported: peft-depth adapts `torch.nn.Linear` and "
        "`transformers.pytorch_utils.Conv1D` layers."
    )


@torch.no_grad()
def init_low_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int, *, zero_B: bool) -> None:
    """Initialise stacked ``A: [E*r, in]`` and ``B: [out, E*r]`` like LoRA, expert by expert.

    A is kaiming-uniform (a=sqrt(5)), which for a stacked tensor is the same distribution as per expert since the
    fan-in is ``in`` either way. B is zero (the adapter starts as the identity) unless ``zero_B`` is False, when it
    gets the same kaiming-uniform init scaled by the rank so that a random adapter changes outputs noticeably without
    blowing them up.
    """
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    if zero_B:
        nn.init.zeros_(lora_B)
    else:
        bound = 1.0 / math.sqrt(rank)
        nn.init.uniform_(lora_B, -bound, bound)


def low_rank_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
    gates: torch.Tensor | None = None,
    mask_per_expert: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adapter output ``scaling * sum_e g_e * B_e(A_e(dropout(x)))`` for ``x: [N, in]``.

    All E experts of rank r are one ``[E*r, in]`` matrix A and one ``[out, E*r]`` matrix B, so the whole mixture is
    two matmuls; gates ``[N, E]`` (zero for unselected experts) scale each expert's rank-r slice in between. An
    unselected expert thus contributes nothing and gets no gradient, exactly as sparse dispatch would, while E*r
    stays small enough (64 for 8 experts of rank 8) that gathering per-expert weights would cost more than it saves.
    Without gates (a single LoRA) it is plain ``B(A(dropout(x)))``.

    By default the experts share one dropout mask per token. ``mask_per_expert``, the ``[N, k]`` indices of each
    token's selected experts, gives each of them a mask of its own, as sparse dispatch draws one per expert call (the
    official MoLA code): while dropout is active, the input is masked k times and every slot's expert reads its own.
    """
    if gates is not None and mask_per_expert is not None and dropout.training and not isinstance(dropout, nn.Identity):
        hidden = _hidden_with_a_mask_per_expert(x, lora_A, gates, mask_per_expert, dropout)
        return F.linear(hidden, lora_B) * scaling
    hidden = F.linear(dropout(x), lora_A)
    if gates is not None:
        num_experts = gates.shape[-1]
        hidden = (hidden.view(x.shape[0], num_experts, -1) * gates.to(hidden.dtype).unsqueeze(-1)).view(x.shape[0], -1)
    return F.linear(hidden, lora_B) * scaling


def _hidden_with_a_mask_per_expert(
    x: torch.Tensor, lora_A: torch.Tensor, gates: torch.Tensor, top_indices: torch.Tensor, dropout: nn.Module
) -> torch.Tensor:
    """``[N, E*r]`` gated expert features where slot s of each token runs its expert on its own dropped input.

    Each of the k masked copies goes through the whole stacked A (k × the small ``E*r`` product, no per-token weight
    gather); each slot then keeps its expert's r features, weighted by its gate, in that expert's place.
    """
    tokens, slots = top_indices.shape
    num_experts = gates.shape[-1]
    dropped = dropout(x.unsqueeze(1).expand(tokens, slots, x.shape[-1]))  # an independent mask per (token, slot)
    every = F.linear(dropped, lora_A).view(tokens, slots, num_experts, -1)
    rank = every.shape[-1]
    index = top_indices.reshape(tokens, slots, 1, 1).expand(tokens, slots, 1, rank)
    picked = every.gather(2, index).squeeze(2) * gates.gather(1, top_indices).to(every.dtype).unsqueeze(-1)
    # top-k indices of a token are distinct: each expert's slice is written at most once
    hidden = picked.new_zeros(tokens, num_experts, rank).scatter(
        1, top_indices.unsqueeze(-1).expand(-1, -1, rank), picked
    )
    return hidden.view(tokens, num_experts * rank)
