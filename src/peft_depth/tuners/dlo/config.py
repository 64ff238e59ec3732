"""Configuration of DLO: Dynamic Layer Operation for efficient vertical scaling of LLMs (arXiv 2407.11030).

The official code (``DaizeDong/LLaMA-DLO``) trains every weight; here the trainable parts are the new layers (fully,
or LoRA on top of their copies), the routers, and optionally LoRA on the original layers or chosen original modules
trained in full (``trained_original_modules``, saved as peft ``modules_to_save`` copies). Everything else follows
the official defaults: interleaved expansion with zero-out initialisation, a zero-initialised sigmoid router per
layer, MLP skipping, the cosine-similarity router loss with one global ranking, capacity annealing 1.0 -> 0.9.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ...core.config import (
    LoraFieldsConfig,
    check_choice,
    check_loss_coef,
    check_non_negative_number,
    check_positive_int,
    check_probability,
)
from ...core.peft_registration import add_peft_type

__all__ = ["DLOConfig", "expansion_plan"]

DLO = add_peft_type("DLO")

EXPANSIONS = ("interleave", "stack")
INITS = ("zero_out", "copy", "mean", "random")
ROUTED_LAYERS = ("all", "new", "none")
SKIP_MODES = ("mlp", "block")
LOSS_TYPES = ("cos_global", "cos")
NEW_LAYER_TRAINING = ("full", "lora")
INFERENCE_SELECTIONS = ("threshold", "capacity")


def expansion_plan(
    expansion: str | list[int], num_layers: int, expand_every: int, stack_range: list[int] | None
) -> list[tuple[int, int]]:
    """Where the new layers go: a list of ``(insert_after, source)`` original-layer indices, in stack order.

    - ``"interleave"``: after every ``expand_every``-th original layer ``i`` (``i = expand_every-1, 2·expand_every-1,
      ...``) a copy of layer ``i`` (8 layers, every 4 -> after 3 and 7: 10 layers; 30 -> 37).
    - ``"stack"``: copies of the slice ``stack_range = [start, end)`` right after layer ``end-1``, so the slice runs
      twice in a row (SOLAR-style depth up-scaling). Default slice: the top ``num_layers // expand_every`` layers.
    - a list of original indices: a copy of each right after it (a repeated index gives several copies).
    """
    if isinstance(expansion, str):
        if expansion == "interleave":
            plan = [(i, i) for i in range(expand_every - 1, num_layers, expand_every)]
        else:
            start, end = (
                stack_range if stack_range is not None else (num_layers - num_layers // expand_every, num_layers)
            )
            if not 0 <= start < end <= num_layers:
                raise ValueError(
                    f"`stack_range` must be [start, end) with 0 <= start < end <= {num_layers} (the model's depth), "
                    f"got {[start, end]}."
                )
            plan = [(end - 1, j) for j in range(start, end)]
    else:
        if len(expansion) > num_layers:
            raise ValueError(
                f"`expansion` lists {len(expansion)} new layers for a {num_layers}-layer model; DLO adds at most as many "
                "layers as the model has (at most doubling its depth)."
            )
        bad = sorted({i for i in expansion if not 0 <= i < num_layers})[:10]
        if bad:
            raise ValueError(
                f"`expansion` lists source layers {bad} outside the model's {num_layers} layers (valid: 0..{num_layers - 1})."
            )
        plan = [(i, i) for i in sorted(expansion)]
    if not plan:
        raise ValueError(
            f"`expansion`={expansion!r} with expand_every={expand_every} adds no layer to a {num_layers}-layer model; "
            "lower `expand_every` or list the source layers."
        )
    return plan


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: object) -> bool:
    return isinstance(value, (list, tuple))


@dataclass
class DLOConfig(LoraFieldsConfig):
    """Configuration for DLO (Dynamic Layer Operation).

    The model is made deeper by inserting copies of some of its layers (``expansion``, ``init``), and every routed
    layer gets a router ``Linear(d, 1, bias=False)`` (zero-initialised) whose sigmoid score ``s`` on the residual
    stream entering the layer decides, per token, whether the layer's MLP runs (``skip_mode="mlp"``; attention always
    runs) or the whole block runs (``skip_mode="block"``). Executed MLP outputs are scaled by
    ``1 + scale_gap·(s − 0.5)``, which is how the language-model loss reaches the router.

    Training selects the top ``capacity`` fraction of the batch's non-padding tokens, and every token tied with the
    last of them, as the official code does (annealed from 1.0 over ``capacity_annealing_steps`` or
    ``capacity_annealing_fraction`` of training, driven by ``DLOModel.set_dlo_step``); inference runs the tokens with
    ``s >= 0.5``.
    The router is trained by a BCE loss against labels marking the tokens the MLP changes most (lowest cosine
    similarity between the residual stream before and after the MLP), exposed as the auxiliary loss ``"router"``.

    ``r`` > 0 additionally puts LoRA on ``target_modules`` of the original layers (``r=0``, the default, leaves them
    frozen). ``routed_layers="none"`` is dense expansion, the LLaMA-Pro baseline, which can be merged.
    """

    aux_loss_fields = ("router_loss_coef",)

    r: int = field(
        default=0,
        metadata={
            "help": "Rank of LoRA on the original layers' `target_modules` (0: original layers stay frozen, the "
            "default). Also the rank of the LoRA on the new layers when `new_layer_training='lora'` (then it must "
            "be > 0)."
        },
    )
    lora_on_original_layers: bool = field(
        default=True,
        metadata={
            "help": "With r > 0, whether LoRA also goes on `target_modules` of the original layers (False: only on the "
            "new layers, with new_layer_training='lora')."
        },
    )
    expansion: str | list[int] = field(
        default="interleave",
        metadata={
            "help": "'interleave' (a copy after every `expand_every`-th layer, LLaMA-Pro / DLO default), 'stack' "
            "(the slice `stack_range` repeated, SOLAR-style), or a list of original layer indices to copy (each "
            "copy goes right after its source)."
        },
    )
    expand_every: int = field(
        default=4,
        metadata={"help": "Interleave: one new layer after every `expand_every` original layers (8 -> 10, 32 -> 40)."},
    )
    stack_range: list[int] | None = field(
        default=None,
        metadata={
            "help": "Stack: [start, end) of the original layers to repeat right after layer end-1. Default: the top "
            "num_layers // expand_every layers."
        },
    )
    init: str = field(
        default="zero_out",
        metadata={
            "help": "New layer initialisation. 'zero_out' (default): a copy of the source with the output projections "
            "(`zero_out_modules`) zeroed, so the new layer is an exact identity; 'copy': a plain copy; 'mean': the "
            "mean of the source and the layer before it; 'random': the model's own random initialisation."
        },
    )
    zero_out_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (suffix match inside a layer) of the linears zeroed by init='zero_out'. Default: the "
            "attention output and MLP down projections (o_proj/down_proj for Llama-style models, c_proj for GPT-2, dense/"
            "dense_4h_to_h for GPT-NeoX, Falcon and BLOOM, out_proj/fc_out for GPT-J); a layer branch holding linears "
            "but none of these names is refused, since its copy would not start as an identity."
        },
    )
    new_layer_training: str = field(
        default="full",
        metadata={
            "help": "'full': every weight of the new layers trains (as in LLaMA-Pro and DLO). 'lora': the copies stay "
            "frozen and LoRA of rank `r` on `new_layer_target_modules` trains on them."
        },
    )
    new_layer_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "With new_layer_training='lora': linears of the new layers that get LoRA (suffix match). Default: "
            "every linear of the layer."
        },
    )
    routed_layers: str | None = field(
        default=None,
        metadata={
            "help": "Which layers of the expanded stack get a router: 'all' (the paper's), 'new' (only the inserted "
            "layers), or 'none' (dense expansion, the LLaMA-Pro baseline; mergeable). None (default) resolves, "
            "when the config is built, to 'all' if the original layers train (r > 0 with "
            "lora_on_original_layers, or trained_original_modules) or unrouted_edge_layers > 0, else to 'new': "
            "routing *frozen* pretrained layers collapsed SmolLM2 on SST-2 to chance (0.505, where 'new' and dense "
            "expansion reached 0.805; benchmarks/results/dlo.md). Configs saved with `peft_depth_version` <= 2 "
            "that lack the field keep its old default, 'all'."
        },
    )
    unrouted_edge_layers: int = field(
        default=0,
        metadata={
            "help": "With routed_layers='all': the first N and the last N *original* layers (indices 0..N-1 and "
            "L-N..L-1 of the L-layer base) get no router and always run, as the official "
            "`original_dlo_shrink_num`; the new layers keep their routers (the official code switches those "
            "separately). 0 (default): every layer is routed. At most (L-1)//2, so that an original layer stays "
            "routed (checked against the model); route no original layer with routed_layers='new'."
        },
    )
    skip_mode: str = field(
        default="mlp",
        metadata={
            "help": "'mlp' (default, the official ExAttn variant): attention runs for every token and only the MLP is "
            "skipped, so the KV cache stays whole. 'block': the whole block runs on the selected tokens only "
            "(attention among them) and, as in the official non-ExAttn layer, only their MLP branch is scaled "
            "(h + attn + ŝ·mlp; the whole update where the layer has no `mlp`/`feed_forward` module); needs "
            "use_cache=False, as in the official code."
        },
    )
    scale_gap: float = field(
        default=0.05,
        metadata={
            "help": "Executed outputs are scaled by 1 + scale_gap·(s − 0.5), s the router score (official 0.05)."
        },
    )
    capacity: float = field(
        default=0.9,
        metadata={
            "help": "Target fraction of non-padding tokens a routed layer executes in training (official 0.9): the "
            "top ceil(capacity × tokens) by router score, plus every token tied with the last of them (official "
            "rule; a zero-initialised router, which scores every token alike, runs them all)."
        },
    )
    capacity_annealing_steps: int = field(
        default=1000,
        metadata={
            "help": "Steps over which the training capacity falls linearly from 1.0 to `capacity` (0: target from "
            "the start; official 1000). The step comes from `DLOModel.set_dlo_step` (DepthSFTTrainer calls it). "
            "Ignored when `capacity_annealing_fraction` is set."
        },
    )
    capacity_annealing_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Anneal over this fraction of the training run instead of a fixed step count: a number in (0, 1] "
            "(0.5: capacity reaches its target half-way; annealing steps = round(fraction × total steps), at least "
            "1). Takes precedence over `capacity_annealing_steps`. The total comes from DepthSFTTrainer (max_steps, "
            "or the epochs × steps per epoch) or `DLOModel.set_dlo_total_steps`; a training forward without it "
            "raises. None (default): `capacity_annealing_steps` decides."
        },
    )
    loss_type: str = field(
        default="cos_global",
        metadata={
            "help": "Router labels: 'cos_global' (paper default) ranks every (layer, token) pair together by cosine "
            "similarity of the residual stream before/after the MLP, marks the lowest capacity·total as 'execute' "
            "and sets the per-layer capacities from it after every training forward (every micro-batch under "
            "gradient accumulation), which the next forward runs at; 'cos' ranks per layer at that layer's capacity."
        },
    )
    router_loss_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the router BCE loss (auxiliary loss 'router'; official 1.0). 0 turns it off."},
    )
    inference_selection: str = field(
        default="threshold",
        metadata={
            "help": "Which tokens run in eval: 'threshold' (s >= 0.5; the compute varies with the input) or "
            "'capacity' (the top `inference_capacity` fraction per layer and batch, a fixed budget)."
        },
    )
    inference_capacity: float | None = field(
        default=None,
        metadata={
            "help": "Fraction executed per routed layer in eval with inference_selection='capacity' (default: `capacity`)."
        },
    )
    capacity_lr_scaling: bool = field(
        default=False,
        metadata={
            "help": "The official 'dynamic LR': the trainable weights of each routed layer (a new layer's weights, "
            "the LoRA and trained copies on an original layer; not its router, as in the official trainer) train at "
            "the scheduled learning "
            "rate × (capacity_l + 1 − mean capacity), recomputed every optimizer step from the capacities the layer "
            "runs at (they change with annealing and with cos_global). Needs DepthSFTTrainer, which puts each layer "
            "in an optimizer group of its own and applies the multiplier on top of its LR scheduler before every "
            "step (any step schedule; 'reduce_lr_on_plateau' is refused, as it would compound the multipliers); "
            "with another training loop, `DLOModel.depth_optimizer_groups` and `depth_lr_multipliers` give the "
            "groups and the multipliers."
        },
    )
    min_capacity: float = field(
        default=0.05,
        metadata={"help": "Floor of the per-layer capacities that loss_type='cos_global' sets, so no layer starves."},
    )
    trained_original_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules of the original layers trained in full, as the paper trains every weight: names inside "
            "a decoder layer (suffix match, e.g. ['mlp'], or ['self_attn', 'mlp', 'input_layernorm', "
            "'post_attention_layernorm'] for whole layers), in the layers `trained_original_layers` picks. Each "
            "becomes a peft `modules_to_save` copy: at injection its full path (e.g. 'model.layers.3.mlp') is added "
            "to `modules_to_save`, so the saved config lists every module the adapter replaces, the copies are "
            "saved in the adapter and loaded under those names only, and the base weights themselves are never "
            "written (disable_adapter and unload give the base back). The copies keep the base's dtype, as peft's "
            "modules_to_save do. None (default): the original layers stay frozen (or get LoRA, with r > 0)."
        },
    )
    trained_original_layers: str | list[int] = field(
        default="routed",
        metadata={
            "help": "Which original layers `trained_original_modules` trains: 'routed' (default: those with a "
            "router), 'all', or a list of original layer indices."
        },
    )

    @property
    def lora_on_originals(self) -> bool:
        """Whether LoRA goes on the original layers' `target_modules`: a rank, and `lora_on_original_layers`."""
        return self.r > 0 and self.lora_on_original_layers

    def _refresh_defaults(self) -> None:
        if getattr(self, "_routed_layers_defaulted", False):
            self.routed_layers = None

    def _default_routed_layers(self) -> str:
        if self.peft_depth_version < 3:
            return "all"  # the default of the layouts before version 3
        trains_originals = self.lora_on_originals or bool(self.trained_original_modules)
        return "all" if trains_originals or self.unrouted_edge_layers else "new"

    def _check_lora_fields(self, *, allow_zero_rank: bool) -> None:
        # r=0 is the default (no LoRA on the original layers), so every DLO config allows it.
        super()._check_lora_fields(allow_zero_rank=True)

    def training_needs(self) -> tuple[list[str], list[str]]:
        losses, schedules = super().training_needs()
        if (self.routed_layers or self._default_routed_layers()) == "none":
            # dense expansion: no router, so no router loss and no capacity to anneal (LoRA-like training)
            return [], []
        if self.capacity_annealing_fraction is not None:
            schedules.append(f"capacity annealing (capacity_annealing_fraction={self.capacity_annealing_fraction})")
        elif self.capacity_annealing_steps > 0:
            schedules.append(f"capacity annealing (capacity_annealing_steps={self.capacity_annealing_steps})")
        return losses, schedules

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DLO
        check_choice("bias", self.bias, ("none", "all", "dlo_only"))
        self._check_expansion()
        check_positive_int("expand_every", self.expand_every)
        self._check_stack_range()
        check_choice("init", self.init, INITS)
        check_choice("new_layer_training", self.new_layer_training, NEW_LAYER_TRAINING)
        if self.new_layer_training == "lora" and self.r == 0:
            raise ValueError(
                "`r` must be > 0 when new_layer_training='lora' (it is the rank of the new layers' LoRA)."
            )
        if self.new_layer_training == "lora" and self.init == "random":
            raise ValueError(
                "`init`='random' with new_layer_training='lora' would freeze random layers; use init 'zero_out', "
                "'copy' or 'mean', or new_layer_training='full'."
            )
        # a default that follows other fields: re-resolved by revalidate() if they are set after construction
        self._routed_layers_defaulted = self.routed_layers is None or getattr(self, "_routed_layers_defaulted", False)
        if self.routed_layers is None:
            self.routed_layers = self._default_routed_layers()
        check_choice("routed_layers", self.routed_layers, ROUTED_LAYERS)
        check_choice("skip_mode", self.skip_mode, SKIP_MODES)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("inference_selection", self.inference_selection, INFERENCE_SELECTIONS)
        check_non_negative_number("scale_gap", self.scale_gap)
        if self.scale_gap > 2:
            raise ValueError(
                f"`scale_gap` must be in [0, 2] so the output scale stays positive, got {self.scale_gap!r}."
            )
        check_probability("capacity", self.capacity, allow_zero=False)
        if self.inference_capacity is not None:
            check_probability("inference_capacity", self.inference_capacity, allow_zero=False)
        check_probability("min_capacity", self.min_capacity, allow_zero=False)
        if self.loss_type == "cos_global" and self.min_capacity > self.capacity:
            raise ValueError(
                f"`min_capacity` ({self.min_capacity!r}) must be <= `capacity` ({self.capacity!r}): it is the floor of "
                "the per-layer capacities loss_type='cos_global' sets around that mean, and above it every layer "
                "would run at the floor."
            )
        if isinstance(self.capacity_annealing_steps, bool) or not isinstance(self.capacity_annealing_steps, int):
            raise ValueError(
                f"`capacity_annealing_steps` must be an integer >= 0, got {self.capacity_annealing_steps!r}."
            )
        if self.capacity_annealing_steps < 0:
            raise ValueError(
                f"`capacity_annealing_steps` must be an integer >= 0, got {self.capacity_annealing_steps!r}."
            )
        if self.capacity_annealing_fraction is not None:
            check_probability("capacity_annealing_fraction", self.capacity_annealing_fraction, allow_zero=False)
        _check_unrouted_edge_layers(self)
        _check_trained_original_modules(self)
        _check_unused_fields(self)
        check_loss_coef("router_loss_coef", self.router_loss_coef)
        if not isinstance(self.lora_on_original_layers, bool):
            raise ValueError(f"`lora_on_original_layers` must be True or False, got {self.lora_on_original_layers!r}.")
        if not isinstance(self.capacity_lr_scaling, bool):
            raise ValueError(f"`capacity_lr_scaling` must be True or False, got {self.capacity_lr_scaling!r}.")
        for name in ("zero_out_modules", "new_layer_target_modules"):
            value = getattr(self, name)
            if value is not None:
                if not _is_list(value) or not value or not all(isinstance(v, str) and v for v in value):
                    raise ValueError(f"`{name}` must be null or a non-empty list of module names, got {value!r}.")
                setattr(self, name, list(value))

    def _check_expansion(self) -> None:
        if _is_list(self.expansion):
            if not self.expansion:
                raise ValueError(
                    "`expansion` must be 'interleave', 'stack' or a non-empty list of layer indices; got []."
                )
            for i, index in enumerate(self.expansion):
                if not _is_int(index) or index < 0:
                    raise ValueError(f"`expansion[{i}]` must be a layer index (an integer >= 0), got {index!r}.")
            self.expansion = list(self.expansion)
        elif not isinstance(self.expansion, str) or self.expansion not in EXPANSIONS:
            raise ValueError(
                f"`expansion` must be one of {', '.join(repr(e) for e in EXPANSIONS)} or a list of layer indices; "
                f"got {self.expansion!r}."
            )

    def _check_stack_range(self) -> None:
        if self.stack_range is None:
            return
        bounds = self.stack_range
        if (
            not _is_list(bounds)
            or len(bounds) != 2
            or not all(_is_int(v) for v in bounds)
            or not 0 <= bounds[0] < bounds[1]
        ):
            raise ValueError(
                f"`stack_range` must be null or [start, end): two integers with 0 <= start < end (the original layers "
                f"start..end-1 are repeated); got {bounds!r}."
            )
        self.stack_range = list(bounds)

    @property
    def is_dense(self) -> bool:
        """Dense expansion (no routing): the LLaMA-Pro baseline, the only DLO configuration that can be merged."""
        return self.routed_layers == "none"

    def annealing_steps(self, total_steps: int | None = None) -> int:
        """Optimizer steps over which capacity anneals: ``capacity_annealing_steps``, or with
        ``capacity_annealing_fraction`` that fraction of ``total_steps`` (rounded, at least 1)."""
        if self.capacity_annealing_fraction is None:
            return self.capacity_annealing_steps
        if total_steps is None:
            raise ValueError(
                f"`capacity_annealing_fraction`={self.capacity_annealing_fraction} anneals over a fraction of the "
                "training run, whose total number of steps is unknown here: train with DepthSFTTrainer (it supplies "
                "the total from max_steps or the number of epochs), call `set_dlo_total_steps(total)` on the DLO "
                "model (`model.base_model`), or give `capacity_annealing_steps` instead."
            )
        return max(1, round(self.capacity_annealing_fraction * total_steps))

    def capacity_at(self, step: int, total_steps: int | None = None) -> float:
        """Training capacity after ``step`` optimizer steps: linear from 1.0 to ``capacity`` over
        ``annealing_steps(total_steps)`` steps."""
        steps = self.annealing_steps(total_steps)
        if steps == 0:
            return float(self.capacity)
        progress = min(max(step, 0) / steps, 1.0)
        return 1.0 - (1.0 - self.capacity) * progress


