"""Paired comparison of two models scored on the same held-out rows: the accuracy difference with a bootstrap
interval over rows (the rows are resampled together, so what both get right or wrong cancels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PairedDifference", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """``difference`` = accuracy(a) − accuracy(b) on the same rows; ``[low, high]`` its percentile interval."""

    difference: float
    low: float
    high: float
    confidence: float
    num_rows: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        verdict = "excludes 0" if self.excludes_zero else "includes 0"
        return (
            f"{100 * self.difference:+.1f} pp [{100 * self.low:+.1f}, {100 * self.high:+.1f}] "
            f"({100 * self.confidence:g}% bootstrap over {self.num_rows} rows, {verdict})"
        )


def paired_bootstrap(
    correct_a: list[bool] | torch.Tensor,
    correct_b: list[bool] | torch.Tensor,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Accuracy difference of ``a`` over ``b`` with a paired percentile bootstrap over rows (batched, no loop)."""
    a = torch.as_tensor(correct_a, dtype=torch.float64)
    b = torch.as_tensor(correct_b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError(
            f"paired_bootstrap needs two equally long, non-empty 1-D lists; got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    delta = a - b
    generator = torch.Generator().manual_seed(seed)
    # Chunks keep the index tensor small (10k resamples × 2k rows would be 160 MB at once).
    means = []
    for start in range(0, resamples, 1000):
        count = min(1000, resamples - start)
        index = torch.randint(0, delta.numel(), (count, delta.numel()), generator=generator)
        means.append(delta[index].mean(dim=1))
    distribution = torch.cat(means)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(distribution, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(float(delta.mean()), low, high, confidence, delta.numel())
