"""Inference is thread-safe: two forwards on one model, forced to interleave, each see only their own state.

Each case runs two distinct batches of one shape on two threads in lockstep over the decoder blocks
(``concurrency.run_lockstep``) and compares logits and ``routing_stats`` with each batch run alone, exactly.
"""

from __future__ import annotations

import pytest
import torch
from concurrency import assert_concurrent_equals_serial
from test_invariants import ALL, adapted
from tiny_models import batch


def _two_batches() -> list[dict[str, torch.Tensor]]:
    return [batch(batch_size=2, seq_len=7, seed=1, left_pad=2), batch(batch_size=2, seq_len=7, seed=2, left_pad=0)]


@pytest.mark.parametrize("case", ALL)
def test_concurrent_forwards_equal_serial(case):
    torch.manual_seed(0)
    model = adapted(case, "llama")
    assert_concurrent_equals_serial(model, _two_batches())


@pytest.mark.parametrize("case", ["mola", "molex_token", "mod_sequence", "dlo_mlp"])
def test_concurrent_forwards_equal_serial_gpt2(case):
    model = adapted(case, "gpt2")
    assert_concurrent_equals_serial(model, _two_batches())


def test_lockstep_harness_catches_shared_state():
    """The harness itself: a module that keeps the batch on itself for a later layer fails it, every time."""
    model = adapted("mola", "llama")
    blocks = model.base_model.model.model.layers
    shared = {}

    def remember(module, args, kwargs):
        shared["hidden"] = args[0] if args else kwargs["hidden_states"]

    def replay(module, args, output):
        return (
            (output[0] + shared["hidden"].mean(),) + tuple(output[1:])
            if isinstance(output, tuple)
            else output + shared["hidden"].mean()
        )

    handles = [
        blocks[0].register_forward_pre_hook(remember, with_kwargs=True),
        blocks[2].register_forward_hook(replay),
    ]
    try:
        with pytest.raises(AssertionError):
            assert_concurrent_equals_serial(model, _two_batches())
    finally:
        for handle in handles:
            handle.remove()
