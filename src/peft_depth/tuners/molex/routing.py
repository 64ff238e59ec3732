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
        base_path: ``[N]`` tokens that take the layer's own output unmixed, because their routing scores (or, for
            ``"sequence"``, those of a real token of their row) were not finite.
        voters: ``[N]`` tokens counted in the decision and the statistics: real (not padding), finite scores.
    """

    probs: torch.Tensor
    chosen: torch.Tensor
    row_choice: torch.Tensor | None
    experts: list[int]
    base_path: torch.Tensor
    voters: torch.Tensor


@dataclass
class LayerRecord:
    """What one MoLEx layer's last forward leaves for the balance loss and the statistics (real tokens only)."""

    prob_sums: torch.Tensor  # [L], with gradient
    counts: torch.Tensor  # [L] real tokens routed to each layer, no gradient
    num_tokens: torch.Tensor  # scalar
    num_candidates: int
    alpha: float
    chosen: int | list[int]  # the voted j (batch_vote), per-sequence j (sequence), distinct j's (token)
    base_path: torch.Tensor | None = None  # [N] tokens that took the layer's own output (non-finite scores)


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
    nonfinite: torch.Tensor,
    own_index: int,
    context: RoutingContext,
) -> MoLExDecision:
    """Route the tokens of one layer.

    ``logits [N, L]`` come from the gate; non-candidates are masked out before the softmax. Padding tokens
    (``token_mask`` False) and tokens with non-finite scores (``nonfinite`` True, ``core.nonfinite``) never vote, so
    one bad request cannot move another row's choice; the latter take the layer's own output. ``"batch_vote"`` sums
    the votes over processes when the routing context syncs, so every process picks the same j for the global batch.
    """
    batch, seq = shape
    num_layers = logits.shape[-1]
    finite_logits = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(logits), logits)
    probs = torch.softmax(finite_logits.float().masked_fill(~candidate_mask, float("-inf")), dim=-1)
    top1 = probs.detach().argmax(dim=-1)
    real = torch.ones_like(top1, dtype=torch.bool) if token_mask is None else token_mask
    voters = real & ~nonfinite
    base_path = nonfinite
    row_choice = None
    if routing == "batch_vote":
        votes = context.reduce_sum(_votes(top1, voters, num_layers))
        if votes.sum() == 0:  # no real token anywhere: let every finite token vote
            votes = _votes(top1, ~nonfinite, num_layers)
        # argmax takes the lowest index among ties, a deterministic stand-in for the official torch.mode; with no
        # finite token at all every token takes the base path and the layer itself stands as the choice
        j = int(votes.argmax()) if votes.sum() > 0 else own_index
        chosen = torch.full_like(top1, j)
        experts = [j]
    elif routing == "sequence":
        row_real, row_bad = real.view(batch, seq), (real & nonfinite).view(batch, seq).any(dim=-1)
        # a row without real tokens lets all its tokens vote
        row_voters = (row_real | ~row_real.any(dim=-1, keepdim=True)) & ~nonfinite.view(batch, seq)
        row_choice = _votes(top1.view(batch, seq), row_voters, num_layers).argmax(dim=-1)
        row_choice = torch.where(row_bad, torch.full_like(row_choice, own_index), row_choice)
        chosen = row_choice.repeat_interleave(seq)
        experts = sorted(set(row_choice.tolist()))
        base_path = row_bad.repeat_interleave(seq)
        voters = voters & ~base_path
    elif routing == "token":
        # padding tokens take the layer itself: their outputs are ignored, so they must not cost an expert pass
        chosen = torch.where(voters, top1, torch.full_like(top1, own_index))
        experts = torch.unique(chosen).tolist()
    else:
        raise ValueError(f"Unknown routing {routing!r}.")
    return MoLExDecision(
        probs=probs, chosen=chosen, row_choice=row_choice, experts=experts, base_path=base_path, voters=voters
    )


def layer_statistics(decision: MoLExDecision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prob_sums [L] with gradient, counts [L], num_tokens)`` over the voting tokens (no device sync)."""
    probs, voters = decision.probs, decision.voters
    prob_sums = torch.where(voters.unsqueeze(-1), probs, torch.zeros_like(probs)).sum(dim=0)
    weights = voters.to(probs.dtype)
    counts = torch.zeros(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, decision.chosen, weights)
    return prob_sums, counts, weights.sum()
