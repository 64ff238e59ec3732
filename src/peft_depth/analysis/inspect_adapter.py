"""``peft-depth inspect``: what a trained depth adapter does on real text, as JSON and heatmaps.

The adapter is loaded with ``PeftModel.from_pretrained`` (``import peft_depth`` registers the methods), run over a
dataset sample in eval mode, and ``peft_depth.routing_stats`` is merged over all batches (``RoutingAccumulator``).
Heatmaps: MoLA expert usage per layer, MoLEx chosen expert layers per layer, MoD router weights over the late layers,
DLO executed fraction per layer; any other method gets a generic per-layer heatmap of its statistics.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analyze import _first_line, _progress, load_causal_lm, pick_device
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
from .plots import heatmap
from .routing import RoutingAccumulator

__all__ = ["InspectOptions", "plot_routing", "run_inspect", "summarize_routing"]


@dataclass
class InspectOptions:
    adapter: str
    base: str | None = None
    dataset: str | None = None
    num_samples: int = 64
    output_dir: str = "peft-depth-inspect"
    tokenizer: str | None = None
    text_field: str | None = None
    split: str | None = None
    max_length: int = 64
    batch_size: int = 8
    device: str | None = None
    seed: int = 0
    progress: bool = True


def _adapter_config(adapter: str) -> dict[str, Any]:
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise AnalysisError(
            f"Adapter not found: {adapter!r} is not a directory (give a folder saved by save_pretrained)."
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AnalysisError(f"No adapter_config.json in {adapter!r}; is it a PEFT adapter saved with save_pretrained?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AnalysisError(f"Could not read {config_file}: {_first_line(error)}") from None
    if not isinstance(config, dict):
        raise AnalysisError(
            f"{config_file} holds a JSON {type(config).__name__}, not the object save_pretrained writes."
        )
    for field in ("base_model_name_or_path", "peft_type"):
        if config.get(field) is not None and not isinstance(config[field], str):
            raise AnalysisError(f"{config_file}: `{field}` must be a string, got {config[field]!r}.")
    return config


def resolve_base(adapter: str, base: str | None) -> str:
    """The base model path: ``--base`` or the adapter config's ``base_model_name_or_path``."""
    config = _adapter_config(adapter)
    base_name = base or config.get("base_model_name_or_path")
    if not base_name:
        raise AnalysisError(f"The adapter config in {adapter!r} names no base model; pass it with --base MODEL.")
    try:
        return resolve_model(base_name)
    except AnalysisError as error:
        hint = "" if base else " (read from the adapter config; pass another with --base MODEL)"
        raise AnalysisError(f"{error}{hint}") from None


def load_adapter_model(adapter: str, base_path: str, device: str):
    """Base model plus adapter, in eval mode."""
    model = load_causal_lm(base_path, device)
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import peft_depth  # noqa: F401  (registers the depth methods with peft)

    peft_type = _adapter_config(adapter).get("peft_type")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = "MOLA, MOLEX, MOD, DLO, or a peft method such as LORA"
        raise AnalysisError(f"The adapter config in {adapter!r} has `peft_type` {peft_type!r}; expected {known}.")
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except Exception as error:
        raise AnalysisError(f"Could not load adapter {adapter!r} on {base_path!r}: {_first_line(error)}") from None
    return model.to(device).eval()


