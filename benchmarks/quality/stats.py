"""Statistics of a comparison: mean ± std over seeds, paired bootstrap interval, and the smallest detectable effect.

Paired differences are taken per seed: d_s = accuracy(arm, seed s) − accuracy(reference, seed s); the same seed means
the same data order and the same test set, so the pairing removes what the two runs share.

Bootstrap: the mean of d resampled over seeds with replacement. With at most ``EXACT_LIMIT`` resamples (n^n; n ≤ 6
seeds) every resample is enumerated, so the interval and SE are exact properties of the observed d; above that,
``DRAWS`` resamples with a fixed generator. The 95% interval is the percentile interval: lower = the smallest
bootstrap mean whose cumulative probability reaches 2.5%, upper = the smallest whose cumulative probability reaches
97.5%. With 3 seeds that is [min d, max d] (each extreme has probability 1/27 > 2.5%).

Smallest detectable effect (two-sided α = 0.05, power 0.80): MDE = (z_0.975 + z_0.80) · SE = 2.80 · SE, where SE is
the standard deviation of the bootstrap distribution of the mean difference (= population std of d / √n when
enumerated exactly). The interval covers seed-to-seed variation only; the test set is fixed, so its sampling noise
(about √(p(1−p)/n_test) per accuracy, less for a paired difference) is not in it.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["PairedSummary", "bootstrap_means", "paired_summary", "mean_std", "MDE_FACTOR", "percentile"]

ALPHA = 0.05
POWER = 0.80
#: z_{1−α/2} + z_{power} = 1.960 + 0.842
MDE_FACTOR = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)
EXACT_LIMIT = 100_000
DRAWS = 20_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedSummary:
    differences: list[float]
    mean: float
    low: float
    high: float
    se: float

    @property
    def detectable(self) -> float:
        return MDE_FACTOR * self.se

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bootstrap_means(values: list[float]) -> list[tuple[float, float]]:
    """The bootstrap distribution of the mean as (value, probability) pairs: exact when small, else sampled."""
    n = len(values)
    if n == 0:
        raise ValueError("No values to bootstrap.")
    if n**n <= EXACT_LIMIT:
        weight = 1.0 / n**n
        return [(math.fsum(values[i] for i in pick) / n, weight) for pick in itertools.product(range(n), repeat=n)]
    rng = random.Random(BOOTSTRAP_SEED)
    return [(math.fsum(rng.choices(values, k=n)) / n, 1.0 / DRAWS) for _ in range(DRAWS)]


def percentile(distribution: list[tuple[float, float]], q: float) -> float:
    """Smallest value whose cumulative probability reaches ``q`` (with a little slack for float sums)."""
    cumulative = 0.0
    for value, weight in sorted(distribution):
        cumulative += weight
        if cumulative >= q - 1e-12:
            return value
    return max(value for value, _ in distribution)


def paired_summary(arm: list[float], reference: list[float]) -> PairedSummary:
    """Per-seed differences (same order of seeds in both lists), their mean, 95% bootstrap interval and SE."""
    if len(arm) != len(reference) or not arm:
        raise ValueError(
            f"Paired differences need the same non-zero number of seeds, got {len(arm)} and {len(reference)}."
        )
    differences = [a - r for a, r in zip(arm, reference)]
    distribution = bootstrap_means(differences)
    mean = math.fsum(v * w for v, w in distribution)
    variance = math.fsum(w * (v - mean) ** 2 for v, w in distribution)
    return PairedSummary(
        differences=differences,
        mean=statistics.fmean(differences),
        low=percentile(distribution, ALPHA / 2),
        high=percentile(distribution, 1 - ALPHA / 2),
        se=math.sqrt(max(variance, 0.0)),
    )


#: Binomial z of the majority-class floor: an accuracy must clear the floor by this many standard errors.
FLOOR_Z = 1.96


def clears_majority(accuracy: float, majority: float, rows: int | None) -> bool:
    """Whether ``accuracy`` beats always answering the most frequent label (rate ``majority``) by more than the test
    set's sampling noise: FLOOR_Z binomial standard errors, √(m(1−m)/n) for ``rows`` test rows."""
    noise = FLOOR_Z * math.sqrt(majority * (1.0 - majority) / rows) if rows else 0.0
    return accuracy > majority + noise
