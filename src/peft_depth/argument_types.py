"""argparse ``type=`` functions shared by the ``peft-depth`` command line and the example scripts: a bad value fails
at parsing, naming the flag and the allowed values, before any model is loaded."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["non_negative_int", "positive_int", "positive_number", "probability", "random_seed"]


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


def probability(*, allow_zero: bool = False, allow_one: bool = True) -> Callable[[str], float]:
    """A number in (0, 1], or with its ends included or excluded as asked."""
    interval = f"{'[' if allow_zero else '('}0, 1{']' if allow_one else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        low_ok = value >= 0 if allow_zero else value > 0
        high_ok = value <= 1 if allow_one else value < 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse
