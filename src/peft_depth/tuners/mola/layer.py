"""MoLA's adapted linear layer: a router and a pool of LoRA experts per target linear."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.context import RoutingContext
from ...core.low_rank import init_low_rank, linear_features, low_rank_delta
from ...core.routing import RoutingDecision, RoutingStatistics, masked_routing_statistics, route_top_k

__all__ = ["MoLALayer", "MoLALinear"]


class MoLALayer(BaseTunerLayer):
    """State of the MoLA adapters on one linear layer (one entry per adapter name in each dict)."""

    adapter_layer_names = ("mola_A", "mola_B", "mola_router")
    other_param_names = ("mola_r", "mola_num_experts", "mola_top_k", "mola_scaling", "mola_dropout")

    def __init__(self, base_layer: nn.Module, layer_index: int | None, context: RoutingContext) -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        #: index of the block this linear sits in (None outside the block stack); groups the balance loss
        self.mola_layer_index = layer_index
        self.mola_A = nn.ParameterDict({})
        self.mola_B = nn.ParameterDict({})
        self.mola_router = nn.ModuleDict({})
        self.mola_dropout = nn.ModuleDict({})
        self.mola_r: dict[str, int] = {}
        self.mola_num_experts: dict[str, int] = {}
        self.mola_top_k: dict[str, int] = {}
        self.mola_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._routing_context = context
        # Routing decisions of the last forward per adapter (with that forward's padding mask), reduced to
        # statistics only when read: generation never reads them, so decoding skips the reduction. Overwritten each
        # call (gradient checkpointing re-runs this layer during backward, and must not double count).
        self._mola_last_routing: dict[str, RoutingDecision | RoutingStatistics] = {}
        self._mola_last_mask: torch.Tensor | None = None

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        num_experts: int,
        top_k: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool,
        inference_mode: bool = False,
    ) -> None:
        self.mola_r[adapter_name] = r
        self.mola_num_experts[adapter_name] = num_experts
        self.mola_top_k[adapter_name] = top_k
        self.mola_scaling[adapter_name] = lora_alpha / r
        self.mola_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.mola_dropout[adapter_name].train(self.training)
        lora_A = torch.empty(num_experts * r, self.in_features)
        lora_B = torch.empty(self.out_features, num_experts * r)
        init_low_rank(lora_A, lora_B, r, zero_B=init_lora_weights)
        self.mola_A[adapter_name] = nn.Parameter(lora_A)
        self.mola_B[adapter_name] = nn.Parameter(lora_B)
        # nn.Linear's default init is the official router init (kaiming-uniform, a=sqrt(5)).
        self.mola_router[adapter_name] = nn.Linear(self.in_features, num_experts, bias=False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def last_routing(self) -> dict[str, RoutingStatistics]:
        """Routing statistics of the last forward, per active adapter that ran (reduced on first read)."""
        records = self._mola_last_routing
        for adapter_name, record in records.items():
            if isinstance(record, RoutingDecision):
                records[adapter_name] = masked_routing_statistics(record, self._mola_last_mask)
        return records


class MoLALinear(nn.Module, MoLALayer):
    """An ``nn.Linear`` / ``Conv1D`` plus routed LoRA experts: ``y = W0 x + Σ_top-k w_e B_e A_e dropout(x) · α/r``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        layer_index: int | None,
        context: RoutingContext,
        **update_kwargs: Any,
    ) -> None:
        super().__init__()
        MoLALayer.__init__(self, base_layer, layer_index, context)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **update_kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "MoLA adapters cannot be merged into the base weights: which experts apply depends on each token's input "
            "(the router), so there is no single weight delta. Keep the adapter unmerged for inference."
        )

    def unmerge(self) -> None:
        # Nothing can ever be merged (see `merge`), so there is nothing to undo.
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            self._mola_last_routing = {}
            return result
        # Build the records aside and publish them at the end: torch's non-reentrant checkpointing may stop a
        # recomputation part-way through this forward once it has what backward needs.
        records: dict[str, RoutingDecision | RoutingStatistics] = {}
        for adapter_name in self.active_adapters:
            if adapter_name not in self.mola_A:
                continue
            lora_A = self.mola_A[adapter_name]
            x_flat = x.reshape(-1, self.in_features).to(lora_A.dtype)
            decision = route_top_k(self.mola_router[adapter_name](x_flat), self.mola_top_k[adapter_name])
            delta = low_rank_delta(
                x_flat,
                lora_A,
                self.mola_B[adapter_name],
                self.mola_scaling[adapter_name],
                self.mola_dropout[adapter_name],
                gates=decision.gates,
            )
            result = result + delta.view(result.shape).to(result.dtype)
            records[adapter_name] = decision
        self._mola_last_mask = self._routing_context.flat_mask(x.shape) if records else None
        self._mola_last_routing = records
        return result

    def __repr__(self) -> str:
        return "mola." + super().__repr__()
