"""How much each routed layer executes: the annealed training capacity, the per-layer capacities ``cos_global``
sets, and the eval budget. The per-layer learning rates that follow the capacities live in ``learning_rates``."""

from __future__ import annotations

from typing import Any

from ...core.aux_watch import note_schedule_advanced
from .config import DLOConfig

__all__ = ["CapacitySchedule"]


class CapacitySchedule:
    """Mixin of ``DLOModel``: the training step (and the run's length), the annealed and per-layer capacities.

    Uses the tuner's ``peft_config``, ``dlo_routers``, ``_dlo["capacities"]`` and ``_active_dlo_adapter()``.
    """

    #: The optimizer step capacity annealing follows (set by the trainer, or by hand with ``set_dlo_step``).
    dlo_step: int = 0
    #: Total optimizer steps of the training run (set by the trainer, or with ``set_dlo_total_steps``); needed only
    #: by ``capacity_annealing_fraction``.
    dlo_total_steps: int | None = None

    def set_dlo_step(self, step: int) -> None:
        """Tell DLO the number of optimizer steps done; the training capacity anneals from 1.0 along it."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0, got {step!r}.")
        self.dlo_step = step
        note_schedule_advanced(self)

    def set_training_step(self, step: int) -> None:
        """Hook called by ``DepthSFTTrainer`` before every training micro-batch (same as ``set_dlo_step``)."""
        self.set_dlo_step(int(step))

    def set_dlo_total_steps(self, total_steps: int | None) -> None:
        """Tell DLO how many optimizer steps the training run has (None: unknown); ``capacity_annealing_fraction``
        anneals over that fraction of them."""
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0
        ):
            raise ValueError(f"`total_steps` must be a positive integer or None, got {total_steps!r}.")
        self.dlo_total_steps = total_steps

    def set_training_total_steps(self, total_steps: int) -> None:
        """Hook called by ``DepthSFTTrainer`` before every training micro-batch with the run's total optimizer steps
        (``TrainerState.max_steps``: ``max_steps``, or the epochs times the steps per epoch)."""
        self.set_dlo_total_steps(int(total_steps) if total_steps and total_steps > 0 else None)

    def dlo_annealed_capacity(self, adapter_name: str) -> float:
        """The annealed training capacity of ``adapter_name`` at ``dlo_step`` (ValueError when it anneals over a
        fraction of training and the total number of steps is unknown)."""
        config: DLOConfig = self.peft_config[adapter_name]
        return config.capacity_at(self.dlo_step, total_steps=self.dlo_total_steps)

    def dlo_capacity_target(self, adapter_name: str) -> float | None:
        """``dlo_annealed_capacity``, or None where it cannot be known yet (for statistics, which never raise)."""
        try:
            return self.dlo_annealed_capacity(adapter_name)
        except ValueError:
            return None

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

    def dlo_layer_settings(
        self, adapter_name: str, position: int, *, training: bool = True
    ) -> tuple[float | None, bool, float | None]:
        """``(training capacity, whether router labels are wanted, eval capacity or None)`` of one routed layer.

        The training capacity is None in eval (``training=False``), where it is not used: an adapter that anneals over
        a fraction of training then runs in eval without knowing the training run's length."""
        config: DLOConfig = self.peft_config[adapter_name]
        capacity = self._dlo["capacities"].get(adapter_name, {}).get(position)
        if capacity is None or config.loss_type != "cos_global":
            capacity = self.dlo_annealed_capacity(adapter_name) if training else None
        inference = None
        if config.inference_selection == "capacity":
            inference = config.inference_capacity if config.inference_capacity is not None else config.capacity
        wants_labels = self.routing_context.loss_coefficient("router", config.router_loss_coef) > 0
        return capacity, wants_labels, inference

    def dlo_layer_capacities(self, adapter_name: str | None = None) -> dict[int, float]:
        """Training capacity each routed layer uses in the next forward."""
        adapter_name = adapter_name or self._active_dlo_adapter()
        if adapter_name is None:
            return {}
        return {
            int(key[1:]): self.dlo_layer_settings(adapter_name, int(key[1:]))[0]
            for key in self.dlo_routers[adapter_name]
        }
