"""MoLA tuner: injects routed LoRA experts and turns their routing records into the balance loss and statistics."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ...core.aux import AuxLossTerm
from ...core.checkpointing import replay_checkpointed_layers
from ...core.routing import RoutingStatistics, switch_balance_loss, usage_entropy
from ...core.targets import ALL_PROJECTIONS_TARGET_MODULES_MAPPING
from ...core.tuner import DepthTuner
from .config import MoLAConfig
from .layer import MoLALayer, MoLALinear

__all__ = ["MoLAModel"]


class MoLAModel(DepthTuner):
    """Creates a MoLA model from a pretrained transformers model (https://arxiv.org/abs/2402.08562).

    Use through ``peft.get_peft_model(model, MoLAConfig(...))`` after ``import peft_depth``.
    """

    prefix: str = "mola_"
    tuner_layer_cls = MoLALayer
    target_module_mapping = ALL_PROJECTIONS_TARGET_MODULES_MAPPING

    @property
    def merge_refusal_reason(self) -> str | None:  # type: ignore[override]
        """None when every MoLA layer of the adapters being merged has one expert (always weight 1: plain LoRA,
        merged exactly). Other adapters the model holds do not count."""
        merging = set(self.merging_adapters())
        routed: dict[str, set] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, MoLALayer):
                for adapter, experts in module.mola_num_experts.items():
                    if adapter in merging and experts != 1:
                        where = module.mola_layer_index if module.mola_layer_index is not None else name
                        routed.setdefault(adapter, set()).add(where)
        if not routed:
            return None
        listed = "; ".join(
            f"{adapter!r}: layers {sorted(layers, key=str)}" for adapter, layers in sorted(routed.items())
        )
        return (
            "the experts applied to each token are chosen by a router from that token's input (more than one expert "
            f"in {listed}), so the adapter is not a fixed weight delta. Keep it unmerged (inference runs the same "
            "routing as training); only one-expert MoLA adapters merge."
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config: MoLAConfig = self.peft_config[adapter_name]
        stack = self.layer_stack
        # Validate the allocation against the real depth before any module is created.
        config.allocation(stack.num_layers if stack is not None else None)
        super().inject_adapter(model, adapter_name, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Under reentrant checkpointing the routers' balance-loss gradient reaches them through the blocks' replays
        # (core.checkpointing); gradient_checkpointing_enable may have been called at any time before this forward.
        if self.layer_stack is not None:
            replay_checkpointed_layers(self.layer_stack.layers)
        return super().forward(*args, **kwargs)

    def _create_and_replace(
        self,
        config: MoLAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        stack = self.layer_stack
        layer_index = stack.layer_index(current_key) if stack is not None else None
        allocation = config.allocation(stack.num_layers if stack is not None else None)
        if config.is_per_layer:
            if layer_index is None:
                raise ValueError(
                    f"Target `{current_key}` lies outside the block stack `{stack.path}`, but `num_experts`/`top_k`/"
                    "`expert_pattern` allocate experts per layer. Exclude it from `target_modules` or give "
                    "`num_experts` and `top_k` as ints."
                )
            num_experts, top_k = allocation[0][layer_index], allocation[1][layer_index]
        else:
            num_experts, top_k = allocation
        update_kwargs = dict(
            r=config.r,
            num_experts=num_experts,
            top_k=top_k,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            nonfinite_routing=config.nonfinite_routing,
            expert_dropout=config.expert_dropout,
            inference_mode=config.inference_mode,
        )
        if isinstance(target, MoLALayer):
            target.update_layer(adapter_name, **update_kwargs)
            return
        new_module = MoLALinear(
            target,
            adapter_name,
            layer_index=layer_index,
            context=self.routing_context,
            **update_kwargs,
        )
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ routing records -> losses and statistics

    def _routing_by_layer(self) -> dict[str, dict[Any, tuple[RoutingStatistics, int]]]:
        """Last-forward routing statistics per adapter and block, combined over the block's target modules.

        Adding the statistics of a block's routers is the official concatenation of their tokens. Each value is
        ``(statistics, number of routers combined)``.
        """
        grouped: dict[str, dict[Any, tuple[RoutingStatistics, int]]] = defaultdict(dict)
        for name, module in self.model.named_modules():
            if not isinstance(module, MoLALayer):
                continue
            group = module.mola_layer_index if module.mola_layer_index is not None else name
            for adapter_name, stats in module.last_routing().items():
                previous = grouped[adapter_name].get(group)
                grouped[adapter_name][group] = (
                    (stats, 1) if previous is None else (previous[0] + stats, previous[1] + 1)
                )
        if self.routing_context.syncing:
            self._sum_over_processes(grouped)
        return grouped

    def _sum_over_processes(self, grouped: dict[str, dict[Any, tuple[RoutingStatistics, int]]]) -> None:
        """Replace each layer's statistics by their sum over processes (``sync_routing_stats``), in place.

        The balance loss f·P is then that of the global batch on every process, so after DDP averages the gradients
        they equal a single-process run on the same global batch. Two collectives in all: one differentiable for the
        probability sums, one for the counts (the iteration order is the same on every process).
        """
        keys = [(adapter_name, group) for adapter_name, layers in grouped.items() for group in layers]
        if not keys:
            return
        stats = [grouped[a][g][0] for a, g in keys]
        context = self.routing_context
        prob_sums = context.reduce_sum(torch.cat([s.prob_sums.float() for s in stats]))
        counts = context.reduce_sum(
            torch.cat([torch.cat([s.assignment_counts.float(), s.num_tokens.float().reshape(1)]) for s in stats])
        )
        p_offset = c_offset = 0
        for (adapter_name, group), old in zip(keys, stats):
            num_experts = old.prob_sums.numel()
            grouped[adapter_name][group] = (
                RoutingStatistics(
                    assignment_counts=counts[c_offset : c_offset + num_experts],
                    prob_sums=prob_sums[p_offset : p_offset + num_experts],
                    num_tokens=counts[c_offset + num_experts],
                    top_k=old.top_k,
                ),
                grouped[adapter_name][group][1],
            )
            p_offset += num_experts
            c_offset += num_experts + 1

    def depth_aux_terms(self) -> dict[str, AuxLossTerm]:
        terms: dict[str, AuxLossTerm] = {}
        by_adapter = self._routing_by_layer()
        for adapter_name, layers in by_adapter.items():
            if not layers:
                continue
            loss = torch.stack([switch_balance_loss(stats) for stats, _ in layers.values()]).sum()
            key = "routing" if len(by_adapter) == 1 else f"routing.{adapter_name}"
            terms[key] = AuxLossTerm(loss, float(self.peft_config[adapter_name].balance_loss_coef))
        return terms

    def _nonfinite_by_layer(self) -> dict[str, dict[Any, int]]:
        """Tokens of the last forward whose routing scores were not finite, per adapter and block (summed over the
        block's routers: a token counts once per router that saw it non-finite)."""
        grouped: dict[str, dict[Any, int]] = defaultdict(dict)
        for name, module in self.model.named_modules():
            if isinstance(module, MoLALayer):
                group = module.mola_layer_index if module.mola_layer_index is not None else name
                for adapter_name, count in module.last_nonfinite_rows().items():
                    grouped[adapter_name][group] = grouped[adapter_name].get(group, 0) + count
        return grouped

    def depth_routing_stats(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        nonfinite = self._nonfinite_by_layer()
        for adapter_name, layers in self._routing_by_layer().items():
            rows = []
            for group, (stats, num_routers) in layers.items():
                fraction = stats.expert_fraction.detach().float()
                rows.append(
                    {
                        "layer": group,
                        "num_experts": int(fraction.numel()),
                        "top_k": stats.top_k,
                        "num_tokens": int(stats.num_tokens.item()) // num_routers,
                        "expert_fraction": fraction.tolist(),
                        "mean_prob": stats.mean_probs.detach().float().tolist(),
                        "usage_entropy": float(usage_entropy(fraction)),
                        "balance_loss": float(switch_balance_loss(stats).detach()),
                        "nonfinite_rows": nonfinite[adapter_name].get(group, 0),
                    }
                )
            report[adapter_name] = rows
        return {"mola": report} if report else {}
