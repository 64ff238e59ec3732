"""Force two threads through one model in lockstep, to test that a forward sees only its own state.

Letting two threads race and hoping they interleave makes a test that passes on a bad day. Instead every module in
``lockstep`` gets a forward pre-hook and a forward hook that wait on one ``threading.Barrier(2)``: both threads finish
module *i* (and everything it wrote) before either starts module *i+1*, so state written by a forward on a shared
module object and read later in the same forward is always overwritten by the other thread first - today's shared
state fails every time. A global lock around the forward cannot pass either: the first thread would wait at the
barrier for a second one that waits for the lock (the barrier's timeout turns that deadlock into a failure).

Pick lockstep modules that both threads call the same number of times whatever their data (the decoder blocks
as the model's layer list holds them, not a sub-module a router may skip).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import peft_depth

BARRIER_TIMEOUT_S = 20.0


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of the model's decoder-layer list as the forward iterates it (after any depth rewiring)."""
    for module in model.modules():
        layers = getattr(module, "layers", None) or getattr(module, "h", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise AssertionError("no decoder layer list found")


def _lockstep_hooks(modules: Sequence[nn.Module], barrier: threading.Barrier) -> list[Any]:
    def wait(*_: Any) -> None:
        barrier.wait()

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(wait))
        handles.append(module.register_forward_hook(wait))
    return handles


def run_serial(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], call: Callable | None = None):
    """``(outputs, routing_stats)`` of each batch run alone, one after the other."""
    call = call or (lambda m, b: m(**b).logits)
    outputs, stats = [], []
    with torch.no_grad():
        for batch in batches:
            outputs.append(call(model, batch))
            stats.append(peft_depth.routing_stats(model))
    return outputs, stats


def run_lockstep(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    lockstep: Sequence[nn.Module],
    call: Callable | None = None,
):
    """``(outputs, routing_stats)`` of each batch, run by one thread per batch in lockstep over ``lockstep``.

    Each thread reads ``routing_stats`` right after its own forward, while the other thread has finished its forward
    too (a last barrier), so stats kept on shared objects would be the other thread's.
    """
    assert len(batches) == 2, "the lockstep barrier is built for two threads"
    call = call or (lambda m, b: m(**b).logits)
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT_S)
    outputs: list[Any] = [None, None]
    stats: list[Any] = [None, None]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            with torch.no_grad():
                outputs[index] = call(model, batches[index])
            barrier.wait()
            stats[index] = peft_depth.routing_stats(model)
        except BaseException as error:  # reported in the main thread
            errors.append(error)
            barrier.abort()

    handles = _lockstep_hooks(lockstep, barrier)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    return outputs, stats


def assert_concurrent_equals_serial(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    lockstep: Sequence[nn.Module] | None = None,
    call: Callable | None = None,
) -> None:
    """Two batches in lockstep on two threads give exactly what each gives alone: outputs and routing_stats."""
    lockstep = decoder_blocks(model) if lockstep is None else lockstep
    serial_outputs, serial_stats = run_serial(model, batches, call)
    concurrent_outputs, concurrent_stats = run_lockstep(model, batches, lockstep, call)
    for index, (serial, concurrent) in enumerate(zip(serial_outputs, concurrent_outputs)):
        torch.testing.assert_close(concurrent, serial, rtol=0, atol=0, msg=lambda m, i=index: f"batch {i}: {m}")
    assert concurrent_stats == serial_stats, "routing_stats must be the calling thread's own last forward"
