"""Statistics of a comparison: mean ± std over seeds, a paired t interval, and the smallest detectable effect.

Paired differences are taken per seed: d_s = accuracy(arm, seed s) − accuracy(reference, seed s); the same seed means
the same data order and the same test set, so the pairing removes what the two runs share.

95% interval: mean(d) ± t_{0.975, n−1} · SE, SE = s_d / √n with s_d the sample standard deviation (n − 1). With the
3-5 seeds a sweep affords, this is the interval whose coverage holds: the percentile bootstrap over seeds used before
is [min d, max d] with 3 seeds, which excludes 0 whenever all three differences share a sign - a quarter of the
time when there is no effect at all (2 in 8 by construction; simulations of pure noise gave 24.5% with 3 seeds and
17.5-20.5% with 5, against the 5% a 95% interval promises). One seed gives no interval (infinite: nothing is ever
detected from one run).

Smallest detectable effect (two-sided α = 0.05, power 0.80): (t_{0.975, n−1} + t_{0.80, n−1}) · SE, the t-test's
counterpart of the normal (z_{0.975} + z_{0.80}) · SE (= 2.80 · SE, which it approaches with many seeds: 5.36 · SE
with 3 seeds, 3.72 · SE with 5). It is the usual approximation: the exact noncentral t gives power 0.77 (3 seeds)
and 0.79 (5) at that effect. The interval covers seed-to-seed variation only; the test set is fixed, so its sampling noise (about
√(p(1−p)/n_test) per accuracy, less for a paired difference) is not in it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["PairedSummary", "paired_summary", "mean_std", "t_quantile", "detectable_factor"]

ALPHA = 0.05
POWER = 0.80


def t_quantile(q: float, seeds: int) -> float:
    """The ``q`` quantile of Student's t with ``seeds − 1`` degrees of freedom (infinite for one seed)."""
    return math.inf if seeds < 2 else float(student_t.ppf(q, seeds - 1))


def detectable_factor(seeds: int) -> float:
    """(t_{1−α/2} + t_{power}) with ``seeds − 1`` degrees of freedom: detectable effect = factor · SE."""
    return t_quantile(1 - ALPHA / 2, seeds) + t_quantile(POWER, seeds)


@dataclass(frozen=True)
class PairedSummary:
    differences: list[float]
    mean: float
    low: float
    high: float
    se: float

    @property
    def detectable(self) -> float:
        if len(self.differences) < 2:
            return math.inf  # one seed detects nothing
        return detectable_factor(len(self.differences)) * self.se

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_summary(arm: list[float], reference: list[float]) -> PairedSummary:
    """Per-seed differences (same order of seeds in both lists), their mean, 95% t interval and SE."""
    if len(arm) != len(reference) or not arm:
        raise ValueError(
            f"Paired differences need the same non-zero number of seeds, got {len(arm)} and {len(reference)}."
        )
    differences = [a - r for a, r in zip(arm, reference)]
    mean, std = mean_std(differences)
    se = std / math.sqrt(len(differences))
    half_width = t_quantile(1 - ALPHA / 2, len(differences)) * se if len(differences) > 1 else math.inf
    return PairedSummary(differences=differences, mean=mean, low=mean - half_width, high=mean + half_width, se=se)


#: Binomial z of the majority-class floor: an accuracy must clear the floor by this many standard errors.
FLOOR_Z = 1.96


def clears_majority(accuracy: float, majority: float, rows: int | None) -> bool:
    """Whether ``accuracy`` beats always answering the most frequent label (rate ``majority``) by more than the test
    set's sampling noise: FLOOR_Z binomial standard errors, √(m(1−m)/n) for ``rows`` test rows."""
    noise = FLOOR_Z * math.sqrt(majority * (1.0 - majority) / rows) if rows else 0.0
    return accuracy > majority + noise
