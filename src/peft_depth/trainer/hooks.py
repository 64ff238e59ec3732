"""The duck-typed hooks between ``DepthSFTTrainer`` and the depth tuners, and the helpers that call them.

The trainer knows no method by name. A tuner (any ``peft_depth.core.tuner.DepthTuner``, or any module inside the
trained model) takes part through these optional methods:

``depth_aux_terms() -> {name: AuxLossTerm(value, coefficient)}`` (``core.aux``)
    Auxiliary losses of the last forward. The trainer weights each by the coefficient (or its override from
    ``DepthSFTConfig``), adds it to the LM loss and logs it as ``loss/<name>``.

``depth_routing_stats() -> dict`` (``core.aux``)
    Routing statistics of the last forward, ``{method: payload}``. ``routing_health`` below turns them into the
    ``routing/...`` scalars the trainer logs; see its docstring for the layout it reads.

``depth_optimizer_groups(base_lr: float, weight_decay: float) -> list[dict]``
    Parameter groups that need their own optimizer settings (MoLEx gates and alpha, DLO per-layer learning rates).
    Each dict is a ``torch.optim`` parameter group: ``"params"`` (required), optional ``"lr"`` and
    ``"weight_decay"`` (default: the trainer's), and an optional ``"name"``; groups named ``"gate"`` (or starting
    with ``"gate"``) take ``DepthSFTConfig.gate_learning_rate`` / ``gate_weight_decay`` when those are set. Trainable
    parameters not listed in any group get the trainer's usual decay / no-decay groups. A parameter may appear in at
    most one group.

``depth_lr_multipliers() -> {group name: float}``
    Per-step learning-rate multipliers of named groups from ``depth_optimizer_groups`` (DLO's ``capacity_lr_scaling``:
    each routed layer's rate follows its current capacity). Before each optimizer step (at the step's first
    micro-batch) the trainer sets each named group's ``lr`` to the rate its LR scheduler gave it × the multiplier
    (``apply_lr_multipliers``), so the multiplier rides on the schedule (warmup, decay) instead of replacing it.

``set_training_step(step: int) -> None``
    Called before every training micro-batch with the trainer's global step (the number of optimizer steps done),
    so schedules such as DLO's capacity annealing follow the trainer, also after resuming from a checkpoint.

``set_training_total_steps(total_steps: int) -> None``
    Called before every training micro-batch with the run's total number of optimizer steps (``TrainerState.
    max_steps``: ``max_steps``, or the number of epochs × the optimizer steps per epoch), for schedules given as a
    fraction of training (DLO's ``capacity_annealing_fraction``).

``needs_full_logits`` (attribute or property, bool)
    True when an active adapter must see the model's own LM-head logits (MoD's ``mix_space="log_probs"`` mixes
    per-layer log-probabilities, which TRL's fused LM head never materialises). The trainer then computes the LM loss
    from ``logits`` instead of the fused head (same normalisation), at the cost of the full logits' memory.

``depth_checkpoint_state() -> dict`` and ``load_depth_checkpoint_state(state: dict) -> None``
    Training state a tuner keeps outside its parameters that must survive a resume (e.g. DLO's per-layer capacities
    from the ``cos_global`` ranking, which take effect from the next step). The trainer saves it next to each
    checkpoint (``depth_tuner_state.pt``, keyed by the module's path) and hands it back when training resumes.

``routing_context.sync_across_processes`` (``core.context.RoutingContext``)
    Set from ``DepthSFTConfig.sync_routing_stats`` on every ``DepthTuner``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.aux import coefficient_override, raw_aux_losses
from ..core.fsdp_root import check_fsdp_root
from ..core.tuner import DepthTuner

__all__ = [
    "CHECKPOINT_STATE_FILE",
    "WeightedAuxTerm",
    "apply_lr_multipliers",
    "lr_multipliers",
    "checkpoint_state",
    "load_checkpoint_state",
    "needs_full_logits",
    "collect_optimizer_groups",
    "depth_tuners",
    "loss_coefficient_overrides",
    "routing_health",
    "set_sync_routing_stats",
    "set_training_step",
    "set_training_total_steps",
    "weighted_aux_terms",
]

#: Per-layer statistics whose average over layers is logged (plus its minimum: one collapsed layer is the warning).
MEAN_AND_MIN_KEYS = ("usage_entropy",)
#: Per-layer statistics logged as their average over layers only.
MEAN_KEYS = ("alpha", "mean_score", "executed_fraction")
#: Per-layer statistics logged layer by layer (and averaged): the fraction of tokens a layer skips, its capacity.
PER_LAYER_KEYS = ("skip_fraction", "capacity")
#: Bookkeeping numbers that say nothing about routing health.
IGNORED_KEYS = ("layer", "num_tokens", "num_candidates", "num_experts", "top_k", "step", "distill_positions", "chosen")
#: Container names left out of metric names.
CONTAINER_KEYS = ("layers", "rows")


def depth_tuners(model: nn.Module) -> list[DepthTuner]:
    """Every depth tuner inside ``model`` (through ``PeftModel``, DDP or accelerate wrappers)."""
    return [module for module in model.modules() if isinstance(module, DepthTuner)]


def _hook_owners(model: nn.Module, hook: str) -> list[nn.Module]:
    # getattr_static: PeftModel forwards unknown attributes to its tuner, which would call each hook twice.
    return [module for module in model.modules() if callable(inspect.getattr_static(module, hook, None))]


def set_sync_routing_stats(model: nn.Module, enabled: bool) -> int:
    """Set ``routing_context.sync_across_processes`` on every depth tuner; returns how many were found."""
    tuners = depth_tuners(model)
    for tuner in tuners:
        tuner.routing_context.sync_across_processes = bool(enabled)
    return len(tuners)


@contextlib.contextmanager
def loss_coefficient_overrides(model: nn.Module, overrides: Mapping[str, float]) -> Iterator[None]:
    """Within the block, every depth tuner weighs its auxiliary losses with this run's coefficients
    (``RoutingContext.loss_coefficient``), so a loss the adapter config switches off (coefficient 0, not computed) is
    computed when the run weights it. Afterwards the adapter configs' own coefficients hold again: a forward of the
    user's own loop after training must not inherit the trainer's overrides."""
    tuners = depth_tuners(model)
    previous = [tuner.routing_context.loss_coefficient_overrides for tuner in tuners]
    for tuner in tuners:
        tuner.routing_context.loss_coefficient_overrides = {name: float(value) for name, value in overrides.items()}
    try:
        yield
    finally:
        for tuner, saved in zip(tuners, previous):
            tuner.routing_context.loss_coefficient_overrides = saved


def set_training_step(model: nn.Module, step: int) -> None:
    """Tell every module with a ``set_training_step`` hook the trainer's global step.

    Between steps every FSDP2-managed parameter is a shard, so this is also where a partly sharded model whose depth
    tuners' parameters FSDP does not manage is refused (``core.fsdp_root``)."""
    check_fsdp_root(model, depth_tuners(model))
    for module in _hook_owners(model, "set_training_step"):
        module.set_training_step(int(step))


