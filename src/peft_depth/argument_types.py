"""argparse ``type=`` functions shared by the ``peft-depth`` command line and the example scripts: a bad value fails
at parsing, naming the flag and the allowed values, before any model is loaded."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["non_negative_int", "number_in", "positive_int", "positive_number", "probability", "random_seed"]


def _integer(text: str, allowed: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def random_seed(text: str) -> int:
    value = _integer(text, "an integer in [0, 2**63)")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def number_in(
    low: float, high: float, *, low_included: bool = False, high_included: bool = True
) -> Callable[[str], float]:
    """A number in the interval from ``low`` to ``high`` (each end included or not, as asked)."""
    interval = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high_included else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        low_ok = value >= low if low_included else value > low
        high_ok = value <= high if high_included else value < high
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


def probability(*, allow_zero: bool = False, allow_one: bool = True) -> Callable[[str], float]:
    """A number in (0, 1], or with its ends included or excluded as asked."""
    return number_in(0.0, 1.0, low_included=allow_zero, high_included=allow_one)
