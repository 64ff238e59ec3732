"""``DepthSFTConfig``: TRL's ``SFTConfig`` plus the knobs of the depth methods' auxiliary losses and routing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from ..core.config import check_loss_coef, check_non_negative_number

__all__ = ["DepthSFTConfig", "AUX_COEFFICIENT_FIELDS", "AUX_LOSS_OF_ADAPTER_FIELD"]

#: Auxiliary-loss name (as reported by ``peft_depth.aux_losses``) -> the DepthSFTConfig field that overrides its
#: coefficient. A loss called ``"<name>.<adapter>"`` (several adapters of one method) follows the ``<name>`` field.
AUX_COEFFICIENT_FIELDS: dict[str, str] = {
    "routing": "routing_loss_coef",
    "distill": "distill_loss_coef",
    "router": "router_loss_coef",
}

#: Coefficient field of an adapter config (its ``aux_loss_fields``) -> the name of the loss it weights.
AUX_LOSS_OF_ADAPTER_FIELD: dict[str, str] = {
    "balance_loss_coef": "routing",  # MoLA, MoLEx
    "distill_loss_coef": "distill",  # MoD
    "router_loss_coef": "router",  # DLO
}


@dataclass
class DepthSFTConfig(SFTConfig):
    """Configuration for ``DepthSFTTrainer``: every ``SFTConfig`` field, plus the ones below.

    The auxiliary-loss coefficients default to ``None``, meaning "use the adapter config's own coefficient" (MoLA /
    MoLEx ``balance_loss_coef``, MoD's distillation weight, DLO's router-loss weight); a number overrides it for this
    run only, without touching the saved adapter config. They are deliberately separate from ``SFTConfig``'s
    ``router_aux_loss_coef``, which belongs to native Mixture-of-Experts architectures (TRL raises if it is set on a
    dense model).

    Note that ``SFTConfig`` itself defaults to ``bf16=True`` and ``gradient_checkpointing=True``; both work with every
    depth method, but without a GPU pass ``bf16=False`` (required: transformers refuses bf16 there unless
    ``use_cpu=True``; and fp32 is faster on a CPU without native bf16).
    """

    routing_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient of the routing load-balancing loss (`routing`: MoLA and MoLEx). None uses the adapter "
            "config's `balance_loss_coef`; 0 turns the loss off."
        },
    )
    distill_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient of MoD's distillation loss (`distill`). None uses the adapter config's own; 0 turns "
            "it off."
        },
    )
    router_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient of DLO's router BCE loss (`router`). None uses the adapter config's own; 0 turns it "
            "off."
        },
    )
    sync_routing_stats: bool = field(
        default=False,
        metadata={
            "help": "In multi-process training, all-reduce batch-level routing statistics during the forward (MoLA's "
            "balance-loss f·P, MoLEx's layer vote, DLO's batch-wide top-k and capacities, the position count of MoD's "
            "distillation mean), so that routing and "
            "auxiliary losses are those of the global batch and the gradients equal a single-process run on the same "
            "global batch. Off: each process routes and balances its own shard (the official implementations' "
            "behaviour under DDP). No effect with one process."
        },
    )
    gate_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the parameter groups a method tags as gates (e.g. MoLEx gates and alpha; the "
            "paper trains gates at up to 0.1). None keeps each adapter config's own `gate_lr` (MoLEx's default is "
            "the official one; MoD's default None trains its gate at the main `learning_rate`)."
        },
    )
    gate_weight_decay: float | None = field(
        default=None,
        metadata={"help": "Weight decay of the gate parameter groups. None keeps the method's own choice."},
    )
    log_routing_health: bool = field(
        default=True,
        metadata={
            "help": "Log routing health from `peft_depth.routing_stats` under `routing/...` (expert-usage entropy per "
            "method, per-layer executed/skip fractions and capacities where a method reports them)."
        },
    )

    def __post_init__(self) -> None:
        _adopt_activation_checkpointing(self)
        super().__post_init__()
        for name in AUX_COEFFICIENT_FIELDS.values():
            if getattr(self, name) is not None:
                check_loss_coef(name, getattr(self, name))
        if self.gate_weight_decay is not None:
            check_non_negative_number("gate_weight_decay", self.gate_weight_decay)
        rate = self.gate_learning_rate
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf")
        ):
            raise ValueError(f"`gate_learning_rate` must be a finite number > 0 (or None), got {rate!r}.")
        for name in ("sync_routing_stats", "log_routing_health"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")

    def aux_coefficient_overrides(self) -> dict[str, float]:
        """``{aux-loss name: coefficient}`` for every coefficient field that is set."""
        overrides = {}
        for loss_name, field_name in AUX_COEFFICIENT_FIELDS.items():
            value = getattr(self, field_name)
            if value is not None:
                overrides[loss_name] = float(value)
        return overrides


def _adopt_activation_checkpointing(args: Any) -> None:
    """Move ``gradient_checkpointing*`` to ``activation_checkpointing*`` where transformers has the new names (5.24).

    SFTConfig's own default sets the old name, which transformers 5.24 deprecates (a FutureWarning at every config,
    removal in v6). The value is kept exactly; on transformers without the new fields nothing changes.
    """
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if hasattr(args, new) and getattr(args, new) is None and getattr(args, old, None) is not None:
            setattr(args, new, getattr(args, old))
