"""DLO keeps what a forward decides and records with that forward: another thread's forward never shows through.

The lockstep two-thread test (``test_concurrency.py``) covers interleaved inference; these cover the readers (the
router loss and the statistics a thread reads are those of its own last forward, also in training) and a backward
that runs on another thread than its forward, as CUDA's autograd does.
"""

from __future__ import annotations

import threading

import torch
from peft import get_peft_model
from tiny_models import batch, tiny_llama

import peft_depth
from peft_depth.core import raw_aux_losses
from peft_depth.tuners.dlo import DLOConfig


def _dlo_model(**kwargs):
    model = get_peft_model(
        tiny_llama(num_layers=4), DLOConfig(task_type="CAUSAL_LM", expand_every=2, capacity=0.5, **kwargs)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in model.base_model.dlo_routers["default"].values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    return model


def _in_thread(function):
    result = {}

    def work():
        try:
            result["value"] = function()
        except BaseException as error:  # re-raised in the calling thread
            result["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_aux_losses_and_stats_are_the_calling_threads_last_forward():
    model = _dlo_model(capacity_annealing_steps=0).train()
    mine, theirs = batch(batch_size=2, seq_len=6, seed=1), batch(batch_size=3, seq_len=9, seed=2, left_pad=4)
    model(**mine)
    my_loss = raw_aux_losses(model)["router"].value
    my_stats = peft_depth.routing_stats(model)

    def other_thread():
        model(**theirs)
        return raw_aux_losses(model)["router"].value, peft_depth.routing_stats(model)

    their_loss, their_stats = _in_thread(other_thread)
    assert their_stats != my_stats  # a different batch: other token counts
    assert their_stats["dlo"]["default"]["layers"][0]["num_tokens"] == 3 * 9 - 4
    # this thread still reads its own forward: the same loss tensor (the graph to backward through) and stats
    assert raw_aux_losses(model)["router"].value is my_loss
    assert peft_depth.routing_stats(model) == my_stats
    assert their_loss is not my_loss


def test_a_thread_that_has_not_run_a_forward_reads_nothing():
    model = _dlo_model().eval()
    with torch.no_grad():
        model(**batch())
    assert peft_depth.routing_stats(model)
    assert _in_thread(lambda: peft_depth.routing_stats(model)) == {}


def _gradients(checkpointing: bool, backward_on_another_thread: bool) -> dict[str, torch.Tensor]:
    model = _dlo_model(capacity_annealing_steps=0).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    inputs = batch(batch_size=2, seq_len=7, left_pad=2)
    out = model(**inputs, labels=inputs["input_ids"])
    loss = out.loss + sum(peft_depth.aux_losses(model).values())
    if backward_on_another_thread:
        _in_thread(loss.backward)
    else:
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_checkpoint_replay_on_another_thread_sees_the_plans_of_its_forward():
    """CUDA runs backward on autograd's worker thread, where this thread's context is not visible; the replay of a
    checkpointed layer must still execute exactly the tokens its forward chose."""
    expected = _gradients(checkpointing=False, backward_on_another_thread=False)
    replayed = _gradients(checkpointing=True, backward_on_another_thread=True)
    assert replayed.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(replayed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
