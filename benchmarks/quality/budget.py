"""Trainable-parameter budgets: counting them, and choosing ranks so that compared arms match within a tolerance.

Counts are exact: each config is applied with ``get_peft_model`` to the model's architecture on the meta device (no
weights are allocated), and the parameters that require grad are summed (new classifier heads included).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from peft import get_peft_model

from .arms import BASELINE, Arm, arms_for, build_config, lora_arm
from .models import ModelSpec, meta_model

__all__ = [
    "BudgetRow",
    "trainable_parameters",
    "closest_rank",
    "plan_budgets",
    "task_arms",
    "format_budget_table",
    "TOLERANCE",
]

#: Largest accepted relative difference between an arm's trainable parameters and its LoRA partner's.
TOLERANCE = 0.10
#: Ranks searched when matching a budget.
MAX_RANK = 512


@dataclass(frozen=True)
class BudgetRow:
    """One pairing: an arm, its trainable parameters, the LoRA arm it is compared with, and their ratio."""

    arm: str
    label: str
    params: int
    partner: str
    partner_params: int
    matched: bool

    @property
    def ratio(self) -> float:
        return self.params / self.partner_params


def trainable_parameters(arm: Arm, spec: ModelSpec, task: str | None = None) -> int:
    model = get_peft_model(meta_model(spec), build_config(arm, spec, task))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def closest_rank(count: Callable[[int], int], target: int, low: int = 1, high: int = MAX_RANK) -> int:
    """The rank whose (increasing) parameter count is closest to ``target``; ties go to the smaller rank."""
    if count(low) >= target:
        return low
    while low + 1 < high:  # invariant: count(low) < target, and the answer is low or above
        middle = (low + high) // 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return low if target - count(low) <= count(high) - target else high


def plan_budgets(arms: list[Arm], spec: ModelSpec, task: str | None = None) -> tuple[list[Arm], list[BudgetRow]]:
    """Fix every rank and partner: returns the arms to run (LoRA partners added) and the pairing table.

    ``"rank"`` arms get the rank whose count is closest to the baseline LoRA's. Every other non-LoRA arm is paired
    with an existing LoRA arm whose count is within ``TOLERANCE`` of its own (the closest one), else with a new LoRA
    arm at the closest rank. ``"unmatched"`` arms are paired with the baseline on purpose.
    """
    counts: dict[str, int] = {}

    def count_arm(arm: Arm) -> int:
        key = f"{arm.name}@{arm.rank}"
        if key not in counts:
            counts[key] = trainable_parameters(arm, spec, task)
        return counts[key]

    baseline = next((a for a in arms if a.name == BASELINE), lora_arm(spec.family))
    baseline_params = count_arm(baseline)
    resolved: list[Arm] = []
    for arm in arms:
        if arm.budget == "rank":
            arm = arm.with_rank(closest_rank(lambda r, a=arm: count_arm(a.with_rank(r)), baseline_params))
        resolved.append(arm)

    loras: dict[str, Arm] = {baseline.name: baseline}
    rows: list[BudgetRow] = []
    for arm in resolved:
        if arm.method == "lora":
            continue
        params = count_arm(arm)
        partner = baseline
        if arm.budget != "unmatched":
            within = [lo for lo in loras.values() if abs(params / count_arm(lo) - 1) <= TOLERANCE]
            if within:
                partner = min(within, key=lambda lo: abs(params / count_arm(lo) - 1))
            else:
                rank = closest_rank(lambda r: count_arm(lora_arm(spec.family, r)), params)
                partner = lora_arm(spec.family, rank)
                loras[partner.name] = partner
        partner_params = count_arm(partner)
        matched = arm.budget != "unmatched" and abs(params / partner_params - 1) <= TOLERANCE
        rows.append(BudgetRow(arm.name, arm.label, params, partner.name, partner_params, matched))
    for lora in sorted(loras.values(), key=lambda lo: lo.rank, reverse=True):  # LoRA rows first, smallest rank on top
        rows.insert(0, BudgetRow(lora.name, lora.label, count_arm(lora), lora.name, count_arm(lora), True))
    extra = [lo for lo in loras.values() if lo.name not in {a.name for a in resolved}]
    return extra + resolved, rows


_PLANS: dict[tuple[str, str], tuple[list[Arm], list[BudgetRow]]] = {}


def task_arms(
    spec: ModelSpec, task: str | None, only: tuple[str, ...] | None = None
) -> tuple[list[Arm], list[BudgetRow]]:
    """The arms run on ``task`` with ranks and LoRA partners fixed for it (a method's per-task preset can change its
    parameter count, e.g. MoLEx's cosine gate on SST-2), limited to ``only`` and their partners when given.
    Without ``only``, diagnostic arms (``Arm.diagnostic``) and the partners only they need are left out.

    Tasks whose arm configs are identical share one budget plan (counted once per process).
    """
    configs = json.dumps(
        [build_config(arm, spec, task).to_dict() for arm in arms_for(spec)], sort_keys=True, default=str
    )
    key = (spec.path, configs)
    if key not in _PLANS:
        _PLANS[key] = plan_budgets(arms_for(spec), spec, task)
    arms, rows = _PLANS[key]
    if not only:
        diagnostic = {a.name for a in arms if a.diagnostic}
        needed = {r.partner for r in rows if r.arm not in diagnostic} | {BASELINE}
        keep = {a.name for a in arms if not a.diagnostic and (a.method != "lora" or a.name in needed)}
        return [a for a in arms if a.name in keep], [r for r in rows if r.arm in keep]
    if only:
        unknown = sorted(set(only) - {a.name for a in arms})
        if unknown:
            raise ValueError(f"No arm(s) {unknown} on {task!r}; arms: {', '.join(a.name for a in arms)}.")
        keep = set(only) | {row.partner for row in rows if row.arm in only}
        arms = [a for a in arms if a.name in keep]
        rows = [r for r in rows if r.arm in keep]
    return list(arms), list(rows)


def format_budget_table(rows: list[BudgetRow], arms: list[Arm]) -> str:
    """Markdown table of the pairings (ranks included), as printed by ``quality.py budgets`` and in reports."""
    by_name = {arm.name: arm for arm in arms}
    lines = [
        "| arm | rank | trainable params | compared with | its params | ratio | budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        arm = by_name.get(row.arm)
        lora_free = arm is not None and arm.method == "mod" and not arm.options.get("lora")
        rank = "–" if arm is None or lora_free else arm.rank
        status = "matched" if row.matched else f"unmatched by design ({arm.claim})" if arm else "unmatched"
        if row.arm == row.partner:
            status = "baseline" if row.arm == BASELINE else "LoRA partner"
        lines.append(
            f"| {row.label} | {rank} | {row.params:,} | {row.partner} | {row.partner_params:,} | {row.ratio:.3f} | "
            f"{status} |"
        )
    return "\n".join(lines)
