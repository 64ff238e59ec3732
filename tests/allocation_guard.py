"""Count what a block of code allocates, independent of what the process did before.

Tests that a hostile config fails "before any large allocation" used to compare ``ru_maxrss`` before and after, and
bound the wall time. ``ru_maxrss`` is the peak of the whole process: in a pytest-xdist worker that already ran a
larger test it does not move at all, so the check could not fail; and a wall-time bound is a flake under load.

``allocation_counter`` counts instead, from inside the block only:
- every byte of new tensor storage, seen at torch's dispatcher (a ``TorchDispatchMode`` sees factory calls such as the
  ``torch.empty`` inside ``nn.Linear`` as well as ops' outputs; views of an input are not new storage);
- the peak of the Python heap (``tracemalloc``), which is where a parsed JSON header would live.

A torch allocation past ``max_tensor_bytes`` raises ``AllocationLimitExceeded`` on the spot, before a regressed code
path can go on to allocate gigabytes. It derives from BaseException so that an ``except Exception`` cleanup in the
code under test cannot turn it into the ValueError the test expects.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["AllocationLimitExceeded", "Allocations", "allocation_counter"]


class AllocationLimitExceeded(BaseException):
    pass


@dataclass
class Allocations:
    tensor_bytes: int = 0
    python_peak_bytes: int = 0


def _storage_ptr(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None


class _TensorBytes(TorchDispatchMode):
    def __init__(self, counts: Allocations, limit: int | None) -> None:
        super().__init__()
        self.counts = counts
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for out in tree_flatten(result)[0]:
            if isinstance(out, torch.Tensor) and out.device.type != "meta" and _storage_ptr(out) not in inputs:
                self.counts.tensor_bytes += out.untyped_storage().nbytes()
        if self.limit is not None and self.counts.tensor_bytes > self.limit:
            raise AllocationLimitExceeded(
                f"{self.counts.tensor_bytes} bytes of tensors allocated, over the {self.limit}-byte limit ({func})"
            )
        return result


@contextmanager
def allocation_counter(max_tensor_bytes: int | None = None) -> Iterator[Allocations]:
    """Yield an ``Allocations`` filled in while the block runs (``python_peak_bytes`` when it ends)."""
    counts = Allocations()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start, _ = tracemalloc.get_traced_memory()
    try:
        with _TensorBytes(counts, max_tensor_bytes):
            yield counts
    finally:
        counts.python_peak_bytes = max(0, tracemalloc.get_traced_memory()[1] - start)
        if not was_tracing:
            tracemalloc.stop()
