"""Quantized base layers (bitsandbytes 4-bit and 8-bit): recognising them, and full-precision copies of them.

The depth methods run *on* a quantized base as peft's LoRA does: LoRA, MoLA's experts and MoD's ensemble add to the
frozen 4-bit / 8-bit linears' outputs, and MoLEx calls another block's quantized linears as they are. Two things
cannot run on quantized weights: a DLO new layer is a trainable copy of an original layer, so it is built from the
dequantized weights (``dequantized_linear``), and a merge writes into the base weights, which a 4-bit / 8-bit weight
cannot take exactly (``check_merge_into_quantized``).

bitsandbytes is imported only to undo its CPU repacking; its parameters are recognised by class name, as peft does.
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn

__all__ = [
    "check_merge_into_quantized",
    "dequantized_linear",
    "dequantized_weight",
    "floating_dtype",
    "floating_parameter",
    "is_quantized_linear",
    "is_quantized_parameter",
    "logical_bytes",
]

#: bitsandbytes' parameter classes of 4-bit and 8-bit weights.
_QUANTIZED_PARAMETER_CLASSES = ("Params4bit", "Int8Params")


def is_quantized_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` holds bitsandbytes-quantized data (its dtype, uint8/int8 or a storage dtype, is no compute
    dtype)."""
    return type(param).__name__ in _QUANTIZED_PARAMETER_CLASSES


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or any linear with such a weight)."""
    if not isinstance(module, nn.Linear):  # checked first: peft's tuner layers compute `weight` from their base
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and is_quantized_parameter(weight)


def _new_parameters_land_on_meta() -> bool:
    """Whether a parameter registered now is moved to the meta device (accelerate's ``init_empty_weights``, which
    peft puts around the tuner of ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)``). The probe holds no
    element and runs no initialiser: it allocates nothing and draws nothing from the RNG."""
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.is_meta


def refuse_low_cpu_mem_usage_on(model: nn.Module, kinds: tuple[str, ...], what: str, low_cpu_mem_usage: bool) -> None:
    """ValueError when a ``low_cpu_mem_usage`` build (the flag, or the meta-device context peft opens for it) meets a
    bitsandbytes linear of one of ``kinds`` ("8bit": ``Linear8bitLt``, "4bit": ``Linear4bit``). Why: what reads the
    packed base weights on the meta device failed with bare errors ("Cannot copy out of meta tensor" on 8-bit bases
    for every method; DLO's layer copies on 4-bit ones too), where plain LoRA loads."""
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            kind = "8bit" if type(module.weight).__name__ == "Int8Params" else "4bit"
            if kind in kinds and (low_cpu_mem_usage or _new_parameters_land_on_meta()):
                raise ValueError(
                    f"{what}: low_cpu_mem_usage=True is not supported on a bitsandbytes {kind} base (e.g. {name!r}); "
                    "load with low_cpu_mem_usage=False (the default)."
                )


def floating_parameter(module: nn.Module) -> torch.Tensor | None:
    """The first floating-point parameter of the base model in ``module`` (a norm weight in a quantized decoder
    layer), or None: its dtype is the dtype ``module`` computes in. Quantized data and peft adapter weights (kept in
    float32 on a half-precision base) say nothing about that."""
    adapter_params = set()
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):
            base_params = {id(p) for p in sub.get_base_layer().parameters()}
            adapter_params.update(id(p) for p in sub.parameters() if id(p) not in base_params)
    for param in module.parameters():
        if param.is_floating_point() and not is_quantized_parameter(param) and id(param) not in adapter_params:
            return param
    return None


def floating_dtype(module: nn.Module, default: torch.dtype | None = None) -> torch.dtype:
    """dtype of ``floating_parameter(module)``; ``default`` (or torch's default dtype) when it has none."""
    param = floating_parameter(module)
    if param is not None:
        return param.dtype
    return default if default is not None else torch.get_default_dtype()


def _unpacked_for_cpu_copy(module: nn.Module) -> nn.Module:
    """``module``, or a copy whose 4-bit weight is back in bitsandbytes' standard layout.

    On CPU, bitsandbytes repacks a 4-bit weight for its inference kernel at the first no-grad forward in eval mode
    (``packing_format_for_cpu``); ``dequantize_4bit`` reads only the standard layout. The original is left as it is.
    """
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return module
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    duplicate = copy.copy(module)
    duplicate._parameters = dict(module._parameters)
    weight = copy.deepcopy(module.weight)
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    duplicate._parameters["weight"] = weight
    return duplicate


@torch.no_grad()
def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a (possibly quantized) linear as a plain ``[out, in]`` tensor in ``dtype`` (a new tensor)."""
    if not is_quantized_linear(module):
        return module.weight.detach().to(dtype, copy=True)
    return dequantize_module_weight(_unpacked_for_cpu_copy(module)).detach().to(dtype)


@torch.no_grad()
def dequantized_linear(module: nn.Linear, dtype: torch.dtype, *, dequantize: bool = True) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` computing what the quantized ``module`` computes, on its device.

    ``dequantize=False`` gives the same linear with uninitialised tensors, for a caller that loads them next.
    """
    weight = dequantized_weight(module, dtype) if dequantize else None
    # uninitialised (its values are overwritten below, or by the caller): nn.Linear's own init would draw from the
    # global RNG, and the adapter weights initialised after a copy would then differ between a quantized base and its
    # float twin
    linear = torch.nn.utils.skip_init(
        nn.Linear,
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        device=module.weight.device if weight is None else weight.device,
        dtype=dtype,
    )
    if weight is not None:
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().to(dtype))
    linear.requires_grad_(module.weight.requires_grad)
    linear.train(module.training)
    return linear


def logical_bytes(param: torch.Tensor) -> int:
    """Bytes a full-precision copy of ``param`` can take (its own size when it is not quantized), e.g. one of DLO's
    new layers built from a 4-bit layer. A quantized weight counts at float32: copies are built in the dtype their
    layer computes in (its norms'), which ``prepare_model_for_kbit_training`` makes float32."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    if is_quantized_parameter(param) and shape is not None:
        return int(torch.Size(shape).numel()) * torch.float32.itemsize
    if is_quantized_parameter(param):  # 8-bit: one int8 per weight
        return param.numel() * torch.float32.itemsize
    return param.numel() * param.element_size()


def check_merge_into_quantized(model: nn.Module, what: str) -> None:
    """Refuse to merge ``what`` into a model with bitsandbytes-quantized linears, naming them and the way out."""
    quantized = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    if not quantized:
        return
    raise ValueError(
        f"{what} cannot be merged into this base model: its linears are quantized by bitsandbytes (4-bit or 8-bit; "
        f"{len(quantized)} of them, e.g. `{quantized[0]}`), and a merge into them is not exact. Re-quantizing a "
        "merged weight rounds the update away, and a merged model holding full-precision layers among quantized "
        "ones is quantized again by transformers when it is loaded. Load the same base in bf16 or fp32 (the adapter "
        "loads onto it unchanged) and merge there, or keep the adapter unmerged on the quantized base."
    )
