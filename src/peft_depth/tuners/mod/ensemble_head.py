"""MoD's ensemble head: the late layers' normalised states mixed into the final one, and the per-adapter record.

``mix_delta`` gives ``g · Σ_l w_l (N_l(h_l) − N_L(h_L))`` for logit-space mixing (added to the final norm's output,
so one LM-head projection of the sum equals mixing per-layer logits); ``log_prob_mix`` adds
``g · Σ_l w_l (log_softmax(z_l) − log_softmax(z_L))`` to the head's logits for ``mix_space="log_probs"``.
``make_record`` reduces the routing weights over real tokens and computes the distillation loss through the frozen
head (``distill.py``).

Non-finite routing (``nonfinite_routing``, ``core.nonfinite``): ``route`` flags the rows whose routing scores are NaN
or infinite. Under ``"base_path"`` those rows get no ensemble contribution (their output is the base model's
final-layer output, exactly), are left out of the mean weights and the distillation, and are counted in the record,
all with ``torch.where``-style masking and no device sync; every other row computes what it computes alone. A row is
a token; for ``router_granularity="sequence"`` the running mean carries a non-finite value to every later position of
that sequence, so the sequence takes the base path from its first non-finite position on (earlier positions were
routed before it, as in cached generation), and ``nonfinite_rows`` counts sequences. Under ``"raise"`` ``route``
raises ``NonFiniteRoutingError`` naming the adapter and its layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.nonfinite import check_routing_scores
from .config import MoDConfig
from .distill import chunked_distillation_kl
from .forward_state import CallInfo, MoDRecord
from .layer import MoDEnsemble

__all__ = ["PendingLogProbMix", "distill_mask", "log_prob_mix", "make_record", "mix_delta", "route"]


@dataclass
class PendingLogProbMix:
    """One adapter's log-probability mix waiting for the LM head."""

    states: torch.Tensor  # [K−1, B, T, d] normalised states of the earlier late layers
    weights: torch.Tensor  # [B, T, K] routing weights
    gate: torch.Tensor  # [1]
    nonfinite: torch.Tensor  # [B, T] rows that take the base path


def route(
    ensemble: MoDEnsemble, router_input: torch.Tensor | None, shape: tuple[int, int], policy: str, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T, K] float32 weights, [B, T] bool non-finite rows)`` of ``ensemble``'s router under ``policy``."""
    scores = ensemble.router(router_input, shape)
    nonfinite = check_routing_scores(scores, policy, where)
    # finite stand-in scores for those rows (their mix is dropped anyway), so neither softmax nor its backward is NaN
    weights = torch.softmax(scores.masked_fill(nonfinite.unsqueeze(-1), 0.0), dim=-1)
    return weights, nonfinite


def mix_delta(
    states: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor, nonfinite: torch.Tensor
) -> torch.Tensor:
    """``[B, T, d]``: ``g · Σ_l w_l (states_l − base)`` over the earlier late layers (logit-space mixing), zero on
    the ``nonfinite`` rows."""
    diff = states - base.unsqueeze(0).to(states.dtype)
    delta = torch.einsum("btk,kbtd->btd", weights[..., :-1].to(diff.dtype), diff)
    return (delta * gate.to(delta.dtype)).masked_fill(nonfinite.unsqueeze(-1), 0.0)


def log_prob_mix(
    head: nn.Linear, hidden: torch.Tensor, logits: torch.Tensor, pending: list[PendingLogProbMix]
) -> torch.Tensor:
    """``logits`` plus each pending adapter's ``g · Σ w_l (log q_l − log p_L)`` at the positions the head received.

    Adding it to the logits z_L mixes log-probabilities exactly (z_L and log p_L differ by a per-position constant
    that softmax ignores), and leaves the logits bit-identical when g = 0.
    """
    keep = hidden.shape[1]
    weight, bias = head.weight, head.bias
    base_log_probs = torch.log_softmax(logits.float(), dim=-1)
    delta = None
    for mix in pending:
        states, weights, nonfinite = mix.states[:, :, -keep:], mix.weights[:, -keep:], mix.nonfinite[:, -keep:]
        for k in range(states.shape[0]):
            layer_logits = torch.nn.functional.linear(states[k].to(weight.dtype), weight, bias).float()
            term = weights[..., k : k + 1] * (torch.log_softmax(layer_logits, dim=-1) - base_log_probs)
            term = (term * mix.gate.float()).masked_fill(nonfinite.unsqueeze(-1), 0.0)
            delta = term if delta is None else delta + term
    return (logits.float() + delta).to(logits.dtype)


