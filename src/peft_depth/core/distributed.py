"""Sharded training: calling a block that FSDP2 shards from outside its ``__call__``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each wrapped block's parameters as shards (``DTensor``) and
gathers them only inside that block's own forward hooks; the same hooks arrange for the gathered parameters to be
gathered again in backward and for the gradients to be reduce-scattered. A method that runs a block's forward
*directly*, bypassing ``block(...)`` — MoLEx calls another layer as an expert through its original ``forward`` so
that transformers' hooks do not record it as a layer — would meet the shards (``aten.mul.Tensor got mixed
torch.Tensor and DTensor``). ``fsdp_gathered`` wraps such a direct forward in the block's FSDP pre- and
post-forward (torch's public ``register_fsdp_forward_method``), and in nothing else. Those gathers are collectives,
so a block that runs only for some rows (the expert layer the gate picked) must run on every process that any
process runs it on: ``calls_on_every_process``.
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
    "calls_on_every_process",
    "fsdp_gathered",
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
