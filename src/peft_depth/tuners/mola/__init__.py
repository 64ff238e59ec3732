"""MoLA: MoE-LoRA with layer-wise expert allocation."""

from ...core.peft_registration import register_depth_method
from .config import MoLAConfig
from .layer import MoLALayer, MoLALinear
from .model import MoLAModel

register_depth_method(name="mola", config_cls=MoLAConfig, model_cls=MoLAModel)

__all__ = ["MoLAConfig", "MoLALayer", "MoLALinear", "MoLAModel"]
