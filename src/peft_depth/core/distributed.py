"""Sharded training: calling a block that FSDP2 shards from outside its ``__call__``, and refusing DeepSpeed ZeRO-3.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each wrapped block's parameters as shards (``DTensor``) and
gathers them only inside that block's own forward hooks; the same hooks arrange for the gathered parameters to be
gathered again in backward and for the gradients to be reduce-scattered. A method that runs a block's forward
*directly*, bypassing ``block(...)`` — MoLEx calls another layer as an expert through its original ``forward`` so
that transformers' hooks do not record it as a layer — would meet the shards (``aten.mul.Tensor got mixed
torch.Tensor and DTensor``). ``fsdp_gathered`` wraps such a direct forward in the block's FSDP pre- and
post-forward (torch's public ``register_fsdp_forward_method``), and in nothing else. Those gathers are collectives,
so a block that runs only for some rows (the expert layer the gate picked) must run on every process that any
process runs it on: ``calls_on_every_process``.

DeepSpeed ZeRO-3 partitions parameters too but gathers them in module hooks that a direct call bypasses, with
nothing like FSDP2's forward methods to route it through (and TRL forces reentrant activation checkpointing for any
peft model under ZeRO-3), so ``refuse_deepspeed_zero3`` stops such a run with an error that names FSDP2 instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
except ImportError:  # a torch build without distributed support: nothing can be sharded
    FSDPModule = None  # type: ignore[assignment,misc]
    register_fsdp_forward_method = None  # type: ignore[assignment]

__all__ = [
    "ZERO3_MESSAGE",
    "calls_on_every_process",
    "deepspeed_zero3_enabled",
    "fsdp_gathered",
    "refuse_deepspeed_zero3",
    "sharded_across_processes",
    "sharded_by_fsdp",
]

#: Instance attribute of an FSDP2 block that runs any of its forwards between FSDP's pre- and post-forward.
_GATHERED_CALL = "_peft_depth_fsdp_gathered_call"


def _call(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return forward(*args, **kwargs)


def sharded_by_fsdp(module_or_class: nn.Module | type) -> bool:
    """Whether a module (or a module class) is FSDP2's: ``fully_shard`` re-classes what it wraps as ``FSDPModule``."""
    if FSDPModule is None:
        return False
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return issubclass(cls, FSDPModule)


def sharded_across_processes(module: nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP2 while more than one process runs (its gathers are then collectives)."""
    return sharded_by_fsdp(module) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fsdp_gathered(block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` (a forward of ``block`` to be called directly, not through ``block(...)``), made to run with
    ``block``'s FSDP2 shards gathered: exactly as FSDP runs ``block(...)``'s forward — parameters all-gathered before,
    resharded after, gathered again for backward, gradients reduce-scattered — but without any other hook of
    ``block``. Returns ``forward`` itself when ``block`` is not sharded by FSDP2.
    """
    if not sharded_by_fsdp(block):
        return forward
    if _GATHERED_CALL not in block.__dict__:
        # registered once per block; FSDP then wraps this plain function in its pre- and post-forward
        block.__dict__[_GATHERED_CALL] = _call
        register_fsdp_forward_method(block, _GATHERED_CALL)
    return functools.partial(block.__dict__[_GATHERED_CALL], forward)


def calls_on_every_process(blocks: Sequence[nn.Module], chosen: Sequence[int], device: torch.device) -> list[int]:
    """The blocks (indices into ``blocks``, ascending) a data-dependent call pattern must run on this process.

    FSDP2 gathers a sharded block's parameters with a collective, so every process must call the same sharded blocks
    in the same order, whatever its own rows chose. When any of ``blocks`` is sharded and more than one process runs,
    this is the union of ``chosen`` over all processes of the default group (one small all-reduce on ``device``, the
    device of the activations, which the group's backend serves); a process then also runs the blocks only another
    process chose, and uses none of their output. Otherwise it is ``chosen`` itself.
    """
    if not any(sharded_across_processes(block) for block in blocks):
        return sorted(chosen)
    wanted = torch.zeros(len(blocks), dtype=torch.int32, device=device)
    wanted[list(chosen)] = 1
    dist.all_reduce(wanted, op=dist.ReduceOp.MAX)
    return wanted.nonzero().flatten().tolist()


def deepspeed_zero3_enabled(training_args: Any = None) -> bool:
    """Whether DeepSpeed ZeRO-3 is on: transformers' global flag (set while a ZeRO-3 ``TrainingArguments`` lives) or
    the ``deepspeed_plugin`` of ``training_args``."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return True
    try:
        from transformers.integrations import deepspeed
    except ImportError:
        return False
    return bool(deepspeed.is_deepspeed_zero3_enabled())


ZERO3_MESSAGE = (
    "peft-depth adapters do not run under DeepSpeed ZeRO-3: ZeRO-3 gathers each layer's partitioned weights in module "
    "hooks, which MoLEx's calls into other layers and DLO's layer copies bypass, and under it TRL switches PEFT models "
    "to reentrant activation checkpointing. Shard with FSDP2 instead (accelerate `fsdp_version: 2`, see "
    "examples/accelerate_fsdp2.yaml and the README section 'Training on more than one GPU'), or use ZeRO stage 1 or 2."
)


def refuse_deepspeed_zero3(what: str, training_args: Any = None) -> None:
    """Raise ``ValueError`` naming ``what`` and FSDP2 when DeepSpeed ZeRO-3 is on."""
    if deepspeed_zero3_enabled(training_args):
        raise ValueError(f"{what}: {ZERO3_MESSAGE}")