def set_training_total_steps(model: nn.Module, total_steps: int) -> None:
    """Tell every module with a ``set_training_total_steps`` hook the run's total number of optimizer steps."""
    for module in _hook_owners(model, "set_training_total_steps"):
        module.set_training_total_steps(int(total_steps))


def needs_full_logits(model: nn.Module) -> bool:
    """Whether any module of ``model`` says its adapter must see the model's own LM-head logits."""
    return any(bool(getattr(module, "needs_full_logits", False)) for module in depth_tuners(model))


#: File inside a checkpoint folder holding the tuners' ``depth_checkpoint_state``.
CHECKPOINT_STATE_FILE = "depth_tuner_state.pt"


def checkpoint_state(model: nn.Module) -> dict[str, Any]:
    """``{module path: state}`` from every ``depth_checkpoint_state`` hook (empty when no module has one)."""
    owners = {id(m) for m in _hook_owners(model, "depth_checkpoint_state")}
    return {name: module.depth_checkpoint_state() for name, module in model.named_modules() if id(module) in owners}


def load_checkpoint_state(model: nn.Module, states: Mapping[str, Any]) -> None:
    """Hand each module its saved state back; raises ValueError when a saved module is missing or has no hook."""
    modules = dict(model.named_modules())
    for name, state in states.items():
        module = modules.get(name)
        if module is None or not callable(inspect.getattr_static(module, "load_depth_checkpoint_state", None)):
            raise ValueError(
                f"The checkpoint holds depth-tuner state for `{name}`, but this model has no module there that "
                "implements `load_depth_checkpoint_state`; resume with the same adapter configuration."
            )
        module.load_depth_checkpoint_state(state)


