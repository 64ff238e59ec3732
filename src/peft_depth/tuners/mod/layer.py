"""MoD's per-adapter modules: the new norms of the earlier late layers, the router over the K layers, the gate."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["MoDEnsemble", "MoDRouter", "copy_norm", "layer_key"]


def layer_key(index: int) -> str:
    """String key of a block in the per-layer dicts ("layer27"): numeric keys can collide with peft's key filters."""
    return f"layer{index}"


def copy_norm(norm: nn.Module) -> nn.Module:
    """A trainable copy of ``norm`` without its hooks (MoD's own hook on the final norm must not run on the copies)."""
    new = copy.deepcopy(norm)
    for module in new.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            hooks.clear()
    return new


class MoDRouter(nn.Module):
    """Scores whose softmax weighs the K late layers, from the normalised final hidden state (or a static vector).

    Zero-initialised, so the weights start uniform; the gate (not the router) keeps a fresh adapter equal to the base.
    For ``"static"`` only ``bias`` exists: one vector of K logits shared by every token.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        granularity: str,
        temperature: float,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.granularity = granularity
        self.temperature = temperature
        factory = dict(dtype=dtype, device=device)
        self.weight = (
            None if granularity == "static" else nn.Parameter(torch.zeros(num_layers, hidden_size, **factory))
        )
        self.bias = nn.Parameter(torch.zeros(num_layers, **factory))

    def forward(self, router_input: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        """``[batch, seq, K]`` float32 routing scores logits / τ; the weights are their softmax, taken by the caller
        after the non-finite check (``core.nonfinite``). ``router_input`` is ``[batch, seq, hidden]`` (None for
        static)."""
        if self.weight is None:
            logits = self.bias.float().expand(*shape, -1)
        else:
            logits = torch.nn.functional.linear(router_input.to(self.weight.dtype), self.weight, self.bias).float()
        return logits / self.temperature


class MoDEnsemble(nn.Module):
    """Everything one MoD adapter adds: ``norms`` (one per earlier late layer), ``router`` and ``gate``.

    Attributes:
        layer_indices: the K block indices of the ensemble, ascending; the last one is the final block L.
        norms: ``ModuleDict`` ``layer_key(l) -> N_l`` for the K−1 earlier late layers, each a trainable copy of the
            model's final norm (the final layer keeps the pretrained norm, frozen, as the teacher).
        router: ``MoDRouter`` giving weights over ``layer_indices``.
        gate: ``[1]`` learnable gate g of the mix ``base + g · Σ w_l (N_l(h_l) − base)``.
    """

    def __init__(
        self,
        final_norm: nn.Module,
        layer_indices: list[int],
        hidden_size: int,
        *,
        granularity: str,
        temperature: float,
        gate_init: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.layer_indices = list(layer_indices)
        self.norms = nn.ModuleDict({layer_key(index): copy_norm(final_norm) for index in self.layer_indices[:-1]})
        self.router = MoDRouter(
            hidden_size, len(self.layer_indices), granularity, temperature, dtype=dtype, device=device
        )
        self.gate = nn.Parameter(torch.full((1,), float(gate_init), device=device, dtype=dtype))

    @property
    def earlier_layers(self) -> list[int]:
        return self.layer_indices[:-1]

    def normalised_states(self, hidden_states: dict[int, torch.Tensor]) -> torch.Tensor:
        """``[K−1, batch, seq, hidden]``: N_l(h_l) for each earlier late layer."""
        return torch.stack([self.norms[layer_key(index)](hidden_states[index]) for index in self.earlier_layers])
