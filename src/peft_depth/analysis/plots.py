"""PNG plots of the layer analysis and of adapter routing, drawn with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas directly, so nothing touches the
global pyplot backend (safe inside notebooks and training scripts).
"""

from __future__ import annotations

import math
from pathlib import Path

from .layers import LayerAnalysis

__all__ = ["heatmap", "plot_layer_analysis"]

_DPI = 100


def _figure(width: float, height: float, rows: int = 1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is an optional dependency
        from .errors import AnalysisError

        raise AnalysisError(
            "Plots need matplotlib: pip install 'peft-depth[examples]' (or pip install matplotlib)."
        ) from error
    # constrained layout is solved during the one draw savefig does (tight_layout would draw a second time)
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, sharex=rows > 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=_DPI)
    return path


def _draw_similarity(ax, analysis: LayerAnalysis) -> None:
    layers = list(range(analysis.num_layers))
    ax.plot(layers, analysis.cosine, marker="o", color="tab:blue", label="cosine(input, output)")
    ax.plot(
        layers,
        analysis.redundant_fraction,
        marker=".",
        linestyle="--",
        color="tab:gray",
        label=f"tokens with cosine >= {analysis.redundancy_threshold}",
    )
    ax.set_ylabel("redundancy")
    ax.set_ylim(min(0.0, min(analysis.cosine) - 0.05), 1.02)
    ax.legend(loc="lower center", fontsize=8)
    ax.grid(alpha=0.3)


def _draw_update(ax, analysis: LayerAnalysis) -> None:
    ax.bar(range(analysis.num_layers), analysis.relative_update, color="tab:orange")
    ax.set_ylabel("||out - in|| / ||in||")
    ax.set_yscale("log")  # layer 0 (embeddings -> residual stream) is often 10-100x the others
    ax.grid(alpha=0.3, axis="y")


def _draw_lens(ax, analysis: LayerAnalysis) -> None:
    # x = -1 is the embedding output (the input of block 0)
    xs = [-1, *range(analysis.num_layers)]
    accuracy = [analysis.embedding.get("lens_accuracy", math.nan), *analysis.lens_accuracy]
    loss = [analysis.embedding.get("lens_loss", math.nan), *analysis.lens_loss]
    ax.plot(xs, accuracy, marker="o", color="tab:green", label="next-token accuracy")
    ax.set_ylabel("logit-lens accuracy", color="tab:green")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, loss, marker=".", color="tab:red", label="loss")
    twin.set_ylabel("logit-lens loss (log scale)", color="tab:red")
    twin.set_yscale("log")  # the raw lens is badly calibrated: embedding-layer losses can be 10x the final one


def plot_layer_analysis(analysis: LayerAnalysis, output_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write ``overview.png`` (all three panels), ``redundancy.png``, ``update_norm.png`` and ``logit_lens.png``."""
    output_dir = Path(output_dir)
    written: dict[str, Path] = {}
    figure, axes = _figure(8, 9, rows=3)
    _draw_similarity(axes[0], analysis)
    _draw_update(axes[1], analysis)
    _draw_lens(axes[2], analysis)
    axes[0].set_title(title or "Per-layer analysis")
    axes[2].set_xlabel("layer (-1: embeddings)")
    written["overview"] = _save(figure, output_dir / "overview.png")
    for name, draw in (("redundancy", _draw_similarity), ("update_norm", _draw_update), ("logit_lens", _draw_lens)):
        figure, (ax,) = _figure(8, 3.5)
        draw(ax, analysis)
        ax.set_xlabel("layer" if name != "logit_lens" else "layer (-1: embeddings)")
        if title:
            ax.set_title(title)
        written[name] = _save(figure, output_dir / f"{name}.png")
    return written


def heatmap(
    values: list[list[float]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xticklabels: list[str] | None = None,
    yticklabels: list[str] | None = None,
    colorbar_label: str = "",
    annotate: bool | None = None,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Save a heatmap of ``values`` (ragged rows are padded with blank NaN cells) to ``path``.

    ``value_range`` fixes the colour scale (e.g. ``(0, 1)`` for fractions, so that plots are comparable)."""
    rows, cols = len(values), max((len(r) for r in values), default=0)
    grid = [[(r[c] if c < len(r) and r[c] is not None else math.nan) for c in range(cols)] for r in values]
    figure, (ax,) = _figure(min(max(6.0, 2.5 + 0.45 * cols), 16), min(max(2.6, 1.6 + 0.32 * rows), 14))
    vmin, vmax = value_range if value_range is not None else (None, None)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
    bar = figure.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(cols))
    ax.set_xticklabels(xticklabels if xticklabels is not None else [str(c) for c in range(cols)], fontsize=7)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(yticklabels if yticklabels is not None else [str(r) for r in range(rows)], fontsize=7)
    if annotate if annotate is not None else rows * cols <= 80:
        for r in range(rows):
            for c in range(cols):
                if not math.isnan(grid[r][c]):
                    # dark text on the bright end of viridis, white on the dark end
                    bright = image.norm(grid[r][c]) > 0.6
                    ax.text(
                        c,
                        r,
                        f"{grid[r][c]:.2f}",
                        ha="center",
                        va="center",
                        color="black" if bright else "white",
                        fontsize=7,
                    )
    return _save(figure, Path(path))