def _rows(payload: Any) -> list[dict[str, Any]]:
    if isinstance(payload, dict) and isinstance(payload.get("layers"), list):
        payload = payload["layers"]
    if isinstance(payload, list):
        return [row for row in payload if isinstance(row, dict) and "layer" in row]
    return []


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def plot_routing(merged: dict[str, Any], output_dir: Path) -> dict[str, str]:
    """Heatmaps for every method and adapter in ``merged`` (a ``routing_stats`` layout); returns name -> path."""
    written: dict[str, str] = {}
    for method, adapters in merged.items():
        if not isinstance(adapters, dict):
            continue
        for adapter_name, payload in adapters.items():
            stem = f"{_safe(method)}_{_safe(adapter_name)}"
            path = output_dir / f"{stem}.png"
            rows = _rows(payload)
            if method == "mola" and rows:
                heatmap(
                    [row["expert_fraction"] for row in rows],
                    path,
                    title=f"MoLA expert usage ({adapter_name})",
                    xlabel="expert",
                    ylabel="layer",
                    yticklabels=[str(row["layer"]) for row in rows],
                    colorbar_label="fraction of routed tokens",
                    value_range=(0.0, 1.0),
                )
            elif method == "molex" and rows:
                width = len(rows[0]["expert_fraction"])
                heatmap(
                    [row["expert_fraction"] for row in rows],
                    path,
                    title=f"MoLEx chosen expert layers ({adapter_name})",
                    xlabel="expert layer",
                    ylabel="MoLEx layer",
                    xticklabels=[str(i) for i in range(width)],
                    yticklabels=[str(row["layer"]) for row in rows],
                    colorbar_label="fraction of tokens",
                    value_range=(0.0, 1.0),
                )
            elif method == "mod" and isinstance(payload, dict) and "mean_weight" in payload:
                gate = payload.get("gate")
                heatmap(
                    [payload["mean_weight"]],
                    path,
                    title=f"MoD router weights ({adapter_name}, gate {gate:.3f})"
                    if isinstance(gate, (int, float))
                    else f"MoD router weights ({adapter_name})",
                    xlabel="late layer",
                    ylabel="",
                    xticklabels=[str(layer) for layer in payload.get("layers", range(len(payload["mean_weight"])))],
                    yticklabels=["mean weight"],
                    colorbar_label="mean routing weight",
                    value_range=(0.0, 1.0),
                    annotate=True,
                )
            elif method == "dlo" and rows:
                heatmap(
                    [[row.get("executed_fraction", math.nan) for row in rows]],
                    path,
                    title=f"DLO executed fraction per layer ({adapter_name}; * new layer)",
                    xlabel="layer of the expanded stack",
                    ylabel="",
                    xticklabels=[f"{row['layer']}{'*' if row.get('new') else ''}" for row in rows],
                    yticklabels=["executed"],
                    colorbar_label="fraction of tokens executed",
                    value_range=(0.0, 1.0),
                )
            elif rows:
                path = _generic_heatmap(method, adapter_name, rows, path)
                if path is None:
                    continue
            else:
                continue
            written[stem] = str(path)
    return written


def _generic_heatmap(method: str, adapter_name: str, rows: list[dict[str, Any]], path: Path) -> Path | None:
    first = rows[0]
    list_keys = [
        k for k, v in first.items() if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)
    ]
    if list_keys:
        key = list_keys[0]
        return heatmap(
            [row.get(key, []) for row in rows],
            path,
            title=f"{method} {key} ({adapter_name})",
            xlabel="index",
            ylabel="layer",
            yticklabels=[str(row["layer"]) for row in rows],
        )
    keys = [
        k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("layer",)
    ]
    if not keys:
        return None
    return heatmap(
        [[float(row.get(k, math.nan)) for row in rows] for k in keys],
        path,
        title=f"{method} per-layer statistics ({adapter_name})",
        xlabel="layer",
        ylabel="",
        xticklabels=[str(row["layer"]) for row in rows],
        yticklabels=keys,
    )


