"""Guards that make loading an adapter safe: base-model compatibility and an allocation budget.

An ``adapter_config.json`` downloaded from the Hub is untrusted input. Two things can go wrong before any weight is
read:

- the adapter was trained for another base model (other depth, hidden size or architecture). peft would create the
  adapter modules anyway and fail later with a shape error, or, worse, load silently. ``base_model_facts`` records
  what matters about the base model when the adapter is saved, and ``check_base_model_facts`` names every difference;
- hostile sizes (a billion experts, a gigantic projection) would allocate until the process dies.
  ``AllocationBudget`` watches every tensor the injection creates and raises ``ValueError`` *before* the allocation
  that would cross the budget, so nothing large is ever allocated.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .layer_stack import find_layer_stack, text_config
from .quantization import logical_bytes

__all__ = [
    "AllocationBudget",
    "MAX_ADAPTER_BYTES_ENV",
    "adapter_allocation_limit",
    "base_model_facts",
    "check_base_model_facts",
]

#: Environment variable that overrides the allocation budget of an adapter injection, in bytes.
MAX_ADAPTER_BYTES_ENV = "PEFT_DEPTH_MAX_ADAPTER_BYTES"
#: Budget floor: small models may carry adapters larger than themselves (8 experts of rank 64 on a 32-wide model).
_MIN_BUDGET_BYTES = 1 << 30
#: Budget relative to the base model: DLO may copy every layer once (1x); 2x leaves room and stops absurd sizes.
_BASE_MODEL_MULTIPLE = 2

_FACT_NAMES = {
    "architecture": "architecture (model class)",
    "model_type": "model_type",
    "num_layers": "number of layers",
    "hidden_size": "hidden size",
}


def base_model_facts(model: nn.Module) -> dict[str, Any]:
    """What an adapter depends on in its base model: class, ``model_type``, depth and hidden size.

    Called on the model *before* injection (DLO changes the depth afterwards).
    """
    stack_config = text_config(model)
    facts: dict[str, Any] = {"architecture": type(model).__name__}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type:
        facts["model_type"] = model_type
    stack = find_layer_stack(model)
    num_layers = stack.num_layers if stack is not None else getattr(stack_config, "num_hidden_layers", None)
    if isinstance(num_layers, int):
        facts["num_layers"] = num_layers
    hidden_size = getattr(stack_config, "hidden_size", None)
    if isinstance(hidden_size, int):
        facts["hidden_size"] = hidden_size
    return facts


def check_base_model_facts(recorded: dict[str, Any] | None, actual: dict[str, Any], *, adapter_name: str) -> None:
    """Raise ValueError naming every fact that differs between the recorded and the actual base model."""
    if not recorded:
        return
    differences = [
        f"{_FACT_NAMES.get(key, key)}: adapter saved with {recorded[key]!r}, this model has {actual[key]!r}"
        for key in sorted(recorded)
        if key in actual and recorded[key] != actual[key]
    ]
    if differences:
        raise ValueError(
            f"Adapter {adapter_name!r} was saved for a different base model; "
            + "; ".join(differences)
            + ". Load it onto the base model it was trained for (its `base_model_name_or_path`). If you are sure the "
            "models are compatible, load the config, set `base_model_facts=None` and pass it as `config=`."
        )


def adapter_allocation_limit(model: nn.Module) -> int:
    """Bytes an adapter injection may allocate: ``$PEFT_DEPTH_MAX_ADAPTER_BYTES``, else max(2x the model, 1 GiB),
    the model's quantized weights counted as float32 copies (``logical_bytes``)."""
    override = os.environ.get(MAX_ADAPTER_BYTES_ENV)
    if override:
        try:
            return int(override)
        except ValueError:
            raise ValueError(
                f"${MAX_ADAPTER_BYTES_ENV} must be an integer number of bytes, got {override!r}."
            ) from None
    # a quantized weight counts at the size of a float32 copy: DLO's copy of a 4-bit layer is full precision
    model_bytes = sum(logical_bytes(p) for p in model.parameters())
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return max(_BASE_MODEL_MULTIPLE * model_bytes, _MIN_BUDGET_BYTES)


_aten = torch.ops.aten
# Factory ops take the size as their first argument; *_like/clone ops take a tensor whose size they copy.
_SIZED_FACTORIES = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.zeros.default,
    _aten.ones.default,
    _aten.full.default,
    _aten.rand.default,
    _aten.randn.default,
    _aten.randint.low,
    _aten.randint.default,
    _aten.new_empty.default,
    _aten.new_zeros.default,
    _aten.new_ones.default,
    _aten.new_full.default,
    _aten.new_empty_strided.default,
}
_LIKE_FACTORIES = {
    _aten.empty_like.default,
    _aten.zeros_like.default,
    _aten.ones_like.default,
    _aten.full_like.default,
    _aten.rand_like.default,
    _aten.randn_like.default,
    _aten.clone.default,
}


class AllocationBudget(TorchDispatchMode):
    """Count the bytes of every tensor created inside the context; raise before one would cross ``limit_bytes``.

    Tensors on the meta device cost nothing and are not counted. Temporaries count too, so the budget is an upper
    bound on what the injection touches, which is what matters against hostile sizes.
    """

    def __init__(self, limit_bytes: int, what: str) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.what = what
        self.allocated = 0

    def _charge(self, numel: int, dtype: torch.dtype | None, device: Any) -> None:
        if device is not None and torch.device(device).type == "meta":
            return
        itemsize = (dtype if dtype is not None else torch.get_default_dtype()).itemsize
        requested = numel * itemsize
        if self.allocated + requested > self.limit_bytes:
            raise ValueError(
                f"Creating {self.what} would allocate more than {self.limit_bytes / 2**30:.2f} GiB (a tensor of "
                f"{requested / 2**30:.2f} GiB after {self.allocated / 2**30:.2f} GiB). The config asks for absurd "
                f"sizes (expert counts, ranks, widths or copies); check adapter_config.json. To allow larger "
                f"adapters, set ${MAX_ADAPTER_BYTES_ENV} to a number of bytes."
            )
        self.allocated += requested

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZED_FACTORIES:
            # new_* ops: args = (tensor, size); the others: args = (size, ...)
            is_new = func.__name__.startswith("new_")
            size = args[1] if is_new else args[0]
            if func in (_aten.randint.low,):
                size = args[2]
            elif func in (_aten.randint.default,):
                size = args[1]
            numel = math.prod(int(s) for s in size)
            source = args[0] if is_new else None
            dtype = kwargs.get("dtype") or (source.dtype if source is not None else None)
            device = kwargs.get("device") or (source.device if source is not None else None)
            self._charge(numel, dtype, device)
        elif func in _LIKE_FACTORIES and args and isinstance(args[0], torch.Tensor):
            source = args[0]
            self._charge(source.numel(), kwargs.get("dtype") or source.dtype, kwargs.get("device") or source.device)
        return func(*args, **kwargs)
