"""The verdict table (issue 14): each claim's rule, and the table generated from ledger records alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality.arms import Arm, Claim  # noqa: E402
from quality.stats import paired_summary  # noqa: E402
from quality.verdicts import (  # noqa: E402
    CONTRADICTED,
    NO_SIGNAL,
    NON_INFERIORITY_MARGIN,
    NOT_DETECTABLE,
    PENDING,
    REPRODUCED,
    judge,
    render_verdicts,
    suite_verdicts,
)


def summary(differences: list[float]):
    return paired_summary(differences, [0.0] * len(differences))


def test_a_better_claim_needs_the_interval_above_zero():
    better = Claim("partner", "better")
    # with 3 seeds the 95% interval is mean ± 4.30 · SE
    assert judge(better, summary([0.020, 0.021, 0.022])) == REPRODUCED
    assert (
        judge(better, summary([0.01, 0.02, 0.03])) == NOT_DETECTABLE
    )  # 3 positive seeds, too spread: [−0.005, 0.045]
    assert judge(better, summary([-0.01, 0.02, 0.03])) == NOT_DETECTABLE
    assert judge(better, summary([-0.020, -0.021, -0.022])) == CONTRADICTED
    assert judge(better, summary([0.05])) == PENDING  # one seed: no interval
    assert judge(better, None) == PENDING


def test_a_non_inferiority_claim_allows_the_margin_and_a_cost_claim_needs_fewer_flops():
    close = Claim("partner", "non_inferior")
    margin = NON_INFERIORITY_MARGIN
    assert judge(close, summary([-margin / 2, -margin / 2 + 0.001, -margin / 2 - 0.001])) == REPRODUCED
    assert judge(close, summary([-2 * margin, 0.0, -margin / 4])) == NOT_DETECTABLE
    assert judge(close, summary([-2 * margin, -2.1 * margin, -2.2 * margin])) == CONTRADICTED
    cheaper = Claim("reference", "non_inferior", fewer_flops=True)
    assert judge(cheaper, summary([0.0, 0.01, -0.005]), flops_ratio=0.8) == REPRODUCED
    assert judge(cheaper, summary([0.0, 0.01, -0.005]), flops_ratio=1.1).startswith(CONTRADICTED)
    assert judge(cheaper, summary([0.0, 0.01, -0.005]), flops_ratio=None).startswith(PENDING)
    with pytest.raises(ValueError, match="kind"):
        Claim("partner", "worse")


def record(
    task: str, arm: str, seed: int, accuracy: float, partner: str, flops: float = 1e12, inference: float = 1e8
) -> dict:
    return {
        "split": "test",
        "scorer": "lm_eval",
        "task": task,
        "arm": arm,
        "arm_label": arm.upper(),
        "method": "lora" if arm == "lora" else "x",
        "seed": seed,
        "lr": 1e-3,
        "accuracy": accuracy,
        "budget_partner": partner,
        "claim_reference": None,
        "trainable_params": 100,
        "train_flops": flops,
        "inference_flops_per_token": inference,
        "train_wall_s": 1.0,
        "model": "tiny",
        "hardware": {"device": "cpu"},
        "split_sizes": {"test": 1000},
    }


def test_the_table_is_built_from_the_ledger_records_alone():
    arms = {
        "lora": Arm("lora", "LoRA", "lora", (1e-3,), "baseline"),
        "m": Arm("m", "M", "x", (1e-3,), "own", "beats LoRA", claims=(Claim("partner", "better"),)),
        "d": Arm(
            "d", "D", "x", (1e-3,), "rank", "≈ R, cheaper", "r", claims=(Claim("reference", "non_inferior", True),)
        ),
        "r": Arm("r", "R", "x", (1e-3,), "rank"),
    }
    records = []
    for seed in range(3):
        records.append(record("t", "lora", seed, 0.70, "lora"))
        records.append(record("t", "m", seed, 0.72 + 0.01 * seed, "lora"))
        # the cost claim is judged on inference FLOPs: d trains at the same cost as r, and runs at half
        records.append(record("t", "r", seed, 0.70, "lora", inference=2e8))
        records.append({**record("t", "d", seed, 0.705, "lora", inference=1e8), "claim_reference": "r"})
    records.append(record("u", "lora", 0, 0.5, "lora"))
    records.append(record("u", "m", 0, 0.6, "lora"))  # one seed on task u: pending
    # task v: d has run, its reference r has not: the pending row names r by its label, not its key
    records += [{**record("v", "d", seed, 0.6, "lora"), "claim_reference": "r"} for seed in range(3)]
    verdicts = {(v.task, v.arm): v for v in suite_verdicts("s", records, planned_seeds=3, arms=arms)}
    assert set(verdicts) == {("t", "m"), ("t", "d"), ("u", "m"), ("v", "d")}
    assert verdicts[("v", "d")].verdict == PENDING and verdicts[("v", "d")].compared_with == "R"
    assert verdicts[("t", "m")].verdict == REPRODUCED and not verdicts[("t", "m")].provisional
    assert verdicts[("t", "m")].summary.mean == pytest.approx(0.03)
    assert verdicts[("t", "d")].verdict == REPRODUCED and verdicts[("t", "d")].flops_ratio == pytest.approx(0.5)
    assert verdicts[("t", "d")].compared_with == "R"
    assert verdicts[("u", "m")].verdict == PENDING
    table = render_verdicts(list(verdicts.values()))
    # Δ = 0.02, 0.03, 0.04: mean 0.03 ± t₀.₉₇₅,₂ 4.303 · 0.01 / √3 = ±0.0248
    assert "| s | t | M | beats LoRA | LORA | 0.730 vs 0.700 | +3.0 [+0.5, +5.5] |" in table
    assert "| +10.0 (1 seed: no interval) | – | 1 of 3 | **pending** |" in table
    assert "inference FLOPs / token ×0.500" in table and "| 3 of 3 | **reproduced** |" in table
    assert "measured on" not in table  # every seed of both arms has the count


def test_a_cost_claim_counts_only_the_seeds_that_were_measured_and_says_so():
    arms = {
        "d": Arm(
            "d", "D", "x", (1e-3,), "rank", "≈ R, cheaper", "r", claims=(Claim("reference", "non_inferior", True),)
        ),
        "r": Arm("r", "R", "x", (1e-3,), "rank"),
    }
    records = []
    for seed in range(3):
        # runs older than the field: only seed 0 was measured (from its kept adapter)
        records.append(record("t", "r", seed, 0.70, "lora", inference=2e8 if seed == 0 else None))
        records.append(
            {**record("t", "d", seed, 0.70, "lora", inference=1.5e8 if seed == 0 else None), "claim_reference": "r"}
        )
    (verdict,) = suite_verdicts("s", records, planned_seeds=3, arms=arms)
    assert verdict.flops_ratio == pytest.approx(0.75) and verdict.flops_seeds == (1, 1)
    assert "(measured on 1 and 1 seed)" in render_verdicts([verdict])
    unmeasured = [{**r, "inference_flops_per_token": None} for r in records]
    (pending,) = suite_verdicts("s", unmeasured, planned_seeds=3, arms=arms)
    assert pending.flops_ratio is None and pending.verdict.startswith(PENDING) and "not measured" in pending.verdict
    assert "no finished test runs" in render_verdicts([])


def test_a_comparison_below_the_majority_class_has_no_signal():
    """MiniLM on RTE: MoLEx answered one class everywhere (0.518, the majority rate) and LoRA sat below chance; the
    interval excluded 0, but "beats LoRA" there means nothing."""
    arms = {"m": Arm("m", "M", "x", (1e-3,), "own", "beats LoRA", claims=(Claim("partner", "better"),))}
    records = []
    for seed, lora in enumerate((0.45, 0.44, 0.46)):
        records.append(record("t", "lora", seed, lora, "lora"))
        records.append(record("t", "m", seed, 0.518, "lora"))
    (verdict,) = suite_verdicts("s", records, 3, arms=arms, majority={"t": 0.518})
    assert verdict.summary.low > 0 and verdict.verdict == NO_SIGNAL
    # 1000 test rows at a 0.50 floor: the binomial noise is 1.96 * 0.0158 = 3.1 pp, so 0.518 is only noise ...
    (noise,) = suite_verdicts("s", records, 3, arms=arms, majority={"t": 0.50})
    assert noise.verdict == NO_SIGNAL
    # ... and 0.518 clears a 0.40 floor (by 11.8 pp, the noise being 3.0 pp)
    (above,) = suite_verdicts("s", records, 3, arms=arms, majority={"t": 0.40})
    assert above.verdict == REPRODUCED
    assert "(0.518)" in render_verdicts([verdict])


def test_the_report_marks_a_comparison_without_signal():
    from quality.report import render_markdown

    records = []
    for seed, lora in enumerate((0.45, 0.44, 0.46)):
        records.append({**record("t", "lora", seed, lora, "lora"), "batch_size": 4, "steps": 2, "max_length": 8})
        records.append({**record("t", "m", seed, 0.518, "lora"), "batch_size": 4, "steps": 2, "max_length": 8})
    for r in records:
        r.update(split_fingerprint="f", versions={}, hardware={"cpu": "c", "torch_threads": 1}, arm_label=r["arm"])
        r["split_sizes"] = {"train": 1, "dev": 1, "test": 1000}
    assert "(no signal: majority class)" in render_markdown(records, "s", majority={"t": 0.518})
    assert "(no signal" not in render_markdown(records, "s", majority={"t": 0.40})
    assert "(no signal" not in render_markdown(records, "s")  # no floor known: nothing claimed


def test_the_verdicts_read_only_the_suite_scorer_records():
    """A ledger can hold a run's test score from both scorers (``run --scorer``); batch-voting MoLEx scores 0.47 with
    one and 0.59 with the other on PIQA, so the verdict must not take whichever was written last."""
    arms = {"m": Arm("m", "M", "x", (1e-3,), "own", "beats LoRA", claims=(Claim("partner", "better"),))}
    records = []
    for seed in range(3):
        records.append(record("t", "lora", seed, 0.70, "lora"))
        records.append(record("t", "m", seed, 0.75 + 0.001 * seed, "lora"))  # lm_eval: clearly better
        records.append({**record("t", "m", seed, 0.60, "lora"), "scorer": "peft_depth"})  # written last
    (verdict,) = suite_verdicts("s", records, 3, arms=arms, scorer="lm_eval")
    assert verdict.verdict == REPRODUCED and verdict.summary.mean == pytest.approx(0.051)
