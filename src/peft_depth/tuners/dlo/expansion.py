"""Building DLO's expansion: where the new layers go, what they start as, their LoRA and their routers.

Everything here is built once per adapter at injection and held by the tuner (``dlo_new_layers``, ``dlo_routers``);
``installation`` then puts them into the model's forward. A new layer is a plain copy of an original one, set to
exactly what ``initial_state`` computes from the base weights, so that a load can rebuild unchanged tensors instead of
reading them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.layer_stack import attends_causally, text_config
from ...core.quantization import floating_parameter
from ...core.rewiring import plain_layer_copy, plain_state_dict
from .config import DLOConfig, expansion_plan
from .layer import NewLayerLoraLinear, find_mlp_branch

__all__ = [
    "DEFAULT_ZERO_OUT_MODULES",
    "build_new_layers",
    "build_routers",
    "checked_layout",
    "expanded_layout",
    "hidden_size",
    "initial_state",
    "is_routed_original",
    "matches_module_name",
    "merge_new_layer_lora",
]

#: Output projections zeroed by init='zero_out' when `zero_out_modules` is not set (suffix match inside a layer):
#: attention outputs (o_proj, c_proj, out_proj, dense: GPT-NeoX, Falcon, BLOOM, Phi) and MLP outputs (down_proj,
#: c_proj, fc2, dense_4h_to_h, w2, fc_out: GPT-J, CodeGen).
DEFAULT_ZERO_OUT_MODULES = (
    "o_proj",
    "down_proj",
    "c_proj",
    "out_proj",
    "dense",
    "fc2",
    "dense_4h_to_h",
    "w2",
    "fc_out",
)


def expanded_layout(plan: list[tuple[int, int]], num_layers: int) -> list[tuple[str, int]]:
    """The expanded stack as ``("orig", i)`` / ``("new", source)`` entries, new layers right after their anchor."""
    inserts: dict[int, list[int]] = defaultdict(list)
    for after, source in plan:
        inserts[after].append(source)
    layout: list[tuple[str, int]] = []
    for index in range(num_layers):
        layout.append(("orig", index))
        layout.extend(("new", source) for source in inserts[index])
    return layout


def is_routed_original(config: DLOConfig, index: int, num_layers: int) -> bool:
    """Whether original layer ``index`` of a ``num_layers``-layer base gets a router under ``config``."""
    edge = config.unrouted_edge_layers
    return config.routed_layers == "all" and edge <= index < num_layers - edge


def matches_module_name(module_path: str, names: Sequence[str]) -> bool:
    """Whether ``module_path`` is one of ``names`` or ends with ``.<name>`` (peft's suffix match)."""
    return any(module_path == name or module_path.endswith("." + name) for name in names)


def zeroed_by(key: str, names: Sequence[str]) -> bool:
    """Whether ``init='zero_out'`` zeroes the tensor ``key`` (a plain state-dict key of a layer): a tensor of a module
    in ``names`` (a linear's weight and bias), or a projection held as a parameter of its own, with its bias
    (mixture-of-experts layers keep their experts' ``down_proj`` / ``down_proj_bias`` as parameters of one module)."""
    module_path = key.rpartition(".")[0]
    return (
        matches_module_name(module_path, names)
        or matches_module_name(key, names)
        or matches_module_name(key, [f"{name}_bias" for name in names])
    )


def hidden_size(model: nn.Module) -> int:
    """The model's hidden size, read from its (text) config."""
    config = text_config(model)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        raise ValueError("DLO could not read the hidden size from the model config (`hidden_size`).")
    return int(hidden)


def initial_state(config: DLOConfig, originals: Sequence[nn.Module], source: int) -> dict[str, torch.Tensor]:
    """What a new copy of ``originals[source]`` starts as (plain keys), computed the same way at build and at load."""
    state = plain_state_dict(originals[source])
    if config.init == "mean" and source > 0:
        previous = plain_state_dict(originals[source - 1])
        return {k: (v + previous[k]) / 2 if torch.is_floating_point(v) else v.clone() for k, v in state.items()}
    if config.init == "zero_out":
        names = config.zero_out_modules or DEFAULT_ZERO_OUT_MODULES
        return {k: torch.zeros_like(v) if zeroed_by(k, names) else v for k, v in state.items()}
    return state


def checked_layout(config: DLOConfig, originals: Sequence[nn.Module], model: nn.Module) -> list[tuple[str, int]]:
    """The expanded layout of ``config`` on ``originals``, after every check against the base model.

    Runs before anything is built or hooked, so that a config that does not fit the model (indices or a stack range
    beyond its depth, more new layers than it has, module names it lacks) fails at once with the field named.
    """
    if not attends_causally(originals):
        raise ValueError(
            f"DLO needs a decoder whose attention declares `is_causal`; {type(originals[0]).__name__} does not (an "
            "encoder such as BERT, whose layers attend both ways, or an ALiBi decoder such as BLOOM or MPT, whose "
            "position bias DLO's layer calls do not carry). Use it on Llama, Qwen, Mistral, Gemma, GPT-2, ..."
        )
    plan = expansion_plan(config.expansion, len(originals), config.expand_every, config.stack_range)
    layout = expanded_layout(plan, len(originals))
    edge, depth = config.unrouted_edge_layers, len(originals)
    if 2 * edge >= depth:
        raise ValueError(
            f"`unrouted_edge_layers`={edge} leaves no original layer of this {depth}-layer model routed (allowed: "
            f"0..{(depth - 1) // 2}); to route only the new layers use routed_layers='new'."
        )
    if config.routed_layers != "none":
        hidden_size(model)
        if config.skip_mode == "mlp":
            find_mlp_branch(originals[0])
    source = plan[0][1]
    modules = _plain_modules(originals[source])  # every original layer has the same structure
    name = type(originals[source]).__name__
    if config.init == "zero_out":
        names = config.zero_out_modules or DEFAULT_ZERO_OUT_MODULES
        state = plain_state_dict(originals[source], dequantize=False)  # names and shapes only
        if not any(zeroed_by(key, names) for key in state):
            raise ValueError(
                f"`zero_out_modules` ({list(names)}) matches no module of {name}; name its attention-output and "
                "MLP-down projections."
            )
        if config.zero_out_modules is None:
            _check_default_zero_out_covers_every_branch(state, name)
    if config.new_layer_training == "lora":
        targets = config.new_layer_target_modules
        linears = [path for path, module in modules.items() if path and isinstance(module, nn.Linear)]
        if not any(targets is None or matches_module_name(path, targets) for path in linears):
            raise ValueError(
                f"`new_layer_target_modules` ({targets}) matches no linear of the new layers ({name}); list some of "
                f"their linear layers (e.g. {', '.join(linears[:4]) or 'q_proj, v_proj'})."
            )
    return layout


def _check_default_zero_out_covers_every_branch(state: dict[str, torch.Tensor], name: str) -> None:
    """A new layer is an identity only if every branch writing into the residual stream ends in a zeroed projection:
    each child of the layer that holds a projection (a tensor of two or more dimensions: a linear's weight, a router,
    experts held as parameters) must have one zeroed by the default names."""
    branches: dict[str, bool] = {}
    for key, tensor in state.items():
        if "." not in key or tensor.dim() < 2:
            continue
        child = key.split(".", 1)[0]
        branches[child] = branches.get(child, False) or zeroed_by(key, DEFAULT_ZERO_OUT_MODULES)
    missed = sorted(child for child, zeroed in branches.items() if not zeroed)
    if missed:
        raise ValueError(
            f"init='zero_out' with the default `zero_out_modules` zeroes no projection in {', '.join(missed)} of "
            f"{name}, so the new layers would not start as an identity. Set `zero_out_modules` to the output "
            "projection of each of its branches (attention output and MLP down projection), or use init='copy'."
        )


def _plain_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``layer`` that hold tensors, by their name in a plain copy (adapter wrappers unwrapped)."""
    modules = {}
    for key in plain_state_dict(layer, dequantize=False):
        path = key.rpartition(".")[0]
        module = layer.get_submodule(path) if path else layer
        modules[path] = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return modules


def build_new_layers(
    config: DLOConfig,
    layout: list[tuple[str, int]],
    originals: Sequence[nn.Module],
    init_weights: Callable[[nn.Module], None] | None,
) -> nn.ModuleDict:
    """The new layers of ``layout`` as ``{"new<position>": layer}``.

    ``init_weights`` is the model's own initialiser (transformers' ``_init_weights``), used by ``init='random'``.
    """
    new_layers = nn.ModuleDict()
    for position, (kind, source) in enumerate(layout):
        if kind != "new":
            continue
        # `initial_state` overwrites every tensor of the copy, so its quantized linears are dequantized there only;
        # a random initialiser might leave a tensor untouched, so that copy starts from the dequantized weights
        layer = plain_layer_copy(originals[source], dequantize=config.init == "random")
        if config.init == "random":
            _random_init(layer, init_weights)
        else:
            # Built exactly as a load rebuilds it (`initial_state`), so unchanged tensors need not be saved.
            layer.load_state_dict(initial_state(config, originals, source))
        if config.new_layer_training == "lora":
            _wrap_new_layer_lora(layer, config)
        layer.train(originals[source].training)
        new_layers[f"new{position}"] = layer
    return new_layers


def _random_init(layer: nn.Module, init_weights: Callable[[nn.Module], None] | None) -> None:
    for module in layer.modules():
        for param in module.parameters(recurse=False):
            # transformers skips modules it has marked as initialised (loaded from a checkpoint)
            param.__dict__.pop("_is_hf_initialized", None)
        module.__dict__.pop("_is_hf_initialized", None)
        if callable(init_weights):
            init_weights(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _wrap_new_layer_lora(layer: nn.Module, config: DLOConfig) -> None:
    targets = config.new_layer_target_modules
    for name, module in list(layer.named_modules()):
        if not isinstance(module, nn.Linear) or not name:
            continue
        if targets is not None and not matches_module_name(name, targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        wrapped = NewLayerLoraLinear(module, config.r, config.lora_alpha, config.lora_dropout)
        # Under peft's `low_cpu_mem_usage` load the new LoRA weights are created on the meta device and the loaded
        # tensors are assigned to them afterwards; there is nothing to move (and meta tensors cannot be copied).
        if not any(param.is_meta for param in wrapped.parameters()):
            wrapped.to(module.weight.device)
        setattr(parent, child, wrapped)


def merge_new_layer_lora(layer: nn.Module) -> None:
    """Replace every ``NewLayerLoraLinear`` inside ``layer`` by its base linear with the LoRA update added."""
    for name, module in list(layer.named_modules()):
        if isinstance(module, NewLayerLoraLinear):
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, module.merged_linear())


def build_routers(
    config: DLOConfig, layout: list[tuple[str, int]], originals: Sequence[nn.Module], model: nn.Module
) -> nn.ModuleDict:
    """One zero-initialised ``Linear(hidden, 1, bias=False)`` per routed position, as ``{"l<position>": router}``.

    With ``unrouted_edge_layers`` = N, the first N and last N original layers (by original index, as the official
    ``original_dlo_shrink_num``) get none; new layers are routed whatever their source."""
    routers = nn.ModuleDict()
    if config.routed_layers == "none":
        return routers
    hidden = hidden_size(model)
    # a floating parameter: a quantized weight's dtype (uint8) is storage, not the dtype the layer computes in
    reference = floating_parameter(originals[0])
    if reference is None:
        reference = next(originals[0].parameters())
    for position, (kind, source) in enumerate(layout):
        if kind != "new" and not is_routed_original(config, source, len(originals)):
            continue
        router = nn.Linear(hidden, 1, bias=False, device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(router.weight)  # s = 0.5 for every token: a fresh adapter runs every layer
        router.train(originals[0].training)
        routers[f"l{position}"] = router
    return routers
