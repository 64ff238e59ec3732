"""Invariants every method keeps on every architecture, stated so that the next upstream change breaks a test.

transformers 5.24 renamed the decoder layers' cache argument and MoLEx silently computed a different function on a
plain ``model(**batch)``: nothing failed, because no test compared the default call with ``use_cache=False``. These
tests compare logits (not generated tokens: tiny random models have near-ties) at 1e-5, dropout 0, for each method and
routing mode on Llama, GPT-2 and a model with sliding-window layers:

- the default forward (``use_cache`` from the config, on) equals ``use_cache=False``, in eval and in train mode;
- per-step ``output_logits`` of greedy and beam-search generation with the KV cache equal those without;
- a left-padded batch generates, row by row, what each row generates alone (every per-token or per-row routing);
- routings that mix rows by design (MoLEx ``batch_vote`` / ``sequence``, DLO capacity selection) never let padding
  into a batch statistic: changing what the pad positions hold, or how many there are, changes nothing real.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from packaging.version import Version
from peft import get_peft_model
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen3

import peft_depth

ATOL = 1e-5

ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: tiny_llama(),
    "gpt2": lambda: tiny_gpt2(),
    "qwen3_sliding": lambda: tiny_qwen3(
        layer_types=["sliding_attention", "full_attention"] * 2, use_sliding_window=True, sliding_window=4
    ),
}
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "qwen3_sliding": ["q_proj", "v_proj"]}


def _config(case: str, arch: str):
    lora = dict(task_type="CAUSAL_LM", lora_dropout=0.0, target_modules=LORA_TARGETS[arch])
    if case == "mola":
        return peft_depth.MoLAConfig(num_experts=[2, 3, 2, 3], top_k=2, **lora)
    if case.startswith("molex_"):
        return peft_depth.MoLExConfig(routing=case.removeprefix("molex_"), molex_layers=[1, 2], **lora)
    if case.startswith("mod_"):
        return peft_depth.MoDConfig(router_granularity=case.removeprefix("mod_"), num_late_layers=3, **lora)
    if case == "dlo_mlp":
        return peft_depth.DLOConfig(expand_every=2, skip_mode="mlp", **lora)
    if case == "dlo_block":
        return peft_depth.DLOConfig(expand_every=2, skip_mode="block", **lora)
    if case == "dlo_capacity":
        return peft_depth.DLOConfig(
            expand_every=2, skip_mode="mlp", inference_selection="capacity", inference_capacity=0.5, **lora
        )
    raise AssertionError(case)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every adapter parameter well away from its start, routers and gates far enough to make real choices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "molex_gate" in name:
                scale = 20.0
            elif "router" in name:
                scale = 2.0
            elif name.endswith("mod_ensemble.default.gate"):
                param.fill_(0.7)
                continue
            else:
                scale = 0.1
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def adapted(case: str, arch: str) -> torch.nn.Module:
    model = get_peft_model(ARCHITECTURES[arch](), _config(case, arch))
    _perturb(model)
    return model.eval()


#: Routings that keep a KV cache in generation (MoLEx batch_vote/sequence generate without one; DLO block skipping
#: refuses one, as in the official code).
CACHED = ["mola", "molex_token", "mod_token", "mod_sequence", "dlo_mlp"]
#: Every routing whose decisions are per token or per row: a batch row computes what it computes alone.
PER_ROW = CACHED
#: Routings that mix the rows of a batch by design.
ROW_MIXING = ["molex_batch_vote", "molex_sequence", "dlo_capacity"]
ALL = [*CACHED, "molex_batch_vote", "molex_sequence", "dlo_block", "dlo_capacity"]


def _left_padded(lengths: list[int], pad_value: int = 0, extra_pad: int = 0, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_pad
    input_ids = torch.full((len(lengths), width), pad_value, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _real_logits(logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logits at its real (unpadded) positions."""
    return [logits[row][mask[row].bool()] for row in range(logits.shape[0])]


# ------------------------------------------------------------------------------------------------ default forward


