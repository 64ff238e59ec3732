"""MoLA's adapted linear layer: a router and a pool of LoRA experts per target linear."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.adapter_placement import DtypeKeepingPlacement
from ...core.checkpointing import NO_GRAD_FORWARD, REPLAY, DeferredGradient, checkpoint_pass
from ...core.context import RoutingContext
from ...core.lora_layer import WeightDeltaMerge, storage_layout
from ...core.low_rank import init_low_rank, linear_features, low_rank_delta
from ...core.nonfinite import check_routing_scores
from ...core.routing import RoutingDecision, RoutingStatistics, masked_routing_statistics, route_top_k

__all__ = ["MoLALayer", "MoLALinear"]


class MoLALayer(DtypeKeepingPlacement, BaseTunerLayer):
    """State of the MoLA adapters on one linear layer (one entry per adapter name in each dict)."""

    adapter_layer_names = ("mola_A", "mola_B", "mola_router")
    other_param_names = (
        "mola_r",
        "mola_num_experts",
        "mola_top_k",
        "mola_scaling",
        "mola_dropout",
        "mola_nonfinite_routing",
        "mola_mask_per_expert",
    )

    def __init__(self, base_layer: nn.Module, layer_index: int | None, context: RoutingContext) -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        #: index of the block this linear sits in (None outside the block stack); groups the balance loss
        self.mola_layer_index = layer_index
        #: peft's switch for casting the input to the adapter's dtype (peft.helpers.disable_input_dtype_casting)
        self.cast_input_dtype_enabled = True
        self.mola_A = nn.ParameterDict({})
        self.mola_B = nn.ParameterDict({})
        self.mola_router = nn.ModuleDict({})
        self.mola_dropout = nn.ModuleDict({})
        self.mola_r: dict[str, int] = {}
        self.mola_num_experts: dict[str, int] = {}
        self.mola_top_k: dict[str, int] = {}
        self.mola_scaling: dict[str, float] = {}
        self.mola_nonfinite_routing: dict[str, str] = {}
        self.mola_mask_per_expert: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._routing_context = context

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
        nonfinite_routing: str = "base_path",
        expert_dropout: str = "per_expert",
        inference_mode: bool = False,
    ) -> None:
        self.mola_r[adapter_name] = r
        self.mola_mask_per_expert[adapter_name] = expert_dropout == "per_expert"
        self.mola_nonfinite_routing[adapter_name] = nonfinite_routing
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
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _publish(self, records: dict[str, _Routed]) -> None:
        # Per forward and per thread (core.forward_context): concurrent forwards never see each other's decisions.
        # Overwritten on each call: gradient checkpointing re-runs this layer during backward and must not double count.
        self._routing_context.forward.state.setdefault(_STATE_KEY, {})[self] = records

    def last_routing(self) -> dict[str, RoutingStatistics]:
        """Routing statistics of this thread's last forward, per active adapter that ran (reduced on first read).

        Decisions are kept with their token mask and reduced to statistics only when read: generation never reads
        them, so decoding skips the reduction.
        """
        records = self._routing_context.forward.state.get(_STATE_KEY, {}).get(self, {})
        for routed in records.values():
            stale = (  # first read under no_grad (a logging callback): reduce again so the loss keeps its graph
                routed.statistics is not None
                and torch.is_grad_enabled()
                and routed.decision.probs.requires_grad
                and not routed.statistics.prob_sums.requires_grad
            )
            if routed.statistics is None or stale:
                routed.statistics = masked_routing_statistics(routed.decision, routed.token_mask)
        return {
            name: routed.statistics
            if routed.deferred is None
            # recorded in a reentrant checkpoint's no-grad pass: the gradient reaches the router in the replay
            else replace(routed.statistics, prob_sums=routed.deferred.attach(routed.statistics.prob_sums))
            for name, routed in records.items()
        }

    def last_nonfinite_rows(self) -> dict[str, int]:
        """Tokens of this thread's last forward whose routing scores were not finite, per adapter (a device sync)."""
        records = self._routing_context.forward.state.get(_STATE_KEY, {}).get(self, {})
        return {name: int(routed.nonfinite.sum()) for name, routed in records.items()}


_STATE_KEY = "mola"


