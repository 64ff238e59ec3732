"""Property-based tests over the configs and inputs of every peft-depth method.

For each method, hypothesis draws config fields (valid and invalid values mixed) and an input batch (size, length,
left padding). Properties:

- a config that is rejected raises ``ValueError`` whose message names a field (in backticks) or the problem;
  ``get_peft_model`` may also reject a config that does not fit the model, again only with ``ValueError``;
- an accepted config builds, runs a forward pass with finite outputs of the right shape, and round-trips through
  ``save_pretrained`` / ``PeftModel.from_pretrained`` to exactly the same outputs;
- the adapter_config.json it writes builds the same config again (no field is lost or changed).

Examples are derandomised (the same draws every run) so the suite stays deterministic; run with
``--hypothesis-show-statistics`` to see the counts of accepted and rejected configs.
"""

from __future__ import annotations

import json
import tempfile
from copy import deepcopy

import pytest
import torch
from hub_cases import METHODS, perturb_adapter
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_depth

NUM_LAYERS = 4
FUZZ_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_base_cache: dict[str, torch.Tensor] = {}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    base = _tiny_llama()
    return base, type(base)(deepcopy(base.config)).eval()


layer_subsets = st.lists(st.integers(0, NUM_LAYERS - 1), min_size=1, max_size=NUM_LAYERS, unique=True)
targets = st.sampled_from([["q_proj"], ["q_proj", "v_proj"], ["down_proj"], "all-linear"])
mola_allocations = st.one_of(
    st.fixed_dictionaries({"num_experts": st.integers(2, 4), "top_k": st.integers(1, 2)}),
    st.fixed_dictionaries(
        {"expert_pattern": st.lists(st.integers(2, 4), min_size=1, max_size=4), "top_k": st.just(1)}
    ),
    st.fixed_dictionaries(
        {
            "num_experts": st.lists(st.integers(2, 4), min_size=NUM_LAYERS, max_size=NUM_LAYERS),
            "top_k": st.lists(st.integers(1, 2), min_size=NUM_LAYERS, max_size=NUM_LAYERS),
        }
    ),
)
dlo_expansions = st.one_of(
    st.fixed_dictionaries({"expansion": st.just("interleave"), "expand_every": st.integers(1, NUM_LAYERS)}),
    st.fixed_dictionaries(
        {
            "expansion": st.just("stack"),
            "stack_range": st.none()
            | st.tuples(st.integers(0, NUM_LAYERS - 1), st.integers(1, NUM_LAYERS))
            .filter(lambda r: r[0] < r[1])
            .map(list),
        }
    ),
    st.fixed_dictionaries({"expansion": st.lists(st.integers(0, NUM_LAYERS - 1), min_size=1, max_size=3)}),
)

