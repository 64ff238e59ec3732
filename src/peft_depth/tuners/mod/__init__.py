"""MoD: mixture-of-depths ensemble of late layers, with self-distillation (arXiv 2410.13077)."""

from ...core.peft_registration import register_depth_method
from .config import MoDConfig
from .distill import chunked_distillation_kl
from .layer import MoDEnsemble, MoDRouter
from .model import MoDModel

register_depth_method(name="mod", config_cls=MoDConfig, model_cls=MoDModel)

__all__ = ["MoDConfig", "MoDEnsemble", "MoDModel", "MoDRouter", "chunked_distillation_kl"]
