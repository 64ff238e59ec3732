"""MoLEx's balance loss, routing statistics and optimizer groups, read from the records of the last forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.aux import AuxLossTerm
from ...core.routing import usage_entropy
from .config import MoLExConfig
from .routing import LayerRecord

__all__ = ["MoLExStatistics", "generates"]


def generates(model: nn.Module) -> bool:
    """Whether ``model`` is a generative head (``GenerationMixin``), as a causal LM is."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


class MoLExStatistics:
    """Mixin of ``MoLExModel``: turns ``self._records`` (this thread's last forward) into losses and statistics."""

    def _synced_records(self) -> dict[str, dict[int, LayerRecord]]:
        records = self._records
        if not self.routing_context.syncing or not records:
            return records
        keys = [(a, i) for a, layers in records.items() for i in layers]
        context = self.routing_context
        prob_sums = context.reduce_sum(torch.stack([records[a][i].prob_sums for a, i in keys]))
        counts = context.reduce_sum(
            torch.stack([torch.cat([records[a][i].counts, records[a][i].num_tokens.reshape(1)]) for a, i in keys])
        )
        synced: dict[str, dict[int, LayerRecord]] = {}
        for row, (a, i) in enumerate(keys):
            old = records[a][i]
            synced.setdefault(a, {})[i] = LayerRecord(
                prob_sums=prob_sums[row],
                counts=counts[row, :-1],
                num_tokens=counts[row, -1],
                num_candidates=old.num_candidates,
                alpha=old.alpha,
                chosen=old.chosen,
                base_path=old.base_path,
            )
        return synced

    @staticmethod
    def _balance_loss(record: LayerRecord) -> torch.Tensor:
        """E · Σ_e f_e · P_e with E the layer's candidates (the official L·Σ f·P when all layers are candidates)."""
        tokens = record.num_tokens.clamp(min=1)
        return record.num_candidates * torch.dot((record.counts / tokens).detach(), record.prob_sums / tokens)

    def depth_aux_terms(self) -> dict[str, AuxLossTerm]:
        terms: dict[str, AuxLossTerm] = {}
        records = self._synced_records()
        for adapter_name, layers in records.items():
            if not layers:
                continue
            loss = torch.stack([self._balance_loss(record) for record in layers.values()]).sum()
            key = "routing" if len(records) == 1 else f"routing.{adapter_name}"
            terms[key] = AuxLossTerm(loss, float(self.peft_config[adapter_name].balance_loss_coef))
        return terms

    def depth_routing_stats(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for adapter_name, layers in self._synced_records().items():
            rows = []
            for index in sorted(layers):
                record = layers[index]
                tokens = record.num_tokens.clamp(min=1)
                fraction = (record.counts / tokens).detach().float()
                rows.append(
                    {
                        "layer": index,
                        "routing": self.peft_config[adapter_name].routing,
                        "chosen": record.chosen,
                        "num_tokens": int(record.num_tokens.item()),
                        "num_candidates": record.num_candidates,
                        "expert_fraction": fraction.tolist(),
                        "mean_prob": (record.prob_sums / tokens).detach().float().tolist(),
                        "usage_entropy": float(usage_entropy(fraction)),
                        "alpha": record.alpha,
                        "balance_loss": float(self._balance_loss(record).detach()),
                        "nonfinite_rows": 0 if record.base_path is None else int(record.base_path.sum()),
                    }
                )
            report[adapter_name] = rows
        return {"molex": report} if report else {}

    def gate_parameters(self, adapter_name: str | None = None) -> list[tuple[str, nn.Parameter]]:
        """Named gate and α parameters (all adapters, or one)."""
        named = []
        for container_name, container in self.tuner_modules():
            for name, module in container.items():
                if adapter_name is None or name == adapter_name:
                    named.extend((f"{container_name}.{name}.{n}", p) for n, p in module.named_parameters())
        return named

    def depth_optimizer_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimizer group per adapter for its gates and α, with ``gate_lr`` / ``gate_weight_decay`` (None: the
        official code's values for the model kind, ``MoLExConfig.gate_group_settings``).

        Named ``"gate"`` (``"gate.<adapter>"`` with several adapters) so that ``DepthSFTConfig.gate_learning_rate``
        and ``gate_weight_decay`` override them.
        """
        groups = []
        adapters = [name for name in self.peft_config if name in self._plans]
        generative = generates(self.model)
        for adapter_name in adapters:
            config: MoLExConfig = self.peft_config[adapter_name]
            lr, decay = config.gate_group_settings(base_lr, weight_decay, generative=generative)
            params = [p for _, p in self.gate_parameters(adapter_name)]
            if not params:
                continue
            groups.append(
                {
                    "name": "gate" if len(adapters) == 1 else f"gate.{adapter_name}",
                    "params": params,
                    "lr": lr,
                    "weight_decay": decay,
                }
            )
        return groups