#: Per method: (strategy of valid-looking configs, {field: strategy of bad values}). Cross-field conflicts in the
#: "valid" draws (top_k above a layer's experts, LoRA new layers with r=0, ...) are left in on purpose.
SPACES = {
    "mola": (
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 3),
                "lora_dropout": st.sampled_from([0.0, 0.1]),
                "balance_loss_coef": st.sampled_from([0.0, 0.01]),
                "bias": st.sampled_from(["none", "mola_only"]),
                "target_modules": targets,
            }
        ).flatmap(lambda d: mola_allocations.map(lambda a: {**d, **a})),
        {
            "r": st.sampled_from([-1, 0, 1.5, "8", True]),
            "num_experts": st.sampled_from([0, -2, [], [2] * (NUM_LAYERS + 3), [2, 0, 2, 2]]),
            "top_k": st.sampled_from([0, 1000, [1] * (NUM_LAYERS - 1)]),
            "expert_pattern": st.sampled_from([[], [0], [2] * (NUM_LAYERS + 1)]),
            "lora_dropout": st.sampled_from([1.0, -0.1, float("nan")]),
            "bias": st.just("bogus"),
            "balance_loss_coef": st.sampled_from([-1.0, float("inf")]),
        },
    ),
    "molex": (
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 3),
                "routing": st.sampled_from(["batch_vote", "sequence", "token"]),
                "gate_type": st.sampled_from(["linear", "cosine"]),
                "gate_proj_dim": st.integers(2, 8),
                "alpha": st.none() | st.sampled_from([0.3, 0.5, 0.9]),
                "learn_alpha": st.booleans(),
                "shared_gate": st.booleans(),
                "straight_through_gate": st.booleans(),
                "molex_layers": st.none() | layer_subsets,
                "expert_layers": st.none() | layer_subsets,
                "target_modules": targets,
            }
        ),
        {
            "routing": st.just("bogus"),
            "gate_type": st.just("bogus"),
            "gate_proj_dim": st.sampled_from([0, -1]),
            "alpha": st.sampled_from([0.0, 1.0, 1.5]),
            "molex_layers": st.sampled_from([[NUM_LAYERS + 5], [-1], [1, 1], []]),
            "expert_layers": st.sampled_from([[NUM_LAYERS], []]),
            "learn_alpha": st.just("yes"),
        },
    ),
    "mod": (
        st.fixed_dictionaries(
            {
                "num_late_layers": st.integers(2, NUM_LAYERS),
                "router_granularity": st.sampled_from(["token", "sequence", "static"]),
                "mix_space": st.sampled_from(["logits", "log_probs"]),
                "router_temperature": st.sampled_from([0.5, 1.0, 2.0]),
                "gate_init": st.sampled_from([0.0, 0.5]),
                "distill_loss_coef": st.sampled_from([0.0, 1.0]),
                "distill_temperature": st.sampled_from([1.0, 2.0]),
                "distill_fraction": st.sampled_from([0.5, 1.0]),
                "distill_chunk_size": st.integers(1, 8),
                "r": st.integers(0, 2),
                "target_modules": st.none() | st.just(["q_proj"]),
            }
        ),
        {
            "num_late_layers": st.sampled_from([1, 0, -1, NUM_LAYERS + 1, 10**9]),
            "router_granularity": st.just("bogus"),
            "mix_space": st.just("bogus"),
            "router_temperature": st.sampled_from([0.0, -1.0]),
            "distill_fraction": st.sampled_from([0.0, 1.5]),
            "distill_chunk_size": st.sampled_from([0, -3]),
            "r": st.just(-1),
        },
    ),
    "dlo": (
        st.fixed_dictionaries(
            {
                "init": st.sampled_from(["zero_out", "copy", "mean", "random"]),
                "new_layer_training": st.sampled_from(["full", "lora"]),
                "routed_layers": st.sampled_from(["all", "new", "none"]),
                "skip_mode": st.sampled_from(["mlp", "block"]),
                "capacity": st.sampled_from([0.5, 0.9, 1.0]),
                "capacity_annealing_steps": st.integers(0, 5),
                "inference_selection": st.sampled_from(["threshold", "capacity"]),
                "scale_gap": st.sampled_from([0.0, 0.05, 1.0]),
                "r": st.integers(0, 2),
                "target_modules": targets,
            }
        ).flatmap(lambda d: dlo_expansions.map(lambda e: {**d, **e})),
        {
            "expansion": st.sampled_from(["bogus", [-1], [NUM_LAYERS + 2], []]),
            "expand_every": st.sampled_from([0, -1, NUM_LAYERS + 1]),
            "stack_range": st.sampled_from([[3, 1], [0, NUM_LAYERS + 3], [1]]),
            "init": st.just("bogus"),
            "capacity": st.sampled_from([0.0, 1.5]),
            "capacity_annealing_steps": st.just(-1),
            "scale_gap": st.sampled_from([-0.1, 3.0]),
            "skip_mode": st.just("bogus"),
        },
    ),
}


@st.composite
def config_kwargs(draw, method: str) -> dict:
    """A valid-looking config, and in about half the draws one field replaced by a bad value."""
    valid, bad = SPACES[method]
    kwargs = draw(valid)
    if draw(st.booleans()):
        field_name = draw(st.sampled_from(sorted(bad)))
        kwargs[field_name] = draw(bad[field_name])
        event(f"{method}: corrupted {field_name}")
    return kwargs


