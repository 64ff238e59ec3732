"""MoLEx: mixture of layer experts (the model's own layers, with LoRA, are the experts)."""

from ...core.peft_registration import register_depth_method
from .config import MoLExConfig
from .layer import CosineGate, LinearGate, MoLExAlpha
from .model import MoLExModel

register_depth_method(name="molex", config_cls=MoLExConfig, model_cls=MoLExModel)

__all__ = ["CosineGate", "LinearGate", "MoLExAlpha", "MoLExConfig", "MoLExModel"]
