"""Refuse FSDP2 training where a depth adapter's own parameters sit outside every ``fully_shard``-ed module.

MoLEx's gates, MoD's norms and router and DLO's routers live on the tuner, not inside the decoder layers. Sharding
only the layers (``for layer in layers: fully_shard(layer)``) leaves them plain tensors that FSDP never
reduce-scatters: each process would train its own copy from its own rows and the replicas drift apart silently.
``fully_shard(peft_model)`` as the root after the layers (accelerate's ``TRANSFORMER_BASED_WRAP`` does this) puts
them under FSDP.

The check runs between training steps (``peft_depth.trainer.set_training_step``, which ``DepthSFTTrainer`` calls
before every micro-batch), where every parameter FSDP manages is a sharded ``DTensor``; inside a forward the root's
parameters are temporarily unsharded plain tensors and could not be told apart.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import nn

from .distributed import sharded_by_fsdp

__all__ = ["check_fsdp_root", "unsharded_trainable_parameters"]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support: nothing can be sharded
    DTensor = None  # type: ignore[assignment,misc]


def unsharded_trainable_parameters(module: nn.Module) -> list[str]:
    """Trainable parameters of ``module`` that are plain tensors, not FSDP2's ``DTensor`` shards."""
    if DTensor is None:
        return []
    return [name for name, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]


def check_fsdp_root(model: nn.Module, tuners: Iterable[nn.Module]) -> None:
    """Raise when ``model`` is partly FSDP2-sharded in a multi-process group but a depth tuner's trainable parameters
    are not (call between steps: see the module docstring)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if not any(sharded_by_fsdp(m) for m in model.modules()):
        return  # DDP or replicas: every parameter's gradient is reduced, or none is sharded
    missing = [name for tuner in tuners for name in unsharded_trainable_parameters(tuner)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RuntimeError(
            f"FSDP2 shards this model's layers, but {len(missing)} trainable depth-adapter parameters are outside "
            f"every fully_shard-ed module ({shown}): FSDP would never reduce their gradients, so each process would "
            "train its own copy. Call fully_shard(peft_model) on the PeftModel itself after its layers (the root; "
            "accelerate's TRANSFORMER_BASED_WRAP does this). See README 'Training on more than one GPU'."
        )
