"""Routers and the statistics that load-balancing losses are built from.

All routing probabilities are computed in float32 whatever the model dtype (bf16 softmax over a handful of experts
loses the small differences the balance loss pushes on). Padding tokens are excluded from every statistic through a
``token_mask`` of shape ``[N]`` (``True`` = real token); they are still routed, since their outputs are simply
ignored downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RoutingDecision",
    "RoutingStatistics",
    "route_top_k",
    "switch_balance_loss",
    "masked_routing_statistics",
    "usage_entropy",
]


@dataclass
class RoutingDecision:
    """Result of routing ``N`` tokens over ``E`` experts.

    Attributes:
        probs: ``[N, E]`` float32 softmax probabilities (carries gradient to the router).
        gates: ``[N, E]`` float32 mixing weights: the renormalised top-k probabilities, zero elsewhere.
        top_indices: ``[N, k]`` indices of the selected experts.
    """

    probs: torch.Tensor
    gates: torch.Tensor
    top_indices: torch.Tensor


def route_top_k(logits: torch.Tensor, top_k: int) -> RoutingDecision:
    """Softmax in float32, keep the ``top_k`` largest probabilities and renormalise them to sum to one.

    With ``top_k == E`` this is plain soft routing (the renormalisation is then the identity).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    num_experts = probs.shape[-1]
    if top_k >= num_experts:
        indices = torch.arange(num_experts, device=probs.device).expand(probs.shape[0], num_experts)
        return RoutingDecision(probs=probs, gates=probs, top_indices=indices)
    top_weights, top_indices = probs.topk(top_k, dim=-1)
    top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, top_indices, top_weights)
    return RoutingDecision(probs=probs, gates=gates, top_indices=top_indices)


@dataclass
class RoutingStatistics:
    """Sufficient statistics of one routing call for the Switch-style balance loss.

    Several routers of one layer (e.g. MoLA's seven projections) combine by adding their statistics, which is the
    same as concatenating their tokens, as the official code does.

    Attributes:
        assignment_counts: ``[E]`` number of top-k assignments per expert over real tokens (no gradient).
        prob_sums: ``[E]`` sum of routing probabilities per expert over real tokens (carries gradient).
        num_tokens: scalar tensor, number of real tokens.
        top_k: experts chosen per token.
    """

    assignment_counts: torch.Tensor
    prob_sums: torch.Tensor
    num_tokens: torch.Tensor
    top_k: int

    def __add__(self, other: RoutingStatistics) -> RoutingStatistics:
        if self.top_k != other.top_k or self.prob_sums.shape != other.prob_sums.shape:
            raise ValueError("Routing statistics of routers with different expert counts or top_k cannot be combined.")
        return RoutingStatistics(
            assignment_counts=self.assignment_counts + other.assignment_counts,
            prob_sums=self.prob_sums + other.prob_sums,
            num_tokens=self.num_tokens + other.num_tokens,
            top_k=self.top_k,
        )

    @property
    def expert_fraction(self) -> torch.Tensor:
        """f_e: fraction of the top-k assignments that went to each expert."""
        return self.assignment_counts / (self.num_tokens.clamp(min=1) * self.top_k)

    @property
    def mean_probs(self) -> torch.Tensor:
        """P_e: mean routing probability of each expert."""
        return self.prob_sums / self.num_tokens.clamp(min=1)


def masked_routing_statistics(decision: RoutingDecision, token_mask: torch.Tensor | None) -> RoutingStatistics:
    """Reduce a routing decision to balance-loss statistics over the tokens ``token_mask`` keeps (None: all).

    Counting by weights rather than by boolean indexing keeps it free of device syncs.
    """
    probs, top_indices = decision.probs, decision.top_indices
    num_experts, top_k = probs.shape[-1], top_indices.shape[-1]
    if token_mask is None:
        prob_sums = probs.sum(dim=0)
        num_tokens = torch.tensor(float(probs.shape[0]), device=probs.device)
        weights = None
    else:
        weights = token_mask.to(probs.dtype)
        # where(), not a product: a masked-out row's probabilities may be NaN, and NaN * 0 is NaN
        prob_sums = torch.where(token_mask.unsqueeze(-1), probs, torch.zeros_like(probs)).sum(dim=0)
        num_tokens = weights.sum()
    with torch.no_grad():
        selected = top_indices.reshape(-1)
        counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
        if weights is None:
            counts.scatter_add_(0, selected, torch.ones_like(selected, dtype=probs.dtype))
        else:
            counts.scatter_add_(0, selected, weights.repeat_interleave(top_k))
    return RoutingStatistics(assignment_counts=counts, prob_sums=prob_sums, num_tokens=num_tokens, top_k=top_k)


def switch_balance_loss(stats: RoutingStatistics) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (equals 1 for a perfectly uniform router)."""
    num_experts = stats.prob_sums.shape[-1]
    return num_experts * torch.dot(stats.expert_fraction.detach(), stats.mean_probs)


def usage_entropy(fractions: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of an expert-usage distribution; log(E) is perfectly balanced, 0 is collapsed."""
    p = fractions / fractions.sum().clamp(min=1e-12)
    return -(p * torch.log(p.clamp(min=1e-12))).sum()
