"""DLO: Dynamic Layer Operation — expand a model's depth, then run or skip layers per token."""

from ...core.peft_registration import register_depth_method
from .config import DLOConfig, expansion_plan
from .layer import DLOBlock, NewLayerLoraLinear, SkipMLP
from .model import DLOModel, expanded_layout

register_depth_method(name="dlo", config_cls=DLOConfig, model_cls=DLOModel)

__all__ = ["DLOBlock", "DLOConfig", "DLOModel", "NewLayerLoraLinear", "SkipMLP", "expanded_layout", "expansion_plan"]
