"""``paired_bootstrap``: the accuracy difference of two models on the same rows, with its interval."""

from __future__ import annotations

import pytest

from peft_depth.analysis import paired_bootstrap


def test_identical_models_give_a_zero_width_interval_at_zero():
    same = [True, False, True, True] * 25
    result = paired_bootstrap(same, same)
    assert (result.difference, result.low, result.high) == (0.0, 0.0, 0.0) and not result.excludes_zero


def test_a_clear_gain_excludes_zero_and_the_interval_matches_the_normal_approximation():
    # a right on 60 rows b gets wrong, the reverse on 20, 320 rows alike: Δ = 40/400 = 0.10; the per-row
    # difference has variance (80/400) − 0.1² = 0.19, so SE = √(0.19/400) = 0.0218 and ±1.96·SE ≈ ±0.0427.
    a = [True] * 60 + [False] * 20 + [True] * 200 + [False] * 120
    b = [False] * 60 + [True] * 20 + [True] * 200 + [False] * 120
    result = paired_bootstrap(a, b, resamples=20_000)
    assert result.difference == pytest.approx(0.10)
    assert result.low == pytest.approx(0.10 - 0.0427, abs=0.006) and result.high == pytest.approx(
        0.10 + 0.0427, abs=0.006
    )
    assert result.excludes_zero and "excludes 0" in str(result)
    assert paired_bootstrap(b, a, resamples=20_000).high < 0


def test_it_is_reproducible_and_refuses_mismatched_rows():
    a, b = [True, False] * 30, [False, False] * 30
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([True], [True, False])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(a, b, confidence=1.5)


def test_few_differing_rows_are_not_called_significant():
    """4 of 300 rows going one way: the percentile bootstrap's interval excludes 0, but an exact test on those 4 rows
    gives p = 2 · (1/2)^4 = 0.125. The verdict follows the exact test."""
    a = [True] * 4 + [True] * 150 + [False] * 146
    b = [False] * 4 + [True] * 150 + [False] * 146
    result = paired_bootstrap(a, b)
    assert result.low > 0  # the bootstrap alone would call it
    assert result.num_discordant == 4 and result.mcnemar_p == pytest.approx(0.125)
    assert not result.excludes_zero and "only 4 rows differ, exact McNemar p = 0.125" in str(result)
    # with 12 rows one way the exact test agrees: p = 2 / 4096
    a, b = [True] * 12 + [False] * 288, [False] * 300
    assert paired_bootstrap(a, b).mcnemar_p == pytest.approx(2 / 4096) and paired_bootstrap(a, b).excludes_zero


def test_the_exact_mcnemar_p_matches_a_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    from peft_depth.analysis.paired import exact_mcnemar_p

    for only_a, only_b in [(0, 0), (3, 0), (7, 2), (40, 25), (600, 540)]:
        expected = 1.0 if only_a + only_b == 0 else scipy_stats.binomtest(only_a, only_a + only_b).pvalue
        assert exact_mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_one_row_and_non_boolean_rows_are_refused():
    with pytest.raises(ValueError, match="at least 2 rows"):
        paired_bootstrap([True], [False])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        paired_bootstrap([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap([True, False], [False, False], resamples=0)