# dlo_capacity differs from dlo_mlp in eval only (training always selects by capacity)
FORWARD_CASES = [
    (case, mode) for case in ALL for mode in ("eval", "train") if (case, mode) != ("dlo_capacity", "train")
]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("case, mode", FORWARD_CASES)
def test_default_forward_equals_use_cache_false(case, arch, mode):
    model = adapted(case, arch)
    model.train(mode == "train")
    inputs = _left_padded([7, 5])
    torch.manual_seed(0)
    default = model(**inputs).logits
    torch.manual_seed(0)
    uncached = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(default, uncached, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ generation


def _step_logits(model, inputs, **kwargs) -> torch.Tensor:
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return torch.stack(out.logits, dim=1)  # [batch * beams, steps, vocab]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("case", CACHED)
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_cached_generation_logits_equal_uncached(case, arch, num_beams):
    model = adapted(case, arch)
    inputs = _left_padded([6, 4])
    with torch.no_grad():
        cached = _step_logits(model, inputs, use_cache=True, num_beams=num_beams)
        uncached = _step_logits(model, inputs, use_cache=False, num_beams=num_beams)
    torch.testing.assert_close(cached, uncached, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("case", PER_ROW)
def test_left_padded_batch_generates_what_each_row_generates_alone(case, arch):
    model = adapted(case, arch)
    lengths = [7, 4, 5]
    batch = _left_padded(lengths)
    with torch.no_grad():
        together = _step_logits(model, batch)
        for row, length in enumerate(lengths):
            alone = {name: value[row : row + 1, -length:] for name, value in batch.items()}
            torch.testing.assert_close(together[row : row + 1], _step_logits(model, alone), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ row-mixing routings


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("case", ROW_MIXING)
def test_padding_never_enters_a_batch_statistic(case, arch):
    model = adapted(case, arch)
    lengths = [7, 4, 5]
    plain = _left_padded(lengths)
    # other token ids at the pad positions, and two more pad columns on every row
    repadded = _left_padded(lengths, pad_value=VOCAB - 1, extra_pad=2)
    with torch.no_grad():
        # positions counted from each row's first real token (as generate does): GPT-2's are absolute
        first = model(**plain, position_ids=_positions(plain), use_cache=False).logits
        first_routing = _routing_stats_without_padding(model, plain)
        second = model(**repadded, position_ids=_positions(repadded), use_cache=False).logits
        second_routing = _routing_stats_without_padding(model, repadded)
    for a, b in zip(_real_logits(first, plain["attention_mask"]), _real_logits(second, repadded["attention_mask"])):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert first_routing == second_routing


def _positions(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def _routing_stats_without_padding(model, inputs) -> object:
    """The last forward's routing decisions on real tokens only (so that two paddings are comparable)."""
    stats = peft_depth.routing_stats(model)
    if "molex" in stats:
        return [(row["layer"], row["chosen"], row["num_tokens"]) for row in stats["molex"]["default"]]
    if "mod" in stats:
        return stats["mod"]["default"]["num_tokens"]
    mask = inputs["attention_mask"].reshape(-1).bool()
    return [
        tuple(block.last_record.selected.view(-1)[mask].tolist())
        for block in model.base_model._dlo["blocks"]
        if block.last_record is not None
    ]


# ------------------------------------------------------------------------------------------------ how the mask arrives

#: Cases that read the padding mask (a row statistic or a batch-wide choice).
MASK_READERS = ["mod_sequence", *ROW_MIXING]


@pytest.mark.parametrize("case", ["mola", "mod_token", "mod_sequence", "dlo_mlp"])
def test_a_static_cache_keeps_the_padding_out(case):
    """generate with a static cache hands the model a 4-D mask; the padding used to be lost there (MoD's sequence
    router averaged a row's left padding into its mean: 0.063 from the row alone)."""
    model = adapted(case, "llama")
    lengths = [8, 3]
    batch = _left_padded(lengths)
    with torch.no_grad():
        together = _step_logits(model, batch, cache_implementation="static")
        for row, length in enumerate(lengths):
            alone = {name: value[row : row + 1, -length:] for name, value in batch.items()}
            torch.testing.assert_close(
                together[row : row + 1], _step_logits(model, alone, cache_implementation="static"), atol=ATOL, rtol=0
            )


def _additive_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The 4-D float mask ``[batch, 1, seq, seq]`` a caller may pass instead: causal, padding keys hidden."""
    seq = attention_mask.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("case", MASK_READERS)
def test_a_4d_mask_and_a_positional_mask_give_what_the_2d_keyword_mask_gives(case):
    model = adapted(case, "llama")
    inputs = _left_padded([7, 4, 5])
    positions = _positions(inputs)
    with torch.no_grad():
        reference = model(**inputs, position_ids=positions, use_cache=False).logits
        routing = _routing_stats_without_padding(model, inputs)
        four_d = model(
            input_ids=inputs["input_ids"],
            attention_mask=_additive_mask(inputs["attention_mask"]),
            position_ids=positions,
            use_cache=False,
        ).logits
        assert _routing_stats_without_padding(model, inputs) == routing
        positional = model.get_base_model()(inputs["input_ids"], inputs["attention_mask"], positions, use_cache=False)
        assert _routing_stats_without_padding(model, inputs) == routing
    mask = inputs["attention_mask"]
    for logits in (four_d, positional.logits):
        for a, b in zip(_real_logits(logits, mask), _real_logits(reference, mask)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", PER_ROW)
def test_sequences_packed_in_one_row_compute_what_they_compute_alone(case):
    """Padding-free batches (TRL ``padding_free``): sequences concatenated, ``position_ids`` restarting at each one.
    MoD's sequence router used to carry its running mean from one packed sequence into the next (0.072)."""
    model = adapted(case, "llama")
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (5, 6, 4)]
    packed_ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0]
        start = 0
        for sequence in sequences:
            alone = model(input_ids=sequence[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(sequence)], alone, atol=ATOL, rtol=0)
            start += len(sequence)


def test_molex_token_routing_with_assisted_decoding_on_sliding_window_layers():
    """Assisted decoding asks the cache to keep what a rejected draft's crop takes back; MoLEx's side caches for the
    expert passes were not asked, so their sliding layers refused the crop (RuntimeError)."""
    model = adapted("molex_token", "qwen3_sliding")
    generator = torch.Generator().manual_seed(3)
    pattern = torch.randint(3, VOCAB, (4,), generator=generator)
    ids = torch.cat([pattern, pattern, pattern, pattern[:2]])[None]  # repeats, so prompt lookup proposes drafts
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(**inputs, **options, use_cache=False)
        assisted = model.generate(**inputs, **options, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, reference)


@pytest.mark.parametrize("case", ["molex_token", "mod_sequence"])
def test_assisted_decoding_continues_a_reused_cache(case):
    """A cache that already carries an adapter's state (its class then follows the cache's edits) is asked by
    transformers 5.25 to ``activate_past_recording(recurrent_states_to_keep=...)``: the override took no arguments,
    so continuing a generation with prompt lookup raised TypeError (plain LoRA ran). Only that it runs is asserted:
    transformers (5.24 and 5.25) feeds the whole prompt again on top of a reused cache in assisted decoding, so the
    bare model's tokens there differ from uncached greedy ones too (7 of 8 random models)."""
    from peft_depth.core.layer_call import output_cache

    model = adapted(case, "llama")
    generator = torch.Generator().manual_seed(3)
    pattern = torch.randint(3, VOCAB, (4,), generator=generator)
    ids = torch.cat([pattern, pattern, pattern[:2]])[None]  # repeats, so prompt lookup proposes drafts
    options = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(input_ids=ids, max_new_tokens=4, return_dict_in_generate=True, **options)
        sequences, cache = first.sequences, output_cache(first)
        assert cache is not None and peft_depth.core.cache_state.attached_states(cache)
        keyword = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"  # renamed
        continued = model.generate(
            input_ids=sequences,
            attention_mask=torch.ones_like(sequences),
            **{keyword: cache},
            prompt_lookup_num_tokens=3,
            max_new_tokens=6,
            **options,
        )
    assert continued.shape == (1, sequences.shape[1] + 6) and torch.equal(
        continued[:, : sequences.shape[1]], sequences
    )


def test_the_cache_passes_whatever_its_own_activate_past_recording_takes():
    from transformers import DynamicCache

    from peft_depth.core.cache_state import attach_state

    class _Recording(DynamicCache):
        def activate_past_recording(self, recurrent_states_to_keep=None):  # noqa: D102 - transformers 5.25's signature
            self.kept = recurrent_states_to_keep

    class _State:
        def activate_past_recording(self, *args, **kwargs):
            self.called_with = (args, kwargs)

    cache, state = _Recording(), _State()
    attach_state(cache, "probe", state)
    cache.activate_past_recording(recurrent_states_to_keep=3)
    assert cache.kept == 3 and state.called_with == ((), {"recurrent_states_to_keep": 3})


def test_molex_token_routing_refuses_a_static_cache_naming_the_way_out():
    model = adapted("molex_token", "llama")
    with pytest.raises(ValueError, match=r"static.*dynamic cache.*routing='batch_vote'"):
        _step_logits(model, _left_padded([5, 3]), cache_implementation="static")


def test_the_padding_mask_read_from_4d_masks_of_every_kind():
    from peft_depth.core.forward_context import padding_mask

    real = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    boolean = torch.ones(4, 4, dtype=torch.bool).tril() & real.bool()[:, None, None, :]  # [2, 1, 4, 4]
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    assert torch.equal(padding_mask(boolean, 0), real) and torch.equal(padding_mask(additive, 0), real)
    # a mask that carries a position bias (transformers 5.25 adds Falcon's ALiBi, positive, to it) and the older
    # -1e4 convention for "blocked": "0 = attend" read every biased real token as padding
    biased = (torch.zeros(boolean.shape) + 0.25 * torch.arange(1.0, 5.0)).masked_fill(~boolean, torch.finfo().min)
    legacy = torch.zeros(boolean.shape).masked_fill(~boolean, -1e4)
    assert torch.equal(padding_mask(biased, 0), real) and torch.equal(padding_mask(legacy, 0), real)
    # a static cache's mask: 3 cached positions, 1 new token, keys up to a fixed width of 8
    step = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    step[0, 0, 0, 2:4] = True  # row 0: a padded row whose new token (key 3) sees itself
    step[1, 0, 0, :3] = True  # row 1: its new token is padding (it does not see key 3)
    assert padding_mask(step, 3).tolist() == [[1], [0]]
    sliding = torch.zeros(2, 1, 4, 2, dtype=torch.bool)  # a sliding layer's keys do not span the sequence
    assert torch.equal(padding_mask({"sliding_attention": sliding, "full_attention": boolean}, 0), real)
    assert padding_mask(sliding, 0) is None and padding_mask(None, 0) is None
    assert torch.equal(padding_mask(real, 0), real)  # a 2-D mask is one already
