"""MoD under concurrent inference: what tests/test_concurrency.py does not cover for MoD.

Two threads run one model in lockstep over the decoder blocks (``concurrency.run_lockstep``), so state a forward
kept on the tuner (captured block outputs, the call's labels, the pending log-prob mix, the sequence router's state
for a cache created in the forward) would be overwritten by the other thread before it is read.
"""

from __future__ import annotations

import pytest
import torch
from concurrency import assert_concurrent_equals_serial, decoder_blocks, run_lockstep
from test_mod_nonfinite import _nontrivial
from tiny_models import batch

import peft_depth


def _two_batches():
    return [batch(batch_size=2, seq_len=7, seed=1, left_pad=2), batch(batch_size=2, seq_len=7, seed=2, left_pad=0)]


@pytest.mark.parametrize("granularity", ["token", "sequence", "static"])
def test_log_prob_mixing_is_per_forward(granularity):
    model = _nontrivial(router_granularity=granularity, mix_space="log_probs")
    assert_concurrent_equals_serial(model, _two_batches())


def test_distillation_loss_is_the_calling_threads_own():
    """Labels reach the final-norm hook through the forward's own state, and aux_losses reads this thread's loss."""
    model = _nontrivial()

    def call(m, b):
        labels = b["input_ids"].clone()
        labels[:, :3] = -100
        out = m(**b, labels=labels)
        return out.logits, peft_depth.aux_losses(m)["distill"]

    batches = _two_batches()
    batches[1]["input_ids"][:, 3:] = 5  # a very different completion: a very different loss
    assert_concurrent_equals_serial(model, batches, call=call)


def test_generation_with_the_sequence_router_is_per_thread():
    """Each generation's running mean rides on its own KV cache (made inside its first forward) across steps."""
    model = _nontrivial(router_granularity="sequence")
    batches = _two_batches()
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)

    def call(m, b):
        return m.generate(**b, **generate)

    serial = [call(model, b) for b in batches]
    concurrent, _ = run_lockstep(model, batches, decoder_blocks(model), call=call)
    for alone, together in zip(serial, concurrent):
        assert torch.equal(alone, together)