CONFIG_CLASSES = {
    "mola": getattr(peft_depth, "MoLAConfig", None),
    "molex": getattr(peft_depth, "MoLExConfig", None),
    "mod": getattr(peft_depth, "MoDConfig", None),
    "dlo": getattr(peft_depth, "DLOConfig", None),
}

batches = st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(0, 3), st.integers(0, 2**16))


def _batch(batch_size: int, seq_len: int, pad: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 64, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    pad = min(pad, seq_len - 1)  # every row keeps at least one real token
    input_ids[0, :pad] = 0
    attention_mask[0, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}


def _assert_clear(error: ValueError) -> None:
    message = str(error)
    assert len(message) > 15 and ("`" in message or "must" in message or "layer" in message), message


def _check(method: str, kwargs: dict, batch_spec: tuple) -> None:
    config_cls = CONFIG_CLASSES[method]
    try:
        config = config_cls(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)
    except ValueError as error:
        event(f"{method}: rejected by the config")
        _assert_clear(error)
        return
    base, pristine = _pair()
    pristine.load_state_dict(base.state_dict())
    try:
        model = get_peft_model(base, config)
    except ValueError as error:
        event(f"{method}: rejected by get_peft_model")
        _assert_clear(error)
        return
    event(f"{method}: accepted")
    perturb_adapter(model, seed=batch_spec[3])
    model.eval()
    batch = _batch(*batch_spec)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 64)
    assert torch.isfinite(logits).all()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with open(f"{folder}/adapter_config.json") as handle:
            written = json.load(handle)
        reread = PeftConfig.from_pretrained(folder)
        for field_name in kwargs:
            value = getattr(config, field_name)
            assert getattr(reread, field_name) == value, (field_name, value, written.get(field_name))
        loaded = PeftModel.from_pretrained(pristine, folder).eval()
        with torch.no_grad():
            reloaded = loaded(**batch).logits
    assert torch.equal(reloaded, logits)


def _make_test(method: str):
    @FUZZ_SETTINGS
    @given(kwargs=config_kwargs(method), batch_spec=batches)
    def test(kwargs, batch_spec):
        _check(method, kwargs, batch_spec)

    test.__name__ = f"test_fuzz_{method}"
    test.__doc__ = f"{method}: any accepted config builds, runs and round-trips exactly; any rejected one raises a clear ValueError."
    return test


# One hypothesis test per method present in this tree (collected by name, so statistics show per method).
for _method in METHODS:
    globals()[f"test_fuzz_{_method}"] = _make_test(_method)


def _bad_values(method: str) -> list[tuple[str, object]]:
    _, bad = SPACES[method]
    return [(name, value) for name in sorted(bad) for value in bad[name].elements]


@pytest.mark.parametrize(
    "method, field_name, value",
    [(m, f, v) for m in METHODS for f, v in _bad_values(m)],
    ids=lambda v: repr(v)[:24] if not isinstance(v, str) else v,
)
def test_every_bad_value_is_rejected_with_a_clear_message(method, field_name, value):
    """Each bad value of the fuzz space, in an otherwise default config: ValueError from the config or from
    get_peft_model (for values only the model can judge, such as a layer index beyond its depth)."""
    kwargs = {"mola": {"num_experts": 2, "top_k": 1}}.get(method, {})
    kwargs = {**kwargs, field_name: value}
    if method == "mola" and field_name == "expert_pattern":
        kwargs.pop("num_experts")
    if method == "mola" and field_name == "num_experts" and isinstance(value, list):
        kwargs["top_k"] = 1
    if method == "dlo" and field_name == "stack_range":
        kwargs["expansion"] = "stack"  # stack_range is only read by the stack expansion
    with pytest.raises(ValueError) as error:
        config = CONFIG_CLASSES[method](task_type="CAUSAL_LM", **kwargs)
        get_peft_model(_pair()[0], config)
    _assert_clear(error.value)
