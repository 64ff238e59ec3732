"""MoLEx's routing decision for one layer: which expert layer each token uses, and the balance-loss statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.context import RoutingContext

__all__ = ["LayerRecord", "MoLExDecision", "decide"]


@dataclass
class MoLExDecision:
    """Routing of the ``N = batch·seq`` tokens of one MoLEx layer.

    Attributes:
        probs: ``[N, L]`` float32 gate probabilities (0 for non-candidates); carries gradient to the gate.
        chosen: ``[N]`` expert layer used by each token (for padding tokens in ``"token"`` mode: the layer itself).
        row_choice: ``[batch]`` layer chosen per sequence (``"sequence"``), else None.
        experts: the distinct chosen layers, ascending (Python ints; each other than the layer itself costs a pass).
    """

    probs: torch.Tensor
    chosen: torch.Tensor
    row_choice: torch.Tensor | None
    experts: list[int]


@dataclass
class LayerRecord:
    """What one MoLEx layer's last forward leaves for the balance loss and the statistics (real tokens only)."""

    prob_sums: torch.Tensor  # [L], with gradient
    counts: torch.Tensor  # [L] real tokens routed to each layer, no gradient
    num_tokens: torch.Tensor  # scalar
    num_candidates: int
    alpha: float
    chosen: int | list[int]  # the voted j (batch_vote), per-sequence j (sequence), distinct j's (token)


def _votes(chosen: torch.Tensor, weights: torch.Tensor, num_layers: int) -> torch.Tensor:
    """``[..., L]`` vote counts: ``chosen [..., T]`` one-hot, weighted by ``weights [..., T]``, summed over T."""
    votes = torch.zeros(*chosen.shape[:-1], num_layers, dtype=torch.float32, device=chosen.device)
    return votes.scatter_add_(-1, chosen, weights.float())


def decide(
    logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    routing: str,
    shape: tuple[int, int],
    token_mask: torch.Tensor | None,
    own_index: int,
    context: RoutingContext,
) -> MoLExDecision:
    """Route the tokens of one layer.

    ``logits [N, L]`` come from the gate; non-candidates are masked out before the softmax. Padding tokens
    (``token_mask`` False) never vote. ``"batch_vote"`` sums the votes over processes when the routing context syncs,
    so every process picks the same j for the global batch.
    """
    batch, seq = shape
    num_layers = logits.shape[-1]
    probs = torch.softmax(logits.float().masked_fill(~candidate_mask, float("-inf")), dim=-1)
    top1 = probs.detach().argmax(dim=-1)
    real = torch.ones_like(top1, dtype=torch.bool) if token_mask is None else token_mask
    row_choice = None
    if routing == "batch_vote":
        votes = context.reduce_sum(_votes(top1, real, num_layers))
        if votes.sum() == 0:  # no real token anywhere: let every token vote
            votes = _votes(top1, torch.ones_like(real), num_layers)
        # argmax takes the lowest index among ties, a deterministic stand-in for the official torch.mode
        j = int(votes.argmax())
        chosen = torch.full_like(top1, j)
        experts = [j]
    elif routing == "sequence":
        row_real = real.view(batch, seq)
        # a row without real tokens lets all its tokens vote
        row_real = row_real | ~row_real.any(dim=-1, keepdim=True)
        row_choice = _votes(top1.view(batch, seq), row_real, num_layers).argmax(dim=-1)
        chosen = row_choice.repeat_interleave(seq)
        experts = sorted(set(row_choice.tolist()))
    elif routing == "token":
        # padding tokens take the layer itself: their outputs are ignored, so they must not cost an expert pass
        chosen = torch.where(real, top1, torch.full_like(top1, own_index))
        experts = torch.unique(chosen).tolist()
    else:
        raise ValueError(f"Unknown routing {routing!r}.")
    return MoLExDecision(probs=probs, chosen=chosen, row_choice=row_choice, experts=experts)


def layer_statistics(
    decision: MoLExDecision, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prob_sums [L] with gradient, counts [L], num_tokens)`` over the real tokens."""
    probs = decision.probs
    if token_mask is None:
        prob_sums = probs.sum(dim=0)
        chosen = decision.chosen
        num_tokens = torch.tensor(float(probs.shape[0]), device=probs.device)
    else:
        weights = token_mask.to(probs.dtype)
        prob_sums = weights @ probs
        chosen = decision.chosen[token_mask]
        num_tokens = weights.sum()
    counts = torch.bincount(chosen, minlength=probs.shape[-1]).to(probs.dtype)
    return prob_sums, counts, num_tokens
