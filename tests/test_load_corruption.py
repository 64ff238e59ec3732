"""Property: any corruption of a valid adapter folder either loads exactly the saved model or is refused clearly,
and never changes the base model.

For each method a valid adapter is saved once; hypothesis then draws one corruption - drop, add, rename, reshape or
retype a tensor, or set a config field to another value - applies it to a copy of the folder and loads it onto a base
model (every field but ``peft_type``, without which the folder is not a peft-depth adapter). Outcomes allowed: the logits equal the saved adapter's exactly (a harmless change, e.g. a config field set to
its own value), or a ``ValueError`` / ``TypeError`` raised by peft-depth or peft with a message (never a
``KeyError``, ``IndexError``, ``RecursionError`` ...). Either way the base model's fingerprint (weights, config,
hooks, modules, outputs) is what it was.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hub_cases import METHODS, adapted, fresh_copy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_load_trust import _logits, assert_same, fingerprint

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_SAVED: dict[str, tuple] = {}

#: Values a hostile or broken adapter_config.json may hold for any field.
ODD_VALUES = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        1,
        3,
        10**9,
        1e-300,
        1e308,
        float("nan"),
        float("inf"),
        "",
        "x",
        "../x",
        [],
        [None],
        [1],
        ["q_proj"],
        [0] * 1000,
        {},
        {"a": 1},
    ]
)


def _saved(method: str, root) -> tuple:
    if method not in _SAVED:
        model, pristine = adapted(method)
        folder = root / f"saved_{method}"
        model.save_pretrained(folder)
        _SAVED[method] = (folder, pristine, _logits(model))
    return _SAVED[method]


def corruptions(names: list[str], fields: list[str], what: str):
    if what == "config":
        return st.tuples(st.just("field"), st.sampled_from(fields), ODD_VALUES)
    kinds = st.sampled_from(["drop", "add", "rename", "reshape", "retype"])
    return st.tuples(kinds, st.sampled_from(names), st.integers(0, 3))


def _corrupt(folder, kind: str, target: str, detail) -> None:
    if kind == "field":
        config = json.loads((folder / "adapter_config.json").read_text())
        config[target] = detail
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return
    file = folder / "adapter_model.safetensors"
    weights = load_file(file)
    tensor = weights[target]
    if kind == "drop":
        del weights[target]
    elif kind == "add":
        extra = target.replace(".weight", f".extra{detail}.weight") if target.endswith(".weight") else target + "_x"
        weights[extra] = tensor.clone()
    elif kind == "rename":
        weights[target[::-1][: len(target) // 2][::-1] + f"_renamed{detail}"] = weights.pop(target)
    elif kind == "reshape":
        weights[target] = torch.zeros(tensor.numel() + detail + 1)
    elif kind == "retype":
        weights[target] = [tensor.to(torch.int64), tensor.to(torch.bool), tensor.to(torch.float64), tensor.half()][
            detail
        ]
    save_file(weights, file)


@pytest.mark.parametrize("what", ["weights", "config"])
@pytest.mark.parametrize("method", METHODS)
def test_any_corruption_loads_exactly_or_is_refused_and_never_changes_the_base(tmp_path_factory, method, what):
    root = tmp_path_factory.mktemp(f"corrupt_{method}_{what}")
    folder, pristine, expected = _saved(method, root)
    names = sorted(load_file(folder / "adapter_model.safetensors"))
    # without its peft_type a folder is no longer a peft-depth adapter at all (peft's own loader answers it)
    fields = sorted(set(json.loads((folder / "adapter_config.json").read_text())) - {"peft_type"})
    counter = iter(range(10**6))

    @SETTINGS
    @given(corruption=corruptions(names, fields, what))
    def check(corruption):
        work = root / f"case{next(counter)}"
        shutil.copytree(folder, work)
        _corrupt(work, *corruption)
        base = fresh_copy(pristine)
        before = fingerprint(base)
        try:
            loaded = PeftModel.from_pretrained(base, work)
        except (ValueError, TypeError) as error:
            assert str(error), corruption
            assert_same(before, fingerprint(base))
            event(f"refused: {corruption[0]}")
            return
        event(f"loaded: {corruption[0]}")
        # accepted: it must be exactly the saved adapter; a tensor stored in half precision loads as exactly its
        # float32 value (the same adapter with that one tensor rounded to fp16 and stored in float32)
        logits, reference = _logits(loaded), expected
        if corruption[0] == "retype" and corruption[2] == 3:
            rounded = root / f"case{next(counter)}"
            shutil.copytree(folder, rounded)
            weights = load_file(rounded / "adapter_model.safetensors")
            weights[corruption[1]] = weights[corruption[1]].half().float()
            save_file(weights, rounded / "adapter_model.safetensors")
            reference = _logits(PeftModel.from_pretrained(fresh_copy(pristine), rounded))
        assert torch.equal(logits, reference), corruption

    check()


@pytest.mark.parametrize("method", METHODS)
def test_a_tensor_stored_in_half_precision_loads_as_exactly_its_float32_value(tmp_path, method):
    """The 'retype to fp16' corruption above, made certain for every tensor kind: the load either refuses it or gives
    the logits of the same adapter whose tensor was rounded to fp16 and stored in float32, exactly."""
    folder, pristine, expected = _saved(method, tmp_path)
    # a low-rank B matrix: every method has one, and its values move the logits continuously (a hard-routed gate's
    # may not: MoLEx's batch-vote gate picks the same layer from zeros as from its saved values)
    name = [n for n in sorted(load_file(folder / "adapter_model.safetensors")) if n.endswith(("lora_B", "mola_B"))][-1]
    stored_as = {
        "half": lambda t: t.half(),
        "rounded_float32": lambda t: t.half().float(),
        "zeros": torch.zeros_like,  # shows that this tensor moves the logits, so ignoring it would be seen
    }
    results = {}
    for stored, convert in stored_as.items():
        work = tmp_path / stored
        shutil.copytree(folder, work)
        weights = load_file(work / "adapter_model.safetensors")
        weights[name] = convert(weights[name])
        save_file(weights, work / "adapter_model.safetensors")
        results[stored] = _logits(PeftModel.from_pretrained(fresh_copy(pristine), work))
    assert torch.equal(results["half"], results["rounded_float32"])
    assert (results["zeros"] - expected).abs().max() > 100 * (results["half"] - expected).abs().max()
