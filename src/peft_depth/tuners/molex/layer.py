"""MoLEx's per-adapter modules: the gates that score the layers as experts, and the learned mixing weight α.

They live on the tuner (``MoLExModel.molex_gate`` / ``molex_alpha``, keyed by adapter name), with per-layer entries
keyed ``"layer<i>"`` (numeric key parts can be dropped by peft's adapter-name key filter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosineGate", "LinearGate", "MoLExAlpha", "SHARED_GATE_KEY", "build_gate", "layer_key"]

#: Key of the single gate when all MoLEx layers share one (the official default).
SHARED_GATE_KEY = "shared"


def layer_key(index: int) -> str:
    """String key of block ``index`` in the per-layer dicts ("layer3")."""
    return f"layer{index}"


class LinearGate(nn.Module):
    """``Linear(hidden, L)`` with bias and PyTorch's default init, as the official gate; float32 logits."""

    def __init__(self, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype)).float()


class CosineGate(nn.Module):
    """The official ``CosineTopKGate``: cosine similarity between a projection of the token and L expert embeddings.

    ``logits = cos(W x + b, e_l) · exp(min(t, log 100))`` with e ~ N(0, 0.01) and t0 = log 2 (learned temperature).

    The projection is normalised per token (``dim=-1``). The official gate receives ``[batch, seq, proj]`` and
    normalises ``dim=1``, over the sequence: a token's logits then change with the sequence's length and with tokens
    after it (padding included, and the future in a decoder), which a per-token cosine is not meant to do.
    """

    def __init__(self, hidden_size: int, num_layers: int, proj_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, proj_dim)
        self.experts = nn.Parameter(torch.empty(num_layers, proj_dim))
        nn.init.normal_(self.experts, 0.0, 0.01)
        # shape (1,), not 0-d: FSDP refuses scalar parameters
        self.log_scale = nn.Parameter(torch.full((1,), math.log(2.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(self.proj(x.to(self.proj.weight.dtype)).float(), dim=-1)
        experts = F.normalize(self.experts.float(), dim=-1)
        scale = self.log_scale.float().clamp(max=math.log(100.0)).exp()
        return (projected @ experts.T) * scale


def build_gate(gate_type: str, hidden_size: int, num_layers: int, proj_dim: int) -> nn.Module:
    if gate_type == "linear":
        return LinearGate(hidden_size, num_layers)
    if gate_type == "cosine":
        return CosineGate(hidden_size, num_layers, proj_dim)
    raise ValueError(f"`gate_type` must be 'linear' or 'cosine'; got {gate_type!r}.")


class MoLExAlpha(nn.Module):
    """Learned α: ``α = softmax(w)[0]`` over ``w = (w_own, w_other)``, one pair per MoLEx layer or one shared by all.

    Initialised to ``(log α0, log(1 − α0))`` so that training starts at the fixed default α0 (the official code starts
    both weights at 0.5, i.e. α0 = 0.5). ``shared``: one pair under ``SHARED_GATE_KEY``, as the official encoder holds
    one ``weight_main``/``weight_other`` pair for all layers when the gate is shared.
    """

    def __init__(self, layer_indices: list[int], alpha: float, *, shared: bool = False) -> None:
        super().__init__()
        init = torch.tensor([math.log(alpha), math.log(1.0 - alpha)])
        keys = [SHARED_GATE_KEY] if shared else [layer_key(i) for i in layer_indices]
        self.weights = nn.ParameterDict({key: nn.Parameter(init.clone()) for key in keys})
        self.shared = shared

    def forward(self, index: int) -> torch.Tensor:
        """α of block ``index`` as a float32 scalar tensor (differentiable)."""
        key = SHARED_GATE_KEY if self.shared else layer_key(index)
        return torch.softmax(self.weights[key].float(), dim=-1)[0]
