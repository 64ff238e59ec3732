"""Configuration of MoLA: MoE-LoRA with layer-wise expert allocation ("Higher Layers Need More LoRA Experts")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import LoraFieldsConfig, check_choice, check_loss_coef, check_positive_int
from ...core.peft_registration import add_peft_type

__all__ = ["MoLAConfig", "expand_expert_pattern"]

MOLA = add_peft_type("MOLA")
#: The paper's best allocation (▽: more experts in higher layers, "Higher Layers Need More LoRA Experts"), the default
#: of configs written with `peft_depth_version` >= 2.
DEFAULT_EXPERT_PATTERN = (2, 4, 6, 8)
#: What a config with neither field meant in `peft_depth_version` 1: 8 experts in every layer (□).
V1_DEFAULT_NUM_EXPERTS = 8
#: How `lora_dropout` masks the input of a token's selected experts (see `MoLAConfig.expert_dropout`).
EXPERT_DROPOUT_CHOICES = ("per_expert", "shared")


def expand_expert_pattern(pattern: list[int], num_layers: int) -> list[int]:
    """Spread a per-group pattern over ``num_layers`` contiguous layers, earlier groups one layer larger if needed.

    ``[2, 4, 6, 8]`` over 30 layers gives groups of 8, 8, 7 and 7 layers.
    """
    if len(pattern) > num_layers:
        raise ValueError(
            f"`expert_pattern` has {len(pattern)} groups but the model has only {num_layers} layers; use at most "
            f"{num_layers} groups."
        )
    base, extra = divmod(num_layers, len(pattern))
    allocation: list[int] = []
    for group, experts in enumerate(pattern):
        allocation.extend([experts] * (base + (1 if group < extra else 0)))
    return allocation


@dataclass
class MoLAConfig(LoraFieldsConfig):
    """Configuration for MoLA.

    Each targeted linear layer gets ``E_l`` LoRA experts of rank ``r`` and its own router ``Linear(in, E_l)`` over the
    per-token input; the top-``k_l`` experts (softmax in fp32, renormalised) are mixed and added to the frozen output.
    ``E_l`` and ``k_l`` may differ per layer of the block stack: give ``num_experts`` / ``top_k`` as one int, as a list
    with one entry per layer, or give ``expert_pattern`` (e.g. ``[2, 4, 6, 8]``, the paper's best allocation) to
    split the stack into equal contiguous groups.
    """

    aux_loss_fields = ("balance_loss_coef",)

    num_experts: int | list[int] | None = field(
        default=None,
        metadata={
            "help": "LoRA experts per target linear: one int for every layer, or a list with one entry per layer of "
            "the block stack. When neither this nor `expert_pattern` is set, `expert_pattern` becomes the paper's ▽ "
            f"{list(DEFAULT_EXPERT_PATTERN)} (configs saved with `peft_depth_version` 1 keep their meaning: "
            f"{V1_DEFAULT_NUM_EXPERTS} experts in every layer)."
        },
    )
    top_k: int | list[int] = field(
        default=2, metadata={"help": "Experts mixed per token: one int, or a list with one entry per layer."}
    )
    expert_pattern: list[int] | None = field(
        default=None,
        metadata={
            "help": "Experts per contiguous group of layers, e.g. [2, 4, 6, 8] (the paper's ▽, the default), "
            "[8, 6, 4, 2] (△), [8, 2, 2, 8] (▷◁), [5, 5, 5, 5] (□). Earlier groups get one layer more when the depth "
            "does not divide. Mutually exclusive with `num_experts`."
        },
    )
    expert_dropout: str | None = field(
        default=None,
        metadata={
            "help": "How `lora_dropout` masks a token's input for its top-k experts while training. 'per_expert' "
            "(the default): each selected expert draws a mask of its own, as the official code's dispatch does (one "
            "dropout call per expert); it costs k masked copies of each adapted input. 'shared': one mask for all of "
            "a token's experts: less memory, but the experts' updates then co-vary (up to k times the official "
            "variance when they agree, none when they cancel). Inference is the same either way. Configs saved "
            "with `peft_depth_version` <= 3 keep 'shared', which they trained with."
        },
    )
    balance_loss_coef: float = field(
        default=0.001,
        metadata={
            "help": "Weight of the Switch-style load-balancing loss E_l·Σ f·P, per layer over all its target modules "
            "and summed over layers (the paper's 0.001; the released training script leaves the loss off unless asked, "
            "`obalance=False`). 0 turns it off. Read through `peft_depth.aux_losses`."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MOLA
        check_choice("bias", self.bias, ("none", "all", "mola_only"))
        check_loss_coef("balance_loss_coef", self.balance_loss_coef)
        if self.expert_dropout is None:  # made explicit, so the saved config says how it trained
            self.expert_dropout = "per_expert" if self.peft_depth_version >= 4 else "shared"
        check_choice("expert_dropout", self.expert_dropout, EXPERT_DROPOUT_CHOICES)
        pattern_is_default = self.num_experts is None and self.expert_pattern is None
        self._allocation_defaulted = pattern_is_default or getattr(self, "_allocation_defaulted", False)
        if pattern_is_default:
            # Made explicit, so that the saved config says what was trained whatever a later default is.
            if self.peft_depth_version >= 2:
                self.expert_pattern = list(DEFAULT_EXPERT_PATTERN)
            else:
                self.num_experts = V1_DEFAULT_NUM_EXPERTS
        if self.expert_pattern is not None:
            if self.num_experts is not None:
                raise ValueError("Set either `num_experts` or `expert_pattern`, not both.")
            if not isinstance(self.expert_pattern, (list, tuple)) or not self.expert_pattern:
                raise ValueError(
                    f"`expert_pattern` must be a non-empty list of positive ints, got {self.expert_pattern!r}."
                )
            self.expert_pattern = list(self.expert_pattern)
            for i, experts in enumerate(self.expert_pattern):
                check_positive_int(f"expert_pattern[{i}]", experts)
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ValueError(f"`{name}` must be a positive int or a non-empty list of positive ints, got [].")
                setattr(self, name, list(value))
                for i, entry in enumerate(value):
                    check_positive_int(f"{name}[{i}]", entry)
            else:
                check_positive_int(name, value)
        if isinstance(self.num_experts, int) and isinstance(self.top_k, int) and self.top_k > self.num_experts:
            raise ValueError(f"`top_k` ({self.top_k}) must be <= `num_experts` ({self.num_experts}).")
        if self.expert_pattern is not None and isinstance(self.top_k, int):
            smallest = min(self.expert_pattern)
            if self.top_k > smallest:
                default = (
                    " (the default ▽ pattern; set `num_experts` or `expert_pattern`)" if pattern_is_default else ""
                )
                raise ValueError(
                    f"`top_k` ({self.top_k}) must be <= the smallest entry of `expert_pattern` ({smallest}){default}."
                )

    def _refresh_defaults(self) -> None:
        # the default ▽ pattern (or v1's 8 experts) was filled in: a `num_experts` or `expert_pattern` set since
        # replaces it, as it would have in the constructor
        if getattr(self, "_allocation_defaulted", False):
            default = (
                (list(DEFAULT_EXPERT_PATTERN), None)
                if self.peft_depth_version >= 2
                else (None, V1_DEFAULT_NUM_EXPERTS)
            )
            if (self.expert_pattern, self.num_experts) != default:
                self._allocation_defaulted = False
                if self.num_experts is not None and self.expert_pattern == default[0]:
                    self.expert_pattern = None
                elif self.expert_pattern is not None and self.num_experts == default[1]:
                    self.num_experts = None

    @property
    def is_per_layer(self) -> bool:
        """Whether the allocation differs by layer (and so needs targets inside the block stack)."""
        return self.expert_pattern is not None or isinstance(self.num_experts, list) or isinstance(self.top_k, list)

    def allocation(self, num_layers: int | None) -> tuple[list[int], list[int]] | tuple[int, int]:
        """Resolve ``(experts, top_k)``: per-layer lists for a stack of ``num_layers``, or two ints.

        Raises ValueError when a list does not have one entry per layer, or top_k exceeds a layer's experts.
        """
        experts = self.num_experts
        if not self.is_per_layer:
            return experts, self.top_k
        if num_layers is None:
            raise ValueError(
                "A per-layer allocation (`num_experts`/`top_k` lists or `expert_pattern`) needs a model with a block "
                "stack; this model has none, so give `num_experts` and `top_k` as ints."
            )
        if self.expert_pattern is not None:
            experts = expand_expert_pattern(self.expert_pattern, num_layers)
        per_layer = {}
        for name, value in (("num_experts", experts), ("top_k", self.top_k)):
            if isinstance(value, list):
                if len(value) != num_layers:
                    raise ValueError(
                        f"`{name}` has {len(value)} entries but the model has {num_layers} layers: give exactly one "
                        "entry per layer, or one int."
                    )
                per_layer[name] = value
            else:
                per_layer[name] = [value] * num_layers
        for layer, (e, k) in enumerate(zip(per_layer["num_experts"], per_layer["top_k"])):
            if k > e:
                raise ValueError(f"`top_k` ({k}) must be <= `num_experts` ({e}) at layer {layer}.")
        return per_layer["num_experts"], per_layer["top_k"]
