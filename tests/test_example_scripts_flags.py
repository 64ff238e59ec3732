"""The reasoning and GLUE example scripts refuse a bad flag while parsing, naming it, before any model is loaded
(a bad method name used to fail after the base model's scoring and a whole training run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("reasoning_mod", ["--methods", "lora", "mdo"], "argument --methods: invalid choice: 'mdo'"),
        ("reasoning_mod", ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
        ("reasoning_mod", ["--seeds", "-1"], "argument --seeds: must be in [0, 2**63), got -1"),
        ("reasoning_mod", ["--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
        ("reasoning_dlo", ["--capacity", "1.5"], "argument --capacity: expected a number in (0, 1], got '1.5'"),
        ("reasoning_dlo", ["--routed-layers", "New"], "argument --routed-layers: invalid choice: 'New'"),
        ("reasoning_dlo", ["--loss-type", "cosine"], "argument --loss-type: invalid choice: 'cosine'"),
        ("glue_molex", ["--tasks", "sst2", "boolq"], "argument --tasks: invalid choice: 'boolq'"),
        ("glue_molex", ["--test-fraction", "0"], "argument --test-fraction: expected a number in (0, 1), got '0'"),
        ("glue_molex", ["--max-len", "0"], "argument --max-len: expected a positive integer, got '0'"),
    ],
)
def test_a_bad_flag_is_refused_while_parsing(script, argv, message, monkeypatch, capsys):
    module = load(script)

    def no_model(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the flags were checked")

    monkeypatch.setattr(module.AutoTokenizer, "from_pretrained", no_model)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