def _check_unused_fields(config: DLOConfig) -> None:
    """A field that the rest of the config makes unused is a mistake the user should hear about (it used to be
    ignored silently). Configs written with layout version 1 keep loading as they did."""
    if config.peft_depth_version < 2:
        return
    if config.stack_range is not None and config.expansion != "stack":
        raise ValueError(
            f"`stack_range` is only used with expansion='stack'; this config has expansion={config.expansion!r}. "
            "Remove `stack_range` or set expansion='stack'."
        )
    if config.inference_capacity is not None and config.inference_selection != "capacity":
        raise ValueError(
            "`inference_capacity` is only used with inference_selection='capacity'; this config has "
            f"inference_selection={config.inference_selection!r}. Remove it or set inference_selection='capacity'."
        )
    # Warnings, not errors, so that adapters already saved with such a field keep loading.
    unused = []
    if config.new_layer_target_modules is not None and config.new_layer_training != "lora":
        unused.append(("new_layer_target_modules", f"new_layer_training={config.new_layer_training!r}, not 'lora'"))
    if config.zero_out_modules is not None and config.init != "zero_out":
        unused.append(("zero_out_modules", f"init={config.init!r}, not 'zero_out'"))
    if config.trained_original_layers != "routed" and not config.trained_original_modules:
        unused.append(("trained_original_layers", "`trained_original_modules` is not set"))
    if config.target_modules and not config.lora_on_originals:
        unused.append(("target_modules", "there is no LoRA on the original layers (r=0 or lora_on_original_layers)"))
    if config.r > 0 and not config.lora_on_original_layers and config.new_layer_training != "lora":
        unused.append(("r", "no layer gets LoRA (lora_on_original_layers=False, new_layer_training is not 'lora')"))
    for name, why in unused:
        warnings.warn(f"DLOConfig: `{name}` has no effect, since {why}.", UserWarning, stacklevel=4)


