"""Loads change only what they load: a failed load leaves the caller's model exactly as it was.

``ModelSnapshot`` (core.snapshot) is the mechanism; these tests state the guarantee from outside: after a refused
``PeftModel.from_pretrained(base, bad)`` or ``peft_model.load_adapter(bad, name)`` the model's weights, config, hooks,
module tree, flags and outputs are bitwise what they were, and a retry with the good adapter on the same object
gives exactly the adapter's outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from allocation_guard import allocation_counter
from hub_cases import METHODS, adapted, fresh_copy, method_configs, tiny_base
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

BATCH = {"input_ids": torch.tensor([[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]]), "attention_mask": torch.ones(2, 5)}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything a load could change, in comparable form."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "config": model.config.to_dict() if hasattr(model, "config") else None,
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), "forward" in m.__dict__)
            for n, m in model.named_modules()
        ],
        "logits": _logits(model),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for key in ("requires_grad", "config", "modules", "hooks"):
        assert before[key] == after[key], key
    assert torch.equal(before["logits"], after["logits"])


def _saved(tmp_path, method):
    model, pristine = adapted(method)
    path = tmp_path / method
    model.save_pretrained(path)
    return _logits(model), pristine, path


def _break(path, how: str) -> None:
    file = path / "adapter_model.safetensors"
    weights = load_file(file)
    if how == "missing":
        weights.pop(sorted(weights)[-1])
    elif how == "nan":
        name = sorted(weights)[-1]
        weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, file)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["missing", "nan"])
def test_failed_from_pretrained_leaves_the_base_exactly_as_it_was(tmp_path, method, how):
    expected, pristine, good = _saved(tmp_path, method)
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in good.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    _break(bad, how)
    base = fresh_copy(pristine)
    handle = base.model.layers[0].register_forward_hook(lambda *a: None)  # a caller's own hook survives and removes
    before = fingerprint(base)
    # refused at the weight check, after the adapter was injected: what is tested is the rollback of the injection
    with pytest.raises(ValueError, match={"missing": "1 missing key", "nan": "NaN or infinite values"}[how]):
        PeftModel.from_pretrained(base, bad)
    assert_same(before, fingerprint(base))
    # the retry on the very same object is exactly the adapter
    retried = PeftModel.from_pretrained(base, good)
    assert torch.equal(_logits(retried), expected)
    handle.remove()
    assert not any(len(m._forward_hooks) for m in retried.get_base_model().model.layers[0].modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("failure", ["no_target_module", "over_the_allocation_budget"])
def test_failed_get_peft_model_leaves_the_base_exactly_as_it_was(monkeypatch, method, failure):
    """get_peft_model edits the caller's model in place (routing hooks, swapped linears, rewired blocks) before
    peft finds that a target module is missing or the budget stops the build: none of it may stay."""
    config = method_configs()[method]
    if failure == "no_target_module":
        config.target_modules = ["no_such_proj"]
        message = "no_such_proj"
    else:
        monkeypatch.setenv("PEFT_DEPTH_MAX_ADAPTER_BYTES", "64")  # less than any of these adapters
        message = "would allocate more than"
    base = tiny_base()
    handle = base.model.layers[0].register_forward_hook(lambda *a: None)  # a caller's own hook survives
    before = fingerprint(base)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, config)
    assert_same(before, fingerprint(base))
    handle.remove()
    assert not any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())


@pytest.mark.parametrize("method", METHODS)
def test_failed_load_adapter_leaves_the_peft_model_exactly_as_it_was(tmp_path, method):
    _, pristine, good = _saved(tmp_path, method)
    _break(good, "missing")
    model, _ = adapted(method, base=fresh_copy(pristine), seed=1)
    before = fingerprint(model)
    configs_before = list(model.peft_config)
    tuner = model.base_model
    # the tuner's own bookkeeping too: what it reports to peft as available, what peft recorded as targeted
    bookkeeping = (sorted(tuner.marked_adapters()), list(tuner.targeted_module_names))
    with pytest.raises(ValueError, match="1 missing key"):  # after the adapter 'other' was injected
        model.load_adapter(good, adapter_name="other")
    assert list(model.peft_config) == configs_before
    assert_same(before, fingerprint(model))
    assert (sorted(tuner.marked_adapters()), list(tuner.targeted_module_names)) == bookkeeping


@pytest.mark.parametrize("method", METHODS)
def test_failed_config_check_leaves_the_base_unchanged(tmp_path, method):
    _, pristine, path = _saved(tmp_path, method)
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_facts"]["num_layers"] = 6  # saved from another model
    (path / "adapter_config.json").write_text(json.dumps(config))
    base = fresh_copy(pristine)
    before = fingerprint(base)
    with pytest.raises(ValueError, match="number of layers"):
        PeftModel.from_pretrained(base, path)
    assert_same(before, fingerprint(base))


@pytest.mark.parametrize("method", METHODS)
def test_a_second_adapter_whose_name_is_part_of_parameter_paths_loads_exactly(tmp_path, method):
    """peft filters keys with ``adapter_name in key``: names such as "a" or "proj" used to be refused, listing the
    other adapter's keys as missing."""
    expected, pristine, path = _saved(tmp_path, method)
    model, _ = adapted(method, base=fresh_copy(pristine), seed=1)
    for name in ["a", "b", "model", "proj", "layer", "new"]:
        model.load_adapter(path, adapter_name=name)
        model.set_adapter(name)
        assert torch.equal(_logits(model), expected), name
    model.set_adapter("default")
    assert not torch.equal(_logits(model), expected)