class _Routed:
    """One adapter's routing in one forward of one layer."""

    __slots__ = ("decision", "token_mask", "nonfinite", "statistics", "deferred")

    def __init__(
        self,
        decision: RoutingDecision,
        token_mask: torch.Tensor,
        nonfinite: torch.Tensor,
        deferred: DeferredGradient | None = None,
    ) -> None:
        self.decision = decision
        self.token_mask = token_mask  # real (non-padding) tokens with finite routing scores
        self.nonfinite = nonfinite
        self.statistics: RoutingStatistics | None = None
        # set when recorded without gradient in a reentrant checkpoint's forward (core.checkpointing)
        self.deferred = deferred


class MoLALinear(WeightDeltaMerge, nn.Module, MoLALayer):
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

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The weight update of a one-expert adapter: its router always gives that expert weight 1, so it is plain
        LoRA. With more experts which ones apply depends on each token (the router): no fixed delta exists."""
        if self.mola_num_experts[adapter_name] != 1:
            raise ValueError(
                f"MoLA adapter {adapter_name!r} has {self.mola_num_experts[adapter_name]} experts on layer "
                f"{self.mola_layer_index}: which experts apply depends on each token's input (the router), so there is "
                "no single weight delta to merge. Only one-expert MoLA adapters merge; keep this one unmerged."
            )
        delta = (self.mola_B[adapter_name] @ self.mola_A[adapter_name]) * self.mola_scaling[adapter_name]
        return storage_layout(delta, self.get_base_layer())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            self._publish({})
            return result
        # Build the records aside and publish them at the end: torch's non-reentrant checkpointing may stop a
        # recomputation part-way through this forward once it has what backward needs.
        records: dict[str, _Routed] = {}
        padding_mask = None
        grad_pass = checkpoint_pass()
        # A replay of a checkpointed forward is no forward of its own: the forward's records stay.
        recorded = self._routing_context.forward.state.get(_STATE_KEY, {}).get(self, {}) if grad_pass == REPLAY else {}
        for adapter_name in self.active_adapters:
            if adapter_name not in self.mola_A:
                continue
            lora_A = self.mola_A[adapter_name]
            x_flat = self._cast_input_dtype(x.reshape(-1, self.in_features), lora_A.dtype)
            logits = self.mola_router[adapter_name](x_flat)
            nonfinite = check_routing_scores(
                logits, self.mola_nonfinite_routing.get(adapter_name, "base_path"), self._where(adapter_name)
            )
            # A token with non-finite scores takes the base path: routed on zeros (so top-k stays well defined), its
            # gates zeroed, and left out of the balance statistics. No sync: all masks stay on the device.
            logits = torch.where(nonfinite.unsqueeze(-1), torch.zeros_like(logits), logits)
            decision = route_top_k(logits, self.mola_top_k[adapter_name])
            decision.gates = decision.gates * (~nonfinite).unsqueeze(-1).to(decision.gates.dtype)
            delta = low_rank_delta(
                x_flat,
                lora_A,
                self.mola_B[adapter_name],
                self.mola_scaling[adapter_name],
                self.mola_dropout[adapter_name],
                gates=decision.gates,
                mask_per_expert=decision.top_indices if self.mola_mask_per_expert.get(adapter_name, True) else None,
            )
            forward_record = recorded.get(adapter_name)
            if forward_record is not None and forward_record.deferred is not None:
                live = masked_routing_statistics(decision, forward_record.token_mask).prob_sums
                delta = forward_record.deferred.inject(delta, live)
            result = result + delta.view(result.shape).to(result.dtype)
            if padding_mask is None:
                padding_mask = self._routing_context.flat_mask(x.shape)
            token_mask = ~nonfinite if padding_mask is None else padding_mask & ~nonfinite
            deferred = None
            if grad_pass == NO_GRAD_FORWARD:  # the balance loss also trains what feeds x, even with a frozen router
                deferred = DeferredGradient(f"MoLA adapter {adapter_name!r} on layer {self.mola_layer_index}")
            records[adapter_name] = _Routed(decision, token_mask, nonfinite, deferred)
        if grad_pass != REPLAY:
            self._publish(records)
        return result

    def _where(self, adapter_name: str) -> str:
        return f"MoLA adapter {adapter_name!r}, layer {self.mola_layer_index}"

    def __repr__(self) -> str:
        return "mola." + super().__repr__()