def distill_mask(
    call: CallInfo, mask: torch.Tensor | None, batch: int, seq: int, training: bool, device: torch.device
) -> torch.Tensor | None:
    """``[B, T]`` bool: positions whose next-token prediction is distilled (None: distillation off)."""
    has_labels = call.labels is not None or call.shift_labels is not None
    if not (training or has_labels):
        return None
    if call.shift_labels is not None and tuple(call.shift_labels.shape) == (batch, seq):
        return call.shift_labels.to(device=device if mask is None else mask.device) != -100
    if call.labels is not None and tuple(call.labels.shape) == (batch, seq):
        valid = torch.zeros(batch, seq, dtype=torch.bool, device=call.labels.device)
        valid[:, :-1] = call.labels[:, 1:] != -100
        return valid
    if mask is not None:
        return mask.bool()
    return torch.ones(batch, seq, dtype=torch.bool, device=device)


def make_record(
    ensemble: MoDEnsemble,
    config: MoDConfig,
    states: torch.Tensor,
    base: torch.Tensor,
    weights: torch.Tensor,
    nonfinite: torch.Tensor,
    mask: torch.Tensor | None,
    distill_positions_mask: torch.Tensor | None,
    head: nn.Linear,
    logit_transform: tuple[float, float | None],
    distill_coef: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    subsample: bool = True,
) -> MoDRecord:
    """The routing statistics of one adapter over real tokens with finite scores and, when distillation runs, its
    loss over the distilled positions among them (a random ``distill_fraction`` of them when ``subsample``: in
    training only, so that an evaluation with labels is exact, repeatable and leaves the global RNG alone)."""
    with torch.no_grad():
        counted = ~nonfinite if mask is None else mask.bool() & ~nonfinite
        num_tokens = counted.sum()
        mean_weight = weights.masked_fill(~counted.unsqueeze(-1), 0.0).sum(dim=(0, 1)) / num_tokens.clamp(min=1)
    record = MoDRecord(
        layers=list(ensemble.layer_indices),
        mean_weight=mean_weight.detach(),
        num_tokens=num_tokens,
        # read lazily (no device sync per forward), from a copy: the parameter itself changes with the next optimizer
        # step, and under FSDP2 its gathered storage is freed once the gradients are reduced
        gate=ensemble.gate.detach().to(torch.float32, copy=True),
        nonfinite=nonfinite if mask is None else nonfinite & mask.bool(),
        rows_are_sequences=config.router_granularity == "sequence",
    )
    if distill_positions_mask is None or distill_coef == 0:
        return record
    distilled = distill_positions_mask.to(states.device) & ~nonfinite.to(states.device)
    positions = distilled.reshape(-1).nonzero().squeeze(1)
    if subsample and config.distill_fraction < 1.0 and positions.numel() > 0:
        keep = max(1, round(config.distill_fraction * positions.numel()))
        positions = positions[torch.randperm(positions.numel(), device=positions.device)[:keep]]
    num_layers, hidden = states.shape[0], states.shape[-1]
    kl = chunked_distillation_kl(
        states.reshape(num_layers, -1, hidden)[:, positions],
        base.reshape(-1, hidden)[positions],
        head.weight,
        head.bias,
        temperature=config.distill_temperature,
        multiplier=logit_transform[0],
        softcap=logit_transform[1],
        chunk_size=config.distill_chunk_size,
    )
    if reduce is not None:
        # across processes (``sync_routing_stats``): the mean over the global batch's distilled positions, as one
        # process computes it, not the mean of per-process means (those weight a short shard's positions more)
        count = torch.tensor(float(positions.numel()), device=kl.device)
        kl = reduce(kl * count) / reduce(count).clamp_min(1)
    record.distill_loss = kl.sum() * config.distill_temperature**2
    record.distill_kl = kl.detach()
    record.distill_positions = int(positions.numel())
    return record
