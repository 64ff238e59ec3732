"""The verdict table of issue 14: for each arm's claims (``Arm.claims``), the measured paired difference and a verdict.

Rules (issue 14), per claim, model and task, over the seeds both compared arms ran on the same kind of device:

- a **"better"** claim is *reproduced* when the 95% interval of the mean paired difference excludes 0 upwards,
  *contradicted* when it excludes 0 downwards, and *not detectable at this scale* otherwise (the smallest effect the
  design finds 80% of the time is given);
- a **"non_inferior"** (≈) claim is *reproduced* when the interval's lower end is above −``NON_INFERIORITY_MARGIN``,
  *contradicted* when its upper end is below −margin, and *not detectable* otherwise; with ``fewer_flops`` it also
  needs fewer inference FLOPs per token than the compared arm (``inference_cost``: DLO's router saves compute when
  the trained model runs; its training runs every token's MLP by design), else it is contradicted on cost.

Before any of that, a comparison where neither arm's mean accuracy clears always giving the test set's most frequent
label (``data.majority_rate``, m) by more than that test set's sampling noise - 1.96 binomial standard errors,
1.96·√(m(1−m)/n) for n test rows - has *no signal*: e.g. a classifier answering one class everywhere "beats" one
below chance by the class imbalance (MiniLM on RTE). A row with fewer seeds than its suite runs is *provisional*; an indicative suite
(one seed) gives no verdict. Every number comes from the ledgers, so the table is regenerated, never edited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arms import Arm, Claim, arms_for
from .data import majority_rate
from .inference_cost import inference_ledger_path, with_inference_flops
from .ledger import read_records
from .models import resolve_model
from .report import latest_test_results, runs_of_the_current_recipe, summarise
from .stats import PairedSummary, clears_majority

__all__ = [
    "NO_SIGNAL",
    "NON_INFERIORITY_MARGIN",
    "Verdict",
    "judge",
    "suite_verdicts",
    "render_verdicts",
    "write_verdicts",
]

#: How much worse (accuracy, absolute) an arm may be and still count as "≈" its comparison: 2 percentage points.
NON_INFERIORITY_MARGIN = 0.02
REPRODUCED, CONTRADICTED, NOT_DETECTABLE, PENDING, NO_SIGNAL = (
    "reproduced",
    "contradicted",
    "not detectable at this scale",
    "pending",
    "no signal (neither arm clears the majority class beyond test noise)",
)


@dataclass(frozen=True)
class Verdict:
    """One claim on one (suite, task): what was compared, the paired difference and the verdict."""

    suite: str
    task: str
    arm: str
    label: str
    claim: str
    compared_with: str | None
    kind: str
    summary: PairedSummary | None
    seeds: int
    planned_seeds: int
    flops_ratio: float | None
    verdict: str
    #: Seeds the FLOPs ratio's numerator and denominator were measured on (runs older than the field: kept adapters).
    flops_seeds: tuple[int, int] | None = None
    #: Mean accuracies of the arm and of what it is compared with, and the test set's majority-class rate.
    accuracies: tuple[float, float | None] = (0.0, None)
    majority: float | None = None

    @property
    def provisional(self) -> bool:
        return self.verdict != PENDING and self.seeds < self.planned_seeds


def judge(
    claim: Claim, summary: PairedSummary | None, flops_ratio: float | None = None, no_signal: bool = False
) -> str:
    """The verdict of ``claim`` given the paired difference (arm − compared arm) and the FLOPs ratio (arm / it);
    ``no_signal``: neither arm beats the majority class."""
    if summary is None or len(summary.differences) < 2:
        return PENDING
    if no_signal:
        return NO_SIGNAL
    if claim.kind == "better":
        found = REPRODUCED if summary.low > 0 else CONTRADICTED if summary.high < 0 else NOT_DETECTABLE
    else:
        margin = NON_INFERIORITY_MARGIN
        found = REPRODUCED if summary.low > -margin else CONTRADICTED if summary.high < -margin else NOT_DETECTABLE
    if claim.fewer_flops and found == REPRODUCED:
        if flops_ratio is None:
            return f"{PENDING} (inference FLOPs not measured: `quality.py inference-flops`)"
        if flops_ratio >= 1.0:
            return f"{CONTRADICTED} (not fewer FLOPs)"
    return found


def _arms_by_name(model: str) -> dict[str, Arm]:
    return {arm.name: arm for arm in arms_for(resolve_model(model))}


def _label_of(arm_name: str | None, by_arm: dict[str, dict], arms: dict[str, Arm]) -> str | None:
    """The display label of the compared arm, also before it has test runs (a pending row names it, not its key)."""
    if arm_name in by_arm:
        return by_arm[arm_name]["label"]
    return arms[arm_name].label if arm_name in arms else arm_name


def suite_verdicts(
    suite: str,
    records: list[dict[str, Any]],
    planned_seeds: int,
    arms: dict[str, Arm] | None = None,
    majority: dict[str, float] | None = None,
    scorer: str | None = None,
) -> list[Verdict]:
    """Every claim of every arm that has test results in ``records`` (one suite's ledger); ``majority``: task ->
    majority-class rate of its test split (tasks left out are not checked against it); ``scorer``: only test records
    of that scorer (a ledger can hold both scorers' records of a run, and they differ for batch-voting MoLEx)."""
    tests = [r for r in records if r["split"] == "test" and (scorer is None or r.get("scorer") == scorer)]
    if not tests:
        return []
    arms = arms if arms is not None else _arms_by_name(tests[0]["model"])
    found: list[Verdict] = []
    results = latest_test_results(tests)
    for task, rows in summarise(results).items():
        by_arm = {row["arm"]: row for row in rows}
        for row in rows:
            arm = arms.get(row["arm"])
            for claim in arm.claims if arm else ():
                other = row["partner"] if claim.against == "partner" else arm.claim_reference
                summary = row["vs_partner"] if claim.against == "partner" else row["vs_claim"]
                ratio = flops_seeds = None
                if (
                    claim.fewer_flops
                    and other in by_arm
                    and row["inference_flops"]
                    and by_arm[other]["inference_flops"]
                ):
                    ratio = row["inference_flops"] / by_arm[other]["inference_flops"]
                    flops_seeds = (row["inference_flops_seeds"], by_arm[other]["inference_flops_seeds"])
                other_accuracy = by_arm[other]["accuracy"] if other in by_arm else None
                floor = (majority or {}).get(task)
                no_signal = floor is not None and not any(
                    clears_majority(accuracy, floor, row["test_rows"])
                    for accuracy in (row["accuracy"], other_accuracy)
                    if accuracy is not None
                )
                found.append(
                    Verdict(
                        suite=suite,
                        task=task,
                        arm=row["arm"],
                        label=row["label"] + (" †" if row["batch_dependent"] else ""),
                        claim=arm.claim,
                        compared_with=_label_of(other, by_arm, arms),
                        kind=claim.kind,
                        summary=summary,
                        seeds=0 if summary is None else len(summary.differences),
                        planned_seeds=planned_seeds,
                        flops_ratio=ratio,
                        flops_seeds=flops_seeds,
                        verdict=judge(claim, summary, ratio, no_signal),
                        accuracies=(row["accuracy"], other_accuracy),
                        majority=floor,
                    )
                )
    return found


def _pp(value: float) -> str:
    return f"{100 * value:+.1f}"


def render_verdicts(verdicts: list[Verdict]) -> str:
    lines = [
        "# Verdicts on the papers' claims (generated)",
        "",
        "Regenerated from the sweep ledgers by `python benchmarks/quality.py verdicts`; the rules are in "
        "`benchmarks/quality/verdicts.py`. Δ = arm − compared arm on the same seed, in percentage points, with its "
        "95% paired t interval over seeds; detectable = the smallest true Δ the design finds 80% of the time. "
        f"≈ claims allow {100 * NON_INFERIORITY_MARGIN:.0f} pp. *Provisional*: fewer seeds than the suite plans. "
        "†: scored in batches by a method that votes over the batch (MoLEx `batch_vote`; see the suite's report).",
        "",
        "Accuracies: the arm's and the compared arm's means, and (in brackets) always answering the test set's most "
        "frequent label.",
        "",
        "| suite | task | arm | claim | compared with | accuracies | Δ, pp [95% interval] | detectable, pp | seeds | "
        "verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(verdicts, key=lambda v: (v.suite, v.arm, v.task)):
        if v.summary is None:
            difference, detectable = "–", "–"
        else:
            s = v.summary
            if len(s.differences) < 2:  # one seed: no interval, nothing detectable
                difference, detectable = f"{_pp(s.mean)} (1 seed: no interval)", "–"
            else:
                difference = f"{_pp(s.mean)} [{_pp(s.low)}, {_pp(s.high)}]"
                detectable = f"{100 * s.detectable:.1f}"
        if v.flops_ratio is not None:
            difference += f"; inference FLOPs / token ×{v.flops_ratio:.3f}"
            if v.flops_seeds is not None and min(v.flops_seeds) < v.seeds:
                arm_seeds, other_seeds = v.flops_seeds
                difference += f" (measured on {arm_seeds} and {other_seeds} seed{'s' if other_seeds > 1 else ''})"
        verdict = f"**{v.verdict}**" + (" (provisional)" if v.provisional else "")
        arm_accuracy, other_accuracy = v.accuracies
        accuracies = f"{arm_accuracy:.3f} vs " + ("–" if other_accuracy is None else f"{other_accuracy:.3f}")
        if v.majority is not None:
            accuracies += f" ({v.majority:.3f})"
        lines.append(
            f"| {v.suite} | {v.task} | {v.label} | {v.claim} | {v.compared_with or '–'} | {accuracies} | "
            f"{difference} | {detectable} | {v.seeds} of {v.planned_seeds} | {verdict} |"
        )
    if not verdicts:
        lines.append("| – | – | – | no finished test runs yet | – | – | – | – | – | – |")
    return "\n".join(lines) + "\n"


def write_verdicts(
    results_dir: str | Path, suites: dict[str, Any], run_keys_of: Callable[[Any, list], set[str]] | None = None
) -> Path:
    """Verdicts of every non-indicative suite in ``suites`` (name -> Suite) whose ledger exists, as markdown.
    ``run_keys_of(suite, records)``: the training runs the suite asks for now; only their records are judged."""
    from .sweep import ledger_path

    verdicts: list[Verdict] = []
    for name, suite in suites.items():
        path = ledger_path(name, Path(results_dir))
        if suite.indicative or not path.is_file():
            continue
        records = read_records(path)
        if run_keys_of is not None:
            records, _ = runs_of_the_current_recipe(records, run_keys_of(suite, records))
        records = with_inference_flops(records, read_records(inference_ledger_path(name, Path(results_dir))))
        majority = {task: majority_rate(task) for task in {r["task"] for r in records}}
        verdicts += suite_verdicts(name, records, len(suite.seeds), majority=majority, scorer=suite.test_scorer)
    output = Path(results_dir) / "verdicts.md"
    output.write_text(render_verdicts(verdicts))
    return output