def _check_unrouted_edge_layers(config: DLOConfig) -> None:
    value = config.unrouted_edge_layers
    if not _is_int(value) or value < 0:
        raise ValueError(f"`unrouted_edge_layers` must be an integer >= 0, got {value!r}.")
    if value and config.routed_layers != "all":
        raise ValueError(
            f"`unrouted_edge_layers`={value} applies to routed original layers, i.e. with routed_layers='all'; "
            f"with routed_layers={config.routed_layers!r} no original layer has a router. Set it to 0."
        )


def _check_trained_original_modules(config: DLOConfig) -> None:
    """Validates (and normalises) `trained_original_modules` / `trained_original_layers`."""
    names = config.trained_original_modules
    if names is not None:
        if not _is_list(names) or not names or not all(isinstance(v, str) and v for v in names):
            raise ValueError(
                "`trained_original_modules` must be null or a non-empty list of module names inside a decoder "
                f"layer (e.g. ['mlp']), got {names!r}."
            )
        config.trained_original_modules = list(names)
    layers = config.trained_original_layers
    if _is_list(layers):
        if not layers or not all(_is_int(i) and i >= 0 for i in layers):
            raise ValueError(
                "`trained_original_layers` must be 'routed', 'all' or a non-empty list of original layer indices "
                f"(integers >= 0), got {layers!r}."
            )
        config.trained_original_layers = sorted(set(layers))
    elif layers not in ("routed", "all"):
        raise ValueError(
            "`trained_original_layers` must be 'routed', 'all' or a non-empty list of original layer indices "
            f"(integers >= 0), got {layers!r}."
        )
    if names is not None and layers == "routed" and config.routed_layers != "all":
        raise ValueError(
            f"`trained_original_layers`='routed' picks no layer with routed_layers={config.routed_layers!r} (no "
            "original layer has a router); use 'all' or a list of original layer indices."
        )
