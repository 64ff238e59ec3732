"""TRL integration: ``DepthSFTConfig`` / ``DepthSFTTrainer`` and the hooks tuners implement to take part."""

from .config import AUX_COEFFICIENT_FIELDS, DepthSFTConfig
from .hooks import collect_optimizer_groups, routing_health, set_sync_routing_stats, set_training_step
from .trainer import DepthSFTTrainer

__all__ = [
    "AUX_COEFFICIENT_FIELDS",
    "DepthSFTConfig",
    "DepthSFTTrainer",
    "collect_optimizer_groups",
    "routing_health",
    "set_sync_routing_stats",
    "set_training_step",
]
