"""The one exception type the analysis tools raise for problems the user can fix (a bad path, a missing tokenizer)."""

from __future__ import annotations

__all__ = ["AnalysisError"]


class AnalysisError(Exception):
    """A user-facing problem; the CLI prints its message on one line and exits non-zero, without a traceback."""
