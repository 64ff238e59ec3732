"""Routing and skip plots for model cards, drawn from ``peft_depth.routing_stats(model)`` of the last forward.

Run a representative batch through the model (eval mode), then::

    plots = peft_depth.hub.save_routing_plots(model, "plots_dir")
    peft_depth.hub.set_card_info(model, plots=plots)

Needs matplotlib (the ``examples`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.aux import routing_stats

__all__ = ["save_routing_plots"]


def _figures(stats: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(title, kind, data)`` per plottable block of the stats, recognised by shape rather than by method name."""
    out = []
    for method, per_adapter in stats.items():
        for adapter, block in per_adapter.items():
            label = f"{method} ({adapter})"
            if (
                isinstance(block, list)
                and block
                and all(isinstance(r, dict) and "expert_fraction" in r for r in block)
            ):
                rows = [(r["layer"], r["expert_fraction"]) for r in block]
                out.append((f"Expert usage per layer, {label}", "heatmap", rows))
            elif isinstance(block, dict) and "mean_weight" in block and "layers" in block:
                out.append(
                    (
                        f"Mean routing weight per late layer, {label}",
                        "bars",
                        (block["layers"], block["mean_weight"], None),
                    )
                )
            elif (
                isinstance(block, dict)
                and isinstance(block.get("layers"), list)
                and block["layers"]
                and all(isinstance(r, dict) and "executed_fraction" in r for r in block["layers"])
            ):
                rows = block["layers"]
                out.append(
                    (
                        f"Executed fraction per layer (1 - skip rate), {label}",
                        "bars",
                        (
                            [r["layer"] for r in rows],
                            [r["executed_fraction"] for r in rows],
                            [bool(r.get("new")) for r in rows],
                        ),
                    )
                )
    return out


def save_routing_plots(model: nn.Module, folder: str | os.PathLike) -> dict[str, str]:
    """Write one PNG per routing block of the last forward into ``folder``; returns ``{title: path}``.

    Raises ValueError when the last forward left no routing statistics (run a batch first).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is in the examples extra
        raise ImportError("save_routing_plots needs matplotlib: pip install 'peft-depth[examples]'") from error

    figures = _figures(routing_stats(model))
    if not figures:
        raise ValueError("No routing statistics to plot: run a forward pass through the adapted model first.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for index, (title, kind, data) in enumerate(figures):
        figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
        if kind == "heatmap":
            width = max(len(fractions) for _, fractions in data)
            grid = [list(fractions) + [float("nan")] * (width - len(fractions)) for _, fractions in data]
            image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
            axis.set_yticks(range(len(data)), [str(layer) for layer, _ in data])
            axis.set_xticks(range(width))
            axis.set_xlabel("expert")
            axis.set_ylabel("layer")
            figure.colorbar(image, ax=axis, label="fraction of tokens")
        else:
            layers, values, new = data
            colors = ["tab:orange" if flag else "tab:blue" for flag in new] if new is not None else "tab:blue"
            axis.bar([str(layer) for layer in layers], values, color=colors)
            axis.set_ylim(0, 1)
            axis.set_xlabel("layer" + (" (orange: inserted layers)" if new is not None and any(new) else ""))
        axis.set_title(title, fontsize=9)
        figure.tight_layout()
        path = folder / f"routing_{index}.png"
        figure.savefig(path)
        plt.close(figure)
        written[title] = str(path)
    return written
