"""`benchmarks/thread_determinism.py` reports a difference between 1 and 2 threads when one is planted.

The script's real check (a SmolLM2-shaped step per arm) takes minutes; its verdict rests on `_check_arm`'s comparison,
so this plants a one-ulp change in a single gradient, or in the scoring output, and checks that it is caught and named.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import thread_determinism  # noqa: E402
from quality.arms import Arm  # noqa: E402


def _fake_step(planted: str | None):
    def train_step(spec, arm, layers, threads, tokens):
        result = {
            "loss": torch.tensor(2.5),
            "grad lora_A": torch.linspace(-1, 1, 16),
            "grad lora_B": torch.linspace(0, 1, 16),
            "after AdamW lora_A": torch.ones(16),
            "after AdamW lora_B": torch.zeros(16),
        }
        if planted is not None and threads == 2:
            value = result[planted].view(-1)  # a view, so 0-d tensors (the loss) change too
            value[0] = torch.nextafter(value[0], torch.tensor(float("inf")))
        return result

    return train_step


def _fake_score(planted: bool):
    def score(spec, arm, layers, threads, tokens):
        scores = torch.log_softmax(torch.linspace(0, 1, 32).reshape(2, 16), dim=-1)
        if planted and threads == 2:
            scores[1, 3] = torch.nextafter(scores[1, 3], torch.tensor(0.0))
        return scores

    return score


ARM = Arm(name="lora", label="LoRA", method="lora", lr_grid=(1e-3,), budget="baseline")


@pytest.mark.parametrize("planted", ["loss", "grad lora_B", "after AdamW lora_A"])
def test_a_planted_training_difference_fails_the_check_and_is_named(monkeypatch, capsys, planted):
    monkeypatch.setattr(thread_determinism, "_train_step", _fake_step(planted))
    monkeypatch.setattr(thread_determinism, "_score", _fake_score(False))
    assert not thread_determinism._check_arm(None, ARM, 2, None, None)
    out = capsys.readouterr().out
    assert "1 differ" in out
    assert f"differs: {planted} (" in out
    assert "scoring log-softmax: identical" in out


def test_a_planted_scoring_difference_fails_the_check(monkeypatch, capsys):
    monkeypatch.setattr(thread_determinism, "_train_step", _fake_step(None))
    monkeypatch.setattr(thread_determinism, "_score", _fake_score(True))
    assert not thread_determinism._check_arm(None, ARM, 2, None, None)
    assert "0 differ; scoring log-softmax: differs" in capsys.readouterr().out


def test_identical_results_pass_the_check(monkeypatch, capsys):
    monkeypatch.setattr(thread_determinism, "_train_step", _fake_step(None))
    monkeypatch.setattr(thread_determinism, "_score", _fake_score(False))
    assert thread_determinism._check_arm(None, ARM, 2, None, None)
    assert "(loss, 2 gradients, 2 weights after AdamW): 0 differ; scoring log-softmax: identical" in (
        capsys.readouterr().out
    )