# ------------------------------------------------------------------------------------------ hostile configs and files

COMMON_HOSTILE = [
    ({"lora_alpha": float("nan")}, "`lora_alpha` must be a finite number"),
    ({"lora_alpha": float("inf")}, "`lora_alpha` must be a finite number"),
    ({"lora_alpha": 1e308}, "`lora_alpha` must be a finite number"),
    ({"peft_depth_version": True}, "`peft_depth_version` must be an integer"),
    ({"target_modules": [1]}, "`target_modules` must be None, a regex string, or a list of module names"),
    ({"exclude_modules": [None]}, "`exclude_modules` must be"),
    ({"modules_to_save": [1]}, "`modules_to_save` must be None or a list of module names"),
    (
        {"modules_to_save": ["not_a_module"]},
        r"`modules_to_save` names \['not_a_module'\], none of which the model has",
    ),
    ({"trainable_token_indices": [-1]}, "`trainable_token_indices` must be"),
    ({"trainable_token_indices": [10**6]}, r"`trainable_token_indices` holds token id 1000000.*128 rows"),
    ({"nonfinite_routing": "ignore"}, "`nonfinite_routing` must be one of 'base_path', 'raise'"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("overrides, message", COMMON_HOSTILE, ids=lambda v: str(v)[:40])
def test_hostile_common_config_values_are_refused_naming_the_field(tmp_path, method, overrides, message):
    _, pristine, path = _saved(tmp_path, method)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(overrides)
    (path / "adapter_config.json").write_text(json.dumps(config))  # NaN/Infinity as Python's json writes them
    base = fresh_copy(pristine)
    before = fingerprint(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, path)
    assert_same(before, fingerprint(base))


@pytest.mark.parametrize("name", ["/tmp/escaped", "../escaped", "a/b", "", ".."])
def test_adapter_names_that_are_paths_are_refused(tmp_path, name):
    _, pristine, path = _saved(tmp_path, "mola")
    with pytest.raises(ValueError, match="Adapter name .* is not allowed"):
        PeftModel.from_pretrained(fresh_copy(pristine), path, adapter_name=name)
    model, _ = adapted("mola", base=fresh_copy(pristine))
    with pytest.raises(ValueError, match="Adapter name .* is not allowed"):
        model.load_adapter(path, adapter_name=name)
    assert list(model.peft_config) == ["default"]


def _write_raw_safetensors(file, header: bytes, data: bytes = b"") -> None:
    file.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_a_deeply_nested_header_is_a_clear_error(tmp_path):
    _, pristine, path = _saved(tmp_path, "mola")
    _write_raw_safetensors(path / "adapter_model.safetensors", b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(ValueError, match="nests too deeply|exceeds"):
        PeftModel.from_pretrained(fresh_copy(pristine), path)


def test_a_header_listing_a_million_empty_tensors_is_refused_before_parsing(tmp_path):
    """71 MiB of header used to cost +1.4 GB and 41 s before the refusal; its length alone gives it away."""
    _, pristine, path = _saved(tmp_path, "mola")
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = ("{" + ",".join(entry.format(i) for i in range(1_000_000)) + "}").encode()
    _write_raw_safetensors(path / "adapter_model.safetensors", header)
    base = fresh_copy(pristine)
    # the adapter's own modules (about 60 KB) are built before its file is read; the file must not be parsed
    with allocation_counter(max_tensor_bytes=2**20) as allocated:
        with pytest.raises(ValueError, match="exceeds the .*-byte limit for the tensors this adapter holds"):
            PeftModel.from_pretrained(base, path)
    # reading the header alone would take 71 MiB of Python heap, parsing it about 1.4 GB
    assert allocated.python_peak_bytes < 16 * 2**20, f"{allocated.python_peak_bytes} bytes of Python heap"


def test_auto_peft_model_refuses_to_resize_the_base_for_a_larger_tokenizer(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model, pristine = adapted("mola")
    pristine.save_pretrained(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    expected = _logits(model)
    vocab = {f"w{i}": i for i in range(200)}  # the base has 128 embedding rows
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")))
    tokenizer.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="has 200 tokens but the base model .* has 128 embedding rows"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    # a tokenizer that fits loads as usual
    small = {f"w{i}": i for i in range(100)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=small, unk_token="w0"))).save_pretrained(
        tmp_path / "adapter"
    )
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")), expected)


@pytest.mark.parametrize("method", METHODS)
def test_unload_hands_back_the_base_exactly(method):
    """unload() after use leaves no hook, module, flag or config change on the base (the failed-load restore does not
    rely on it, but users do)."""
    from peft import get_peft_model

    base = tiny_base()
    before = fingerprint(base)
    model = get_peft_model(base, method_configs()[method])
    _logits(model.eval())
    restored = model.unload()
    assert restored is base
    after = fingerprint(restored)
    before["requires_grad"] = after["requires_grad"]  # peft leaves base parameters frozen, as it does for LoRA
    assert_same(before, after)


def test_sequence_classification_keeps_peft_default_modules_to_save():
    """peft adds ("classifier", "score") for SEQ_CLS, of which a model has one: that is not a wrong name."""
    from peft import get_peft_model
    from tiny_models import tiny_bert

    import peft_depth

    model = get_peft_model(tiny_bert(), peft_depth.MoLExConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert any("modules_to_save" in name for name, _ in model.named_parameters())
