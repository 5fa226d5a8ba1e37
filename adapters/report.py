"""Analyses for people: a text report (``loraplex analyze PATH``) and a self-contained HTML page.

:func:`format_report` turns any analysis document into the summary and per-layer table the CLI
prints; :func:`render_html` builds the page served at ``GET /adapters/{id}/analysis.html``
(figures inlined as base64 PNG, so the file stands alone). Analysing an adapter directory against
a model loaded in this process is ``server.analyze_local`` (it loads the base model).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

# (header, explanation) of each per-layer column, shared by the text table and the HTML page.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("module", "adapted module"),
    ("shape", "ΔW shape [out, in]"),
    ("r", "LoRA rank"),
    ("‖ΔW‖_F", "Frobenius norm of the update s·B·A"),
    ("σ1", "largest singular value of ΔW"),
    ("σ1/σmax(W)", "σ1 against the base weight's spectral norm"),
    ("amplif.", "amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F (LoRA paper §7)"),
    ("align", "φ(ΔW, W): overlap with the base weight's top-r left singular subspace (0..1)"),
    ("eff.rank", "effective rank exp(entropy of σ/Σσ) (r for a flat spectrum, 1 for a single direction)"),
    ("stable", "stable rank ‖ΔW‖_F² / σ1²"),
    ("E90", "components holding 90% of the energy Σσ²"),
    ("rec.", "recommended rank, sv_fro at 0.9 (minimal)"),
)


# --------------------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def layer_cells(row: dict[str, Any]) -> list[str]:
    """One per-layer table row, as strings, in :data:`COLUMNS` order."""
    ratios = row["sval_ratios"]
    return [
        row["module"],
        "x".join(str(n) for n in row["shape"]),
        str(row["rank"]),
        fmt(row["delta_fro"]),
        fmt(row["delta_spectral"]),
        fmt(ratios[0] if ratios else None),
        fmt(row["amplification_factor"]),
        fmt(row["base_alignment"]),
        fmt(row["effective_rank"]),
        fmt(row["stable_rank"]),
        fmt(row["energy_rank"].get("0.9")),
        fmt(row["recommended_rank"].get("sv_fro")),
    ]


def summary_lines(result: dict[str, Any]) -> list[tuple[str, str]]:
    s = result["summary"]
    recommended = ", ".join(f"{m} {fmt(r)}" for m, r in s["recommended_rank"].items()) or "n/a"
    return [
        (
            "adapter",
            f"{result['adapter_id']} (rank {result['rank']}, lora_alpha {fmt(result['lora_alpha'])})",
        ),
        ("layers", str(s["layers"])),
        ("total ‖ΔW‖_F", fmt(s["total_delta_fro"])),
        ("mean effective rank", fmt(s["mean_effective_rank"])),
        ("median amplification factor", fmt(s["median_amplification_factor"])),
        ("max σ_i / σ_max(W)", fmt(s["max_sval_ratio"])),
        ("recommended rank (max over layers)", recommended),
    ]


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_report(result: dict[str, Any]) -> str:
    """The summary and the per-layer table as plain text (what ``loraplex analyze`` prints)."""
    pad = max(len(k) for k, _ in summary_lines(result))
    lines = [f"{key.ljust(pad)}  {value}" for key, value in summary_lines(result)]
    table = _text_table([h for h, _ in COLUMNS], [layer_cells(r) for r in result["layers"]])
    legend = "\n".join(f"  {h:11s} {text}" for h, text in COLUMNS[3:])
    return "\n".join(lines) + "\n\n" + table + "\n\ncolumns:\n" + legend + "\n"


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1500px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f0f0f0; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { display: inline-block; margin: 0 1em 1em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
dl.legend dt { font-weight: bold; float: left; width: 9em; } dl.legend dd { margin-left: 10em; }
"""
_CAPTIONS = {
    "spectra": "Singular values of ΔW, normalised by the largest: a trained adapter's fall off "
    "quickly, a random one's stay flat.",
    "ratio_heatmap": "Largest singular value of ΔW against the spectral norm of the base weight it modifies.",
    "effective_rank": "Effective rank per layer; the dashed line is the adapter's rank.",
}


def render_html(result: dict[str, Any], figures: dict[str, bytes]) -> str:
    """A self-contained page: summary, figures (PNG bytes by name, inlined as base64), layer table."""
    esc = html.escape
    title = f"LoRA analysis: {result['adapter_id']}"
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_lines(result))
    images = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(_CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, png in figures.items()
    )
    head = "".join(f'<th title="{esc(text)}">{esc(h)}</th>' for h, text in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td{'' if i < 2 else ' class=num'}>{esc(c)}</td>" for i, c in enumerate(layer_cells(row)))
        + "</tr>"
        for row in result["layers"]
    )
    legend = "".join(f"<dt>{esc(h)}</dt><dd>{esc(text)}</dd>" for h, text in COLUMNS[2:])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<table class="summary">{summary}</table>
<h2>Figures</h2>
{images}
<h2>Per-layer diagnostics</h2>
<table class="layers"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Columns</h2>
<dl class="legend">{legend}</dl>
<p>Exact SVD of ΔW = s·B·A from its factors (QR of B and Aᵀ, SVD of the r×r core); formulas in
docs/analysis.md in the loraplex repository. JSON: <code>GET /adapters/{esc(result["adapter_id"])}/analysis</code>.</p>
</body></html>
"""
