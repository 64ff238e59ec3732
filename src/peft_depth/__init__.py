"""peft-depth: depth-aware fine-tuning methods (MoLA, MoLEx, MoD, DLO) as first-class PEFT methods.

``import peft_depth`` registers every method with peft, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained`` and the ``AutoPeftModel*`` classes handle them exactly as they handle LoRA.
"""

from __future__ import annotations

from typing import Any

from .core.adapter_copy import copy_adapter
from .core.aux import aux_losses, routing_stats
from .core.nonfinite import NonFiniteRoutingError
from .hub import install as _install_hub_hooks
from .tuners.dlo import DLOConfig, DLOModel
from .tuners.mod import MoDConfig, MoDModel
from .tuners.mola import MoLAConfig, MoLAModel
from .tuners.molex import MoLExConfig, MoLExModel

__version__ = "0.1.0"

# Save/push write the method's model card; loads are safetensors-only and never partial (see peft_depth.hub).
_install_hub_hooks()

__all__ = [
    "DLOConfig",
    "DLOModel",
    "MoDConfig",
    "MoDModel",
    "MoLAConfig",
    "MoLAModel",
    "MoLExConfig",
    "MoLExModel",
    "NonFiniteRoutingError",
    "aux_losses",
    "copy_adapter",
    "routing_stats",
    "__version__",
]

# The trainer pulls in TRL; load it only when asked for, so `import peft_depth` stays light.
_LAZY = {"DepthSFTConfig": "trainer", "DepthSFTTrainer": "trainer"}


def __getattr__(name: str) -> Any:
    if name == "trainer":  # `peft_depth.trainer.set_training_step(...)` after a plain `import peft_depth`
        import importlib

        return importlib.import_module(".trainer", __name__)
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
