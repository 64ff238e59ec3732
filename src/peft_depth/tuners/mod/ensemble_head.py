"""MoD's ensemble head: the late layers' normalised states mixed into the final one, and the per-adapter record.

``mix_delta`` gives ``g · Σ_l w_l (N_l(h_l) − N_L(h_L))`` for logit-space mixing (added to the final norm's output,
so one LM-head projection of the sum equals mixing per-layer logits); ``log_prob_mix`` adds
``g · Σ_l w_l (log_softmax(z_l) − log_softmax(z_L))`` to the head's logits for ``mix_space="log_probs"``.
``make_record`` reduces the routing weights over real tokens and computes the distillation loss through the frozen
head (``distill.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoDConfig
from .distill import chunked_distillation_kl
from .forward_state import CallInfo, MoDRecord
from .layer import MoDEnsemble

__all__ = ["distill_mask", "log_prob_mix", "make_record", "mix_delta", "PendingLogProbMix"]

#: One adapter's log-probability mix waiting for the LM head: states ``[K−1, B, T, d]``, weights ``[B, T, K]``, gate.
PendingLogProbMix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def mix_delta(states: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]``: ``g · Σ_l w_l (states_l − base)`` over the earlier late layers (logit-space mixing)."""
    diff = states - base.unsqueeze(0).to(states.dtype)
    delta = torch.einsum("btk,kbtd->btd", weights[..., :-1].to(diff.dtype), diff)
    return delta * gate.to(delta.dtype)


def log_prob_mix(head: nn.Linear, hidden: torch.Tensor, logits: torch.Tensor, pending: list[PendingLogProbMix]):
    """``logits`` plus each pending adapter's ``g · Σ w_l (log q_l − log p_L)`` at the positions the head received.

    Adding it to the logits z_L mixes log-probabilities exactly (z_L and log p_L differ by a per-position constant
    that softmax ignores), and leaves the logits bit-identical when g = 0.
    """
    keep = hidden.shape[1]
    weight, bias = head.weight, head.bias
    base_log_probs = torch.log_softmax(logits.float(), dim=-1)
    delta = None
    for states, weights, gate in pending:
        states, weights = states[:, :, -keep:], weights[:, -keep:]
        for k in range(states.shape[0]):
            layer_logits = torch.nn.functional.linear(states[k].to(weight.dtype), weight, bias).float()
            term = weights[..., k : k + 1] * (torch.log_softmax(layer_logits, dim=-1) - base_log_probs)
            term = term * gate.float()
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
    mask: torch.Tensor | None,
    distill_positions_mask: torch.Tensor | None,
    head: nn.Linear,
    softcap: float | None,
) -> MoDRecord:
    """The routing statistics of one adapter over real tokens and, when distillation runs, its loss."""
    with torch.no_grad():
        if mask is None:
            mean_weight = weights.mean(dim=(0, 1))
            num_tokens = weights.shape[0] * weights.shape[1]
        else:
            m = mask.unsqueeze(-1).to(weights.dtype)
            num_tokens = mask.sum()
            mean_weight = (weights * m).sum(dim=(0, 1)) / num_tokens.clamp(min=1)
    record = MoDRecord(
        layers=list(ensemble.layer_indices),
        mean_weight=mean_weight.detach(),
        num_tokens=num_tokens,
        gate=ensemble.gate.detach().float(),  # read lazily: no device sync per forward
    )
    if distill_positions_mask is None or config.distill_loss_coef == 0:
        return record
    positions = distill_positions_mask.to(states.device).reshape(-1).nonzero().squeeze(1)
    if config.distill_fraction < 1.0 and positions.numel() > 0:
        keep = max(1, round(config.distill_fraction * positions.numel()))
        positions = positions[torch.randperm(positions.numel(), device=positions.device)[:keep]]
    num_layers, hidden = states.shape[0], states.shape[-1]
    kl = chunked_distillation_kl(
        states.reshape(num_layers, -1, hidden)[:, positions],
        base.reshape(-1, hidden)[positions],
        head.weight,
        head.bias,
        temperature=config.distill_temperature,
        softcap=softcap,
        chunk_size=config.distill_chunk_size,
    )
    record.distill_loss = kl.sum() * config.distill_temperature**2
    record.distill_kl = kl.detach()
    record.distill_positions = int(positions.numel())
    return record
