"""How much each routed layer executes: the annealed training capacity, the per-layer capacities ``cos_global``
sets, the eval budget, and the per-layer learning rates that follow the capacities (the official "dynamic LR")."""

from __future__ import annotations

from typing import Any

from ...core.aux_watch import note_schedule_advanced
from .config import DLOConfig

__all__ = ["CapacitySchedule"]


class CapacitySchedule:
    """Mixin of ``DLOModel``: the training step, per-layer capacities and the optimizer groups built on them.

    Uses the tuner's ``peft_config``, ``dlo_routers``, ``dlo_new_layers``, ``_dlo["capacities"]`` and
    ``_active_dlo_adapter()``.
    """

    #: The optimizer step capacity annealing follows (set by the trainer, or by hand with ``set_dlo_step``).
    dlo_step: int = 0

    def set_dlo_step(self, step: int) -> None:
        """Tell DLO the number of optimizer steps done; the training capacity anneals from 1.0 along it."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0, got {step!r}.")
        self.dlo_step = step
        note_schedule_advanced(self)

    def set_training_step(self, step: int) -> None:
        """Hook called by ``DepthSFTTrainer`` before every training micro-batch (same as ``set_dlo_step``)."""
        self.set_dlo_step(int(step))

    def depth_checkpoint_state(self) -> dict[str, Any]:
        """Non-parameter training state a resume needs: the annealing step and the cos_global per-layer capacities."""
        return {
            "dlo_step": int(self.dlo_step),
            "capacities": {
                adapter: {str(position): float(c) for position, c in layers.items()}
                for adapter, layers in self._dlo["capacities"].items()
            },
        }

    def load_depth_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what ``depth_checkpoint_state`` saved (JSON-style string keys back to layer positions)."""
        self.set_dlo_step(int(state.get("dlo_step", 0)))
        self._dlo["capacities"] = {
            adapter: {int(position): float(c) for position, c in layers.items()}
            for adapter, layers in state.get("capacities", {}).items()
        }

    def dlo_layer_settings(self, adapter_name: str, position: int) -> tuple[float, bool, float | None]:
        """``(training capacity, whether router labels are wanted, eval capacity or None)`` of one routed layer."""
        config: DLOConfig = self.peft_config[adapter_name]
        capacity = self._dlo["capacities"].get(adapter_name, {}).get(position)
        if capacity is None or config.loss_type != "cos_global":
            capacity = config.capacity_at(self.dlo_step)
        inference = None
        if config.inference_selection == "capacity":
            inference = config.inference_capacity if config.inference_capacity is not None else config.capacity
        return capacity, config.router_loss_coef > 0, inference

    def dlo_layer_capacities(self, adapter_name: str | None = None) -> dict[int, float]:
        """Training capacity each routed layer uses in the next forward."""
        adapter_name = adapter_name or self._active_dlo_adapter()
        if adapter_name is None:
            return {}
        return {
            int(key[1:]): self.dlo_layer_settings(adapter_name, int(key[1:]))[0]
            for key in self.dlo_routers[adapter_name]
        }

    def dlo_lr_multipliers(self, adapter_name: str | None = None) -> dict[int, float]:
        """Official dynamic LR: per routed layer, capacity_l + (1 − mean capacity)."""
        capacities = self.dlo_layer_capacities(adapter_name)
        if not capacities:
            return {}
        mean = sum(capacities.values()) / len(capacities)
        return {position: capacity + (1.0 - mean) for position, capacity in capacities.items()}

    def depth_optimizer_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """With ``capacity_lr_scaling``: one parameter group per routed layer (its router and, for a new layer, its
        weights) at ``base_lr`` × that layer's multiplier, taken when the optimizer is built."""
        adapter_name = self._active_dlo_adapter()
        if adapter_name is None or not self.peft_config[adapter_name].capacity_lr_scaling:
            return []
        multipliers = self.dlo_lr_multipliers(adapter_name)
        groups = []
        for position, multiplier in sorted(multipliers.items()):
            params = list(self.dlo_routers[adapter_name][f"l{position}"].parameters())
            key = f"new{position}"
            if key in self.dlo_new_layers[adapter_name]:
                params += list(self.dlo_new_layers[adapter_name][key].parameters())
            groups.append(
                {
                    "params": params,
                    "lr": base_lr * multiplier,
                    "weight_decay": weight_decay,
                    "name": f"dlo_layer_{position}",
                }
            )
        return groups
