"""The official "dynamic LR" (``capacity_lr_scaling``): each routed layer learns at the scheduled rate times
``capacity_l + (1 − mean capacity)``, recomputed every optimizer step.

The official trainer (``utils/pipeline/customized_trainer.py`` of ``DaizeDong/LLaMA-DLO``) puts every layer's weights
in parameter groups of their own, and after each LR-scheduler step multiplies each group's freshly scheduled rate by
that layer's ratio, taken from the capacities of the moment (the per-layer capacities ``cos_global`` set in the last
forward, which the next forward runs at; layers without a router keep ratio 1). Here the tuner supplies the groups
(``depth_optimizer_groups``, at the unscaled learning rate, so the scheduler's base rates are the trainer's) and the
ratios (``depth_lr_multipliers``, by group name); ``DepthSFTTrainer`` applies them on top of its LR scheduler before
each optimizer step (``peft_depth.trainer.hooks.apply_lr_multipliers``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import DLOConfig

__all__ = ["CapacityLearningRates", "lr_group_name", "NO_DECAY_SUFFIX"]

#: Suffix of the group holding a layer's parameters that take no weight decay.
NO_DECAY_SUFFIX = "_no_decay"


def lr_group_name(position: int, decay: bool = True) -> str:
    """Name of the optimizer group of the routed layer at ``position`` of the expanded stack (its weights that
    decay; ``decay=False``: its 1-D parameters, which do not)."""
    return f"dlo_layer_{position}" + ("" if decay else NO_DECAY_SUFFIX)


class CapacityLearningRates:
    """Mixin of ``DLOModel``: the per-layer optimizer groups and their per-step learning-rate multipliers.

    Uses the tuner's ``peft_config``, ``dlo_routers``, ``dlo_new_layers``, ``_dlo`` (``layouts``, ``rewiring``),
    ``_active_dlo_adapter()`` and ``dlo_layer_capacities()`` (``capacities.CapacitySchedule``).
    """

    def dlo_lr_multipliers(self, adapter_name: str | None = None) -> dict[int, float]:
        """Official dynamic LR: per routed layer, capacity_l + (1 − mean capacity), from the capacities the next
        forward runs at."""
        capacities = self.dlo_layer_capacities(adapter_name)
        if not capacities:
            return {}
        mean = sum(capacities.values()) / len(capacities)
        return {position: capacity + (1.0 - mean) for position, capacity in capacities.items()}

    def _scaled_adapter(self) -> str | None:
        adapter_name = self._active_dlo_adapter()
        if adapter_name is None:
            return None
        config: DLOConfig = self.peft_config[adapter_name]
        return adapter_name if config.capacity_lr_scaling and config.routed_layers != "none" else None

    def dlo_layer_parameters(self, adapter_name: str, position: int) -> list[nn.Parameter]:
        """The trainable weights of the layer at ``position``: for a new layer, its weights (or their LoRA); for an
        original layer, what trains on it (LoRA, ``trained_original_modules`` copies).

        Not its router: the official trainer scales the groups of parameters named ``layers.{i}.``, and the routers
        (``model.routers.{i}``) sit in its static groups, at the scheduled rate."""
        kind, source = self._dlo["layouts"][adapter_name][position]
        layer = (
            self.dlo_new_layers[adapter_name][f"new{position}"]
            if kind == "new"
            else self._dlo["rewiring"].original_blocks[source]
        )
        return [p for p in layer.parameters() if p.requires_grad]

    def depth_optimizer_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """With ``capacity_lr_scaling``: per routed layer (``dlo_layer_parameters``) a group of its weights at
        ``weight_decay``, named ``dlo_layer_<position>``, and one of its 1-D parameters (biases, norm weights) without
        weight decay, named ``dlo_layer_<position>_no_decay`` - the split the official trainer (and the Hugging Face
        Trainer, for every other parameter) makes. Both at ``base_lr``; ``depth_lr_multipliers`` scales them every
        step."""
        adapter_name = self._scaled_adapter()
        if adapter_name is None:
            return []
        groups = []
        for position in sorted(int(key[1:]) for key in self.dlo_routers[adapter_name]):
            params = self.dlo_layer_parameters(adapter_name, position)
            for decay in (True, False):
                members = [p for p in params if (p.dim() >= 2) == decay]
                if members:
                    groups.append(
                        {
                            "params": members,
                            "lr": base_lr,
                            "weight_decay": weight_decay if decay else 0.0,
                            "name": lr_group_name(position, decay),
                        }
                    )
        return groups

    def depth_lr_multipliers(self) -> dict[str, float]:
        """``{group name: multiplier}`` for the groups of ``depth_optimizer_groups``, from the current capacities
        (the trainer multiplies each group's scheduled learning rate by it before every optimizer step)."""
        adapter_name = self._scaled_adapter()
        if adapter_name is None:
            return {}
        return {
            lr_group_name(position, decay): multiplier
            for position, multiplier in self.dlo_lr_multipliers(adapter_name).items()
            for decay in (True, False)
        }
