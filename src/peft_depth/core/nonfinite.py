"""What routing does with NaN or infinite scores, without a device sync per layer.

Adapter weights are checked finite at load, but a request can still drive a router to NaN (an overflowing activation
in half precision, a poisoned input embedding). ``argmax`` / ``topk`` of NaN scores silently pick an index (MoLEx sent
every layer to layer 0; DLO skipped every MLP), and a batch statistic with one NaN row moves every row. The policy
(``DepthPeftConfig.nonfinite_routing``):

- ``"base_path"`` (default): the row is found with ``nonfinite_rows`` (a device tensor, no sync), takes the method's
  base path through ``torch.where``, is left out of batch statistics and votes, and is counted in ``routing_stats``
  under ``nonfinite_rows`` (read only when the stats are read).
- ``"raise"``: ``check_routing_scores`` raises ``NonFiniteRoutingError`` naming the layer (one sync per call).
"""

from __future__ import annotations

import torch

__all__ = ["NonFiniteRoutingError", "nonfinite_rows", "check_routing_scores"]


class NonFiniteRoutingError(FloatingPointError):
    """Routing scores of a layer were NaN or infinite under ``nonfinite_routing="raise"``."""


def nonfinite_rows(scores: torch.Tensor) -> torch.Tensor:
    """Boolean mask over every dimension but the last: True where any score of that row is NaN or infinite."""
    return ~torch.isfinite(scores).all(dim=-1)


def check_routing_scores(scores: torch.Tensor, policy: str, where: str) -> torch.Tensor:
    """The non-finite-row mask of ``scores``; under policy ``"raise"``, raise if there is any such row."""
    bad = nonfinite_rows(scores.detach())
    if policy == "raise" and bool(bad.any()):
        raise NonFiniteRoutingError(
            f"{where}: routing scores of {int(bad.sum())} row(s) are NaN or infinite (nonfinite_routing='raise'). "
            "With nonfinite_routing='base_path' those rows take the base path and are counted in "
            "peft_depth.routing_stats under 'nonfinite_rows'."
        )
    return bad
