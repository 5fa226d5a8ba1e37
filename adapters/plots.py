"""Figures of an adapter analysis (the dict :func:`adapters.analysis.analyze` returns), as PNG bytes.

Three panels:

1. singular-value spectra by module type: σ_i / σ_1 against i, one thin line per layer and the
   median in bold (log scale: a trained adapter's spectrum falls off, a random one stays flat);
2. heatmap of σ_1 / σ_max(W) over layers × module types: where the update is large next to the
   base weight it modifies;
3. effective rank per layer, one line per module type, against the adapter's rank.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas, never through pyplot:
pyplot keeps global state and is not safe from the worker threads the server renders in.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adapters.analysis import layer_index, module_type, natural_key

_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")  # fmt: skip
Rows = list[dict[str, Any]]


def _types(rows: Rows) -> list[str]:
    found = {module_type(r["module"]) for r in rows}
    known = [t for t in _TYPE_ORDER if t in found]
    return known + sorted(found - set(known))


def _color(types: list[str], t: str) -> str:
    return _COLORS[types.index(t) % len(_COLORS)]


def _positions(rows: Rows) -> dict[str, int]:
    """x position per module: its layer index, or its rank in model order when names carry none."""
    if all(layer_index(r["module"]) is not None for r in rows):
        return {r["module"]: layer_index(r["module"]) for r in rows}  # type: ignore[misc]
    ordered = sorted({r["module"] for r in rows}, key=natural_key)
    return {m: i for i, m in enumerate(ordered)}


def _empty(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no layers selected", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


# --------------------------------------------------------------------------- panels


def draw_spectra(ax: Axes, rows: Rows) -> None:
    """σ_i / σ_1 per layer (thin) and the median per module type (bold), log scale."""
    title = "singular-value spectra by module type"
    if not rows:
        return _empty(ax, title)
    types = _types(rows)
    for t in types:
        curves = []
        for r in rows:
            S = np.asarray(r["singular_values"], dtype=float)
            if module_type(r["module"]) != t or S.size == 0 or S[0] <= 0:
                continue
            curve = np.maximum(S / S[0], 1e-6)  # [n]; floor keeps exact zeros on a log axis
            curves.append(curve)
            ax.plot(np.arange(1, S.size + 1), curve, color=_color(types, t), alpha=0.18, linewidth=0.8)
        if curves:
            n = max(c.size for c in curves)
            padded = np.full((len(curves), n), np.nan)
            for i, c in enumerate(curves):
                padded[i, : c.size] = c
            ax.plot(np.arange(1, n + 1), np.nanmedian(padded, axis=0), color=_color(types, t), linewidth=2.2,
                    marker="o", markersize=3, label=f"{t} (median of {len(curves)})")  # fmt: skip
    ax.set_yscale("log")
    # At least two decades shown, so a flat (random) spectrum looks flat next to a decaying one.
    low = min([1e-2, *(float(np.min(line.get_ydata())) / 2 for line in ax.get_lines())])
    ax.set_ylim(low, 1.5)
    ax.set_xlabel("component i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def draw_ratio_heatmap(fig: Figure, ax: Axes, rows: Rows) -> None:
    """σ_1 / σ_max(W) on a grid of module types (rows) × layers (columns), with a colour bar."""
    title = "σ₁(ΔW) / σ_max(W) by layer and module"
    if not rows:
        return _empty(ax, title)
    types = _types(rows)
    pos = _positions(rows)
    columns = sorted(set(pos.values()))
    grid = np.full((len(types), len(columns)), np.nan)  # [types, layers]
    for r in rows:
        ratio = r["sval_ratios"][0] if r["sval_ratios"] else None
        if ratio is not None:
            grid[types.index(module_type(r["module"])), columns.index(pos[r["module"]])] = ratio
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(types)), types, fontsize=8)
    step = max(1, math.ceil(len(columns) / 16))
    ax.set_xticks(range(0, len(columns), step), [str(c) for c in columns[::step]], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.85)


def draw_effective_rank(ax: Axes, rows: Rows, rank: int) -> None:
    """Effective rank (Roy & Vetterli) per layer, one line per module type; dashed: the adapter's rank."""
    title = "effective rank per layer"
    if not rows:
        return _empty(ax, title)
    types = _types(rows)
    pos = _positions(rows)
    for t in types:
        points = sorted(
            (pos[r["module"]], r["effective_rank"])
            for r in rows
            if module_type(r["module"]) == t and r["effective_rank"] is not None
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color=_color(types, t), marker="o", markersize=3, linewidth=1.2, label=t)
    ax.axhline(rank, color="gray", linestyle="--", linewidth=1, label=f"rank r = {rank}")
    ax.set_ylim(0, rank * 1.08 + 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)


# --------------------------------------------------------------------------- figures


def _headline(result: dict[str, Any]) -> str:
    summary = result["summary"]
    eff = summary.get("mean_effective_rank")
    eff_text = f"{eff:.2f}" if eff is not None else "n/a"
    return (
        f"{result['adapter_id']}: rank {result['rank']}, {summary['layers']} layers, "
        f"mean effective rank {eff_text}"
    )


def analysis_figure(result: dict[str, Any]) -> Figure:
    """All three panels side by side, titled with the adapter's id, rank and mean effective rank."""
    fig = Figure(figsize=(18, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    spectra, heatmap, eff = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.25, 1]})
    rows = result["layers"]
    draw_spectra(spectra, rows)
    draw_ratio_heatmap(fig, heatmap, rows)
    draw_effective_rank(eff, rows, int(result["rank"]))
    fig.suptitle(_headline(result))
    return fig


def panel_figures(result: dict[str, Any]) -> dict[str, Figure]:
    """The three panels as separate figures (for the HTML page), by name."""
    rows = result["layers"]
    figures: dict[str, Figure] = {}
    for name, width in (("spectra", 7.0), ("ratio_heatmap", 9.0), ("effective_rank", 7.0)):
        fig = Figure(figsize=(width, 4.4), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        if name == "spectra":
            draw_spectra(ax, rows)
        elif name == "ratio_heatmap":
            draw_ratio_heatmap(fig, ax, rows)
        else:
            draw_effective_rank(ax, rows, int(result["rank"]))
        figures[name] = fig
    return figures


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def analysis_png(result: dict[str, Any]) -> bytes:
    """``GET /adapters/{id}/analysis.png``: :func:`analysis_figure` as PNG bytes."""
    return to_png(analysis_figure(result))


def panel_pngs(result: dict[str, Any]) -> dict[str, bytes]:
    return {name: to_png(fig) for name, fig in panel_figures(result).items()}
