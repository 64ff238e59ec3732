"""Save adapters of every method under one dependency set; load them under another and compare logits exactly.

    python tests/cross_version.py save DIR    # base model, one adapter per method, their logits
    python tests/cross_version.py check DIR   # reload each adapter onto the saved base; exit 1 on any difference

The base model is saved too (not rebuilt from a seed), so that a change in transformers' weight initialisation
between releases cannot pass for, or hide, a change in how adapters load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hub_cases import METHODS, adapted, inputs, tiny_base
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peft_depth


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("transformers", "peft", "trl", "torch")}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(), use_cache=False).logits


def save(folder: Path) -> None:
    base = tiny_base()
    base.save_pretrained(folder / "base")
    logits = {}
    for method in METHODS:
        model, _ = adapted(method, base=AutoModelForCausalLM.from_pretrained(folder / "base").eval())
        model.save_pretrained(folder / method)
        logits[method] = _logits(model)
    save_file(logits, str(folder / "logits.safetensors"))
    (folder / "versions.json").write_text(json.dumps(_versions()))
    # A CPU matmul's reduction order depends on the thread count, so the logits are bit-comparable only at the same
    # count: the checking process (another interpreter, maybe under a pytest-xdist worker's count) adopts this one.
    (folder / "torch_threads.json").write_text(json.dumps(torch.get_num_threads()))


def check(folder: Path) -> list[str]:
    expected = load_file(str(folder / "logits.safetensors"))
    problems = []
    threads = torch.get_num_threads()
    torch.set_num_threads(json.loads((folder / "torch_threads.json").read_text()))
    try:
        for method in METHODS:
            base = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
            model = PeftModel.from_pretrained(base, folder / method).eval()
            got = _logits(model)
            if not torch.equal(got, expected[method]):
                problems.append(f"{method}: max |Δlogit| {float((got - expected[method]).abs().max()):.3g}")
    finally:
        torch.set_num_threads(threads)
    return problems


if __name__ == "__main__":
    command, target = sys.argv[1], Path(sys.argv[2])
    assert peft_depth.__name__  # registers the methods
    if command == "save":
        save(target)
    elif command == "check":
        saved_with = json.loads((target / "versions.json").read_text())
        problems = check(target)
        print(f"saved with {saved_with}, loaded with {_versions()}: {problems or 'identical logits'}")
        sys.exit(1 if problems else 0)
    else:
        sys.exit(f"unknown command {command!r} (allowed: save, check)")