def summarize_routing(merged: dict[str, Any]) -> str:
    """One or two lines per method and adapter."""
    lines = []
    for method, adapters in merged.items():
        if not isinstance(adapters, dict):
            continue
        for adapter_name, payload in adapters.items():
            rows = _rows(payload)
            head = f"{method} / {adapter_name}:"
            if method in ("mola", "molex") and rows:
                entropies = [row.get("usage_entropy", math.nan) for row in rows]
                worst = min(range(len(rows)), key=lambda i: entropies[i])
                lines.append(
                    f"{head} {len(rows)} layers; usage entropy mean {sum(entropies) / len(entropies):.3f}, lowest "
                    f"{entropies[worst]:.3f} at layer {rows[worst]['layer']}."
                )
                if method == "molex":
                    lines.append(
                        "  chosen expert layers: "
                        + "; ".join(f"{row['layer']} -> {row.get('chosen')}" for row in rows)
                    )
            elif method == "mod" and isinstance(payload, dict):
                weights = ", ".join(
                    f"{layer}: {weight:.3f}"
                    for layer, weight in zip(payload.get("layers", []), payload.get("mean_weight", []))
                )
                lines.append(f"{head} gate {payload.get('gate')}; mean router weights {weights}.")
            elif method == "dlo" and isinstance(payload, dict):
                fraction = payload.get("executed_fraction")
                lines.append(
                    f"{head} executed fraction {fraction:.3f} overall; per layer "
                    + ", ".join(f"{row['layer']}: {row.get('executed_fraction', math.nan):.2f}" for row in rows)
                    + "."
                )
            else:
                lines.append(f"{head} {len(rows)} layer rows (see routing.json).")
    return "\n".join(lines) + ("\n" if lines else "")


def run_inspect(options: InspectOptions, log=print) -> dict[str, Any]:
    """Run the inspection and write ``routing.json``, ``summary.txt`` and heatmaps into ``options.output_dir``."""
    import torch

    from ..core.aux import routing_stats

    base_path = resolve_base(options.adapter, options.base)
    tokenizer_source = options.tokenizer
    if tokenizer_source is None and any(
        (Path(options.adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        tokenizer_source = options.adapter
    tokenizer = load_tokenizer(base_path, tokenizer_source)
    texts = load_texts(
        options.dataset, options.num_samples, text_field=options.text_field, split=options.split, seed=options.seed
    )
    batches = make_batches(texts, tokenizer, options.batch_size, options.max_length)
    if not batches:
        raise AnalysisError("The tokenizer produced no tokens for the chosen texts.")
    output_dir = output_folder(options.output_dir)
    device = pick_device(options.device)
    model = load_adapter_model(options.adapter, base_path, device)
    check_batches_fit(batches, model, options.max_length)
    accumulator = RoutingAccumulator()
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad(), _progress(len(batches), options.progress, "inspect") as bar:
        for batch in batches:
            model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                use_cache=False,
            )
            accumulator.add(routing_stats(model))
            tokens += int(batch.attention_mask.sum())
            bar.update(1)
    seconds = time.perf_counter() - start
    merged = accumulator.result()
    if not merged:
        config = _adapter_config(options.adapter)
        if config.get("peft_type") == "DLO" and config.get("routed_layers") == "none":
            raise AnalysisError(
                f"The DLO adapter in {options.adapter!r} is a dense expansion (routed_layers='none'): every layer runs "
                "on every token, so there is no routing to show."
            )
        raise AnalysisError(
            f"The adapter in {options.adapter!r} reported no routing statistics; inspect shows MoLA, MoLEx, MoD and "
            "DLO adapters (a plain LoRA adapter has no routing)."
        )
    report = {
        "adapter": options.adapter,
        "base_model": base_path,
        "dataset": options.dataset or "boolq",
        "counts": {"sequences": len(texts), "tokens": tokens, "forwards": accumulator.num_forwards},
        "seconds": seconds,
        "routing": merged,
    }
    json_path = output_dir / "routing.json"
    write_json(json_path, report)
    summary = summarize_routing(merged)
    (output_dir / "summary.txt").write_text(summary, encoding="utf-8")
    plots = plot_routing(merged, output_dir)
    log(summary.rstrip())
    log(f"Wrote {json_path} and {len(plots)} heatmaps in {output_dir}.")
    report["files"] = {"json": str(json_path), "summary": str(output_dir / "summary.txt"), **plots}
    return report
