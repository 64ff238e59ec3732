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