@dataclass
class WeightedAuxTerm:
    """One auxiliary loss of the last forward: unweighted value, the coefficient used, and their product."""

    value: torch.Tensor
    coefficient: float
    weighted: torch.Tensor


def weighted_aux_terms(model: nn.Module, overrides: Mapping[str, float] | None = None) -> dict[str, WeightedAuxTerm]:
    """Auxiliary losses of the last forward of ``model``, weighted; terms whose coefficient is 0 are left out."""
    overrides = overrides or {}
    terms = {}
    for name, term in raw_aux_losses(model).items():
        override = coefficient_override(name, overrides)
        coefficient = float(term.coefficient if override is None else override)
        if coefficient == 0:
            continue
        terms[name] = WeightedAuxTerm(term.value, coefficient, coefficient * term.value)
    return terms


# ---------------------------------------------------------------------------------------------- optimizer groups


def collect_optimizer_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    *,
    gate_learning_rate: float | None = None,
    gate_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups from every ``depth_optimizer_groups`` hook, with the gate overrides applied.

    Only parameters that require grad are kept; empty groups are dropped. Raises ValueError when a parameter is
    claimed twice.
    """
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for owner in _hook_owners(model, "depth_optimizer_groups"):
        for group in owner.depth_optimizer_groups(base_lr, weight_decay):
            if "params" not in group:
                raise ValueError(f"{type(owner).__name__}.depth_optimizer_groups returned a group without 'params'.")
            params = [p for p in group["params"] if p.requires_grad]
            for p in params:
                if id(p) in seen:
                    raise ValueError(
                        f"{type(owner).__name__}.depth_optimizer_groups lists a parameter in two groups "
                        f"(group {group.get('name')!r})."
                    )
                seen.add(id(p))
            if not params:
                continue
            new_group = {**group, "params": params}
            new_group.setdefault("lr", base_lr)
            new_group.setdefault("weight_decay", weight_decay)
            if str(new_group.get("name", "")).startswith("gate"):
                if gate_learning_rate is not None:
                    new_group["lr"] = gate_learning_rate
                if gate_weight_decay is not None:
                    new_group["weight_decay"] = gate_weight_decay
            groups.append(new_group)
    return groups


#: Keys ``apply_lr_multipliers`` keeps in an optimizer group: the rate before its multiplier, and the rate it set.
UNSCALED_LR_KEY = "depth_unscaled_lr"
SCALED_LR_KEY = "depth_scaled_lr"


def lr_multipliers(model: nn.Module) -> dict[str, float]:
    """``{optimizer group name: learning-rate multiplier}`` from every ``depth_lr_multipliers`` hook in ``model``."""
    multipliers: dict[str, float] = {}
    for owner in _hook_owners(model, "depth_lr_multipliers"):
        multipliers.update(owner.depth_lr_multipliers())
    return multipliers


def apply_lr_multipliers(model: nn.Module, optimizer: Any) -> dict[str, float]:
    """Scale each optimizer group named by a ``depth_lr_multipliers`` hook: ``lr`` = its unscaled rate × multiplier.

    The unscaled rate is the group's ``lr`` as the LR scheduler (or the user) last set it. PyTorch's ``LambdaLR``,
    behind every Hugging Face schedule but ``reduce_lr_on_plateau``, overwrites ``group["lr"]`` on each step with
    ``initial_lr × lambda(step)``: a rate that differs from the one this function last wrote is such a fresh rate and
    is scaled; one still equal to it was scaled already (a second call in the same step, or a resumed optimizer
    whose saved groups carry both keys) and is rescaled from the unscaled rate kept beside it. So the multiplier
    never compounds, and the schedule's warmup and decay stay in force. Returns ``{group name: lr}`` of the groups set.
    """
    multipliers = lr_multipliers(model)
    applied = {}
    for group in optimizer.param_groups:
        name = group.get("name")
        if name not in multipliers:
            continue
        scaled = group.get(SCALED_LR_KEY)
        unscaled = group[UNSCALED_LR_KEY] if scaled is not None and group["lr"] == scaled else group["lr"]
        group[UNSCALED_LR_KEY] = unscaled
        group["lr"] = group[SCALED_LR_KEY] = unscaled * float(multipliers[name])
        applied[name] = group["lr"]
    return applied


# ---------------------------------------------------------------------------------------------- routing health


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def routing_health(stats: Mapping[str, Any], drop_path_names: Iterable[str] = ()) -> dict[str, float]:
    """Flatten ``peft_depth.routing_stats`` output into ``routing/...`` scalars for logging.

    Layout read (every method's ``depth_routing_stats`` follows it): ``{method: payload}``, where ``payload`` nests
    dicts and lists. A dict with a ``"layer"`` key is a *row* (one layer's statistics): from rows the keys in
    ``MEAN_AND_MIN_KEYS`` (``usage_entropy``) are logged as their mean and minimum over rows, ``MEAN_KEYS``
    (``alpha``, ``mean_score``, ``executed_fraction``) as their mean, and ``PER_LAYER_KEYS`` (``skip_fraction``,
    ``capacity``) per layer and as a mean; a row with ``executed_fraction`` also gets ``skip_fraction = 1 -
    executed_fraction``. Outside rows, every finite number not in ``IGNORED_KEYS`` is logged under its path (method
    summaries such as an overall executed fraction or MoD's gate). Dict keys in ``drop_path_names`` (e.g. the
    adapter name when there is one) and ``CONTAINER_KEYS`` are left out of the names; non-finite numbers are
    skipped.

    Example: MoLA's ``{"mola": {"default": [{"layer": 0, "usage_entropy": 1.3, ...}, ...]}}`` gives
    ``routing/mola/usage_entropy`` and ``routing/mola/usage_entropy_min``.
    """
    drop = set(drop_path_names) | set(CONTAINER_KEYS)
    out: dict[str, float] = {}
    buckets: dict[str, list[float]] = defaultdict(list)

    def add_row(prefix: str, row: Mapping[str, Any]) -> None:
        layer = row["layer"]
        values = {key: float(value) for key, value in row.items() if _is_number(value) and key not in IGNORED_KEYS}
        if "executed_fraction" in values and "skip_fraction" not in values:
            values["skip_fraction"] = 1.0 - values["executed_fraction"]
        for key, value in values.items():
            if key in MEAN_AND_MIN_KEYS or key in MEAN_KEYS:
                buckets[f"{prefix}/{key}"].append(value)
            elif key in PER_LAYER_KEYS:
                out[f"{prefix}/{key}/layer_{layer}"] = value
                buckets[f"{prefix}/{key}"].append(value)

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            if "layer" in node:
                add_row("routing/" + "/".join(path), node)
                return
            for key, value in node.items():
                sub = path if key in drop else (*path, str(key))
                if _is_number(value) and key not in IGNORED_KEYS:
                    out["routing/" + "/".join(sub)] = float(value)
                elif isinstance(value, (Mapping, list, tuple)):
                    walk(value, sub)
        elif isinstance(node, (list, tuple)):
            for item in node:
                if isinstance(item, (Mapping, list, tuple)):
                    walk(item, path)

    for method, payload in stats.items():
        walk(payload, (str(method),))
    for name, values in buckets.items():
        # a method's own summary (e.g. DLO's token-weighted executed fraction) wins over the plain layer average
        out.setdefault(name, sum(values) / len(values))
        key = name.rsplit("/", 1)[-1]
        if key in MEAN_AND_MIN_KEYS:
            out[f"{name}_min"] = min(values)
    return out
