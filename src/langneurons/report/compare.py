"""Figures and the self-contained HTML page of a base-vs-aligned comparison.

Figures are drawn on bare `matplotlib.figure.Figure` objects with the Agg canvas (no pyplot,
so no global backend switch) and written as PNG + SVG into OUT/figures/. The page OUT/compare.html
embeds the PNGs as base64 data URIs and carries its CSS inline, so it opens anywhere without a
network or the figures folder. Colours: Okabe–Ito (colour-blind safe); heatmap: cividis.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from ..io import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..compare import Comparison

COLORS = {"specific": "#E69F00", "related": "#0072B2", "general": "#009E73", "unassigned": "#999999",
          "specific,related": "#CC79A7", "other": "#999999"}
RUN_COLORS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]
PHASE_SHADES = ("#EFEFEF", "#DADADA")
DPI = 120


# -- figure helpers ------------------------------------------------------------------------------
def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple["Figure", Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig: "Figure", directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``name``.png and ``name``.svg (SVG without a date, with a fixed id salt: reproducible)."""
    import matplotlib

    directory = Path(directory)
    png, svg = directory / f"{name}.png", directory / f"{name}.svg"
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=DPI))
    with matplotlib.rc_context({"svg.hashsalt": "langneurons"}):
        atomic_write(svg, lambda p: fig.savefig(p, format="svg", metadata={"Date": None}))
    return png, svg


def _integer_layers(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _shade_phases(ax: Any, phases: list[dict[str, Any]] | None, label: bool) -> None:
    for i, ph in enumerate(phases or []):
        ax.axvspan(ph["start"] - 0.5, ph["end"] + 0.5, color=PHASE_SHADES[i % 2], zorder=0, lw=0)
        if label:
            ax.text((ph["start"] + ph["end"]) / 2, 1.0, ph["name"], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, color="#555555", clip_on=False)


def plot_layer_delta(comp: "Comparison") -> "Figure":
    """One panel per class: Δ count per layer (last − first run), first run's phases shaded."""
    from ..compare import COUNT_CLASSES

    labels = comp.labels
    df = comp.layer_counts
    fig, axes = _new_figure(8, 1.9 * len(COUNT_CLASSES), len(COUNT_CLASSES), 1, sharex=True)
    for row, cls in enumerate(COUNT_CLASSES):
        ax = axes[row, 0]
        sub = df[df["class"] == cls].sort_values("layer")
        _shade_phases(ax, comp.phases, label=row == 0)
        ax.bar(sub["layer"], sub["delta"], color=COLORS[cls], zorder=2)
        ax.axhline(0, color="black", lw=0.6, zorder=3)
        ax.set_ylabel(f"Δ {cls}")
        ax.grid(axis="y", alpha=0.3, zorder=1)
    axes[-1, 0].set_xlabel("layer")
    _integer_layers(axes[-1, 0])
    fig.suptitle(f"Change per layer: {labels[-1]} − {labels[0]}" + ("  (shaded: phases of the first run)"
                                                                     if comp.phases else ""), fontsize=10)
    return fig


def plot_appear(comp: "Comparison") -> "Figure":
    """appear[N] for N = 1..K, the runs' bars side by side."""
    labels = comp.labels
    df = comp.appear[comp.appear["N"] >= 1]
    fig, axes = _new_figure(7, 3.2)
    ax = axes[0, 0]
    width = 0.8 / len(labels)
    x = df["N"].to_numpy(dtype=float)
    for i, label in enumerate(labels):
        ax.bar(x - 0.4 + width * (i + 0.5), df[label], width, label=label, color=RUN_COLORS[i % len(RUN_COLORS)])
    ax.set_xticks(df["N"].tolist())
    ax.set_xlabel("N = number of languages a selected neuron is active in")
    ax.set_ylabel("selected neurons")
    ax.legend(fontsize=8)
    ax.set_title("appear histogram", fontsize=10)
    return fig


def plot_transition(comp: "Comparison") -> "Figure":
    """Row-normalised heatmap (share of the first run's class), annotated with counts."""
    labels = comp.labels
    mat = comp.transition_matrix(labels[-1])
    counts = mat.to_numpy()
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    fig, axes = _new_figure(5.4, 4.4)
    ax = axes[0, 0]
    im = ax.imshow(share, cmap="cividis", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(mat.columns)), list(mat.columns))
    ax.set_yticks(range(len(mat.index)), list(mat.index))
    ax.set_xlabel(f"class in {labels[-1]}")
    ax.set_ylabel(f"class in {labels[0]}")
    fig.colorbar(im, ax=ax, label="share of the row")
    ax.set_title("Neuron class transitions", fontsize=10)
    return fig


def plot_overlap(comp: "Comparison") -> "Figure":
    """Per language: |A∩B|/|A| and Jaccard of the neuron sets (no bar where undefined)."""
    labels = comp.labels
    ov = comp.overlap[comp.overlap["run_b"] == labels[-1]]
    langs = list(dict.fromkeys(ov["language"]))
    classes = ["specific", "related", "specific,related"]
    fig, axes = _new_figure(max(6, 0.7 * len(langs) + 3), 5, 2, 1, sharex=True)
    width = 0.8 / len(classes)
    x = np.arange(len(langs), dtype=float)
    for row, (col, title) in enumerate((("overlap_a", f"|A∩B| / |A|  (A = {labels[0]})"), ("jaccard", "Jaccard"))):
        ax = axes[row, 0]
        for i, cls in enumerate(classes):
            sub = ov[ov["class"] == cls].set_index("language").reindex(langs)
            ax.bar(x - 0.4 + width * (i + 0.5), sub[col].to_numpy(dtype=float), width, label=cls, color=COLORS[cls])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncols=3)
    axes[-1, 0].set_xticks(x, langs)
    fig.suptitle(f"Overlap of each language's neurons: {labels[0]} vs {labels[-1]}", fontsize=10)
    return fig


def plot_alignment(comp: "Comparison") -> "Figure":
    """Per language Δ specific+related, trained languages highlighted, group means as lines."""
    labels = comp.labels
    al = comp.alignment[(comp.alignment["run_b"] == labels[-1]) & (comp.alignment["class"] == "specific,related")]
    fig, axes = _new_figure(max(6, 0.6 * len(al) + 3), 3.2)
    ax = axes[0, 0]
    colors = [COLORS["specific"] if t else COLORS["unassigned"] for t in al["trained"]]
    ax.bar(range(len(al)), al["delta"], color=colors)
    ax.axhline(0, color="black", lw=0.6)
    sm = comp.alignment_summary
    sm = sm[(sm["run_b"] == labels[-1]) & (sm["class"] == "specific,related")]
    for _, r in sm.iterrows():
        if not math.isnan(r["mean_delta"]):
            color = COLORS["specific"] if r["group"] == "trained" else "#555555"
            ax.axhline(r["mean_delta"], color=color, ls="--", lw=1, label=f"mean {r['group']}: {r['mean_delta']:+.1f}")
    ax.set_xticks(range(len(al)), [f"{lang}*" if t else lang for lang, t in zip(al["language"], al["trained"])])
    ax.set_ylabel("Δ specific+related")
    if len(sm):
        ax.legend(fontsize=8)
    ax.set_title(f"Per-language change, {labels[-1]} − {labels[0]}  (* = trained language)", fontsize=10)
    return fig


def plot_trajectory(comp: "Comparison") -> "Figure":
    """One panel per class: Δ per layer relative to the first run, one line per later run."""
    from ..compare import COUNT_CLASSES

    tr = comp.trajectory
    labels = comp.labels
    fig, axes = _new_figure(8, 1.9 * len(COUNT_CLASSES), len(COUNT_CLASSES), 1, sharex=True)
    for row, cls in enumerate(COUNT_CLASSES):
        ax = axes[row, 0]
        _shade_phases(ax, comp.phases, label=row == 0)
        for i, label in enumerate(labels[1:], start=1):
            sub = tr[(tr["class"] == cls) & (tr["run_index"] == i)].sort_values("layer")
            ax.plot(sub["layer"], sub["delta"], marker="o", ms=3, label=label,
                    color=RUN_COLORS[i % len(RUN_COLORS)], zorder=2)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel(f"Δ {cls}")
    axes[0, 0].legend(fontsize=7, ncols=min(4, len(labels) - 1))
    axes[-1, 0].set_xlabel("layer")
    _integer_layers(axes[-1, 0])
    fig.suptitle(f"Trajectory: change per layer relative to {labels[0]}", fontsize=10)
    return fig


#: (name, title, plotter, when) — ``when`` says whether the figure applies to this comparison
FIGURES: list[tuple[str, str, Callable[["Comparison"], "Figure"], Callable[["Comparison"], bool]]] = [
    ("layer_delta", "Δ neurons per layer and class", plot_layer_delta, lambda c: True),
    ("appear", "appear histograms", plot_appear, lambda c: True),
    ("transition", "class transition heatmap", plot_transition, lambda c: True),
    ("overlap", "per-language overlap", plot_overlap, lambda c: True),
    ("alignment", "per-language change (alignment)", plot_alignment, lambda c: not c.alignment.empty),
    ("trajectory", "trajectory over the series", plot_trajectory, lambda c: len(c.labels) > 2),
]


def write_compare_figures(comp: "Comparison", out_dir: str | Path) -> dict[str, Path]:
    """Write every applicable figure to OUT/figures/compare_<name>.{png,svg}; return {name: png}."""
    fig_dir = Path(out_dir) / "figures"
    out = {}
    for name, _, plot, when in FIGURES:
        if not when(comp):
            continue
        fig = plot(comp)
        png, _svg = save_figure(fig, fig_dir, f"compare_{name}")
        out[name] = png
    return out


# -- HTML ----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ddd;padding:.2em .5em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.note{background:#fff8e1;border-left:4px solid #E69F00;padding:.4em .8em;
margin:.4em 0}.warn{background:#fdecea;border-left:4px solid #D55E00;padding:.4em .8em;margin:.4em 0}
ul.summary li{margin:.3em 0}code{background:#f4f4f4;padding:0 .2em}
nav a{margin-right:.8em;font-size:.9em}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(png: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(df: pd.DataFrame, max_rows: int = 400) -> str:
    if df.empty:
        return '<p class="note">(empty)</p>'
    shown = df.head(max_rows)
    text = shown.to_html(index=False, border=0, na_rep="n/a", escape=True,
                         float_format=lambda v: f"{v:.4g}")
    if len(df) > max_rows:
        text += f'<p class="note">first {max_rows} of {len(df)} rows; the full table is in the CSV/Parquet file</p>'
    return text


def _layer_view(comp: "Comparison") -> pd.DataFrame:
    """Wide per-layer view for the page: first, last and Δ of every class."""
    from ..compare import COUNT_CLASSES

    a, b = comp.labels[0], comp.labels[-1]
    df = comp.layer_counts
    out = pd.DataFrame({"layer": sorted(df["layer"].unique())})
    for cls in COUNT_CLASSES:
        sub = df[df["class"] == cls].set_index("layer").reindex(out["layer"])
        out[f"{cls} {a}"] = sub[a].to_numpy()
        out[f"{cls} {b}"] = sub[b].to_numpy()
        out[f"{cls} Δ"] = sub["delta"].to_numpy()
    return out


def _section(name: str, title: str, body: str) -> str:
    return f'<section id="section-{name}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def build_compare_report(comparison: "Comparison", out_dir: str | Path) -> Path:
    """Write the figures and OUT/compare.html (self-contained); return the page's path."""
    comp = comparison
    out_dir = Path(out_dir)
    figs = write_compare_figures(comp, out_dir)
    s = comp.summary
    labels = comp.labels
    a, b = labels[0], labels[-1]

    def fig(name: str, caption: str) -> str:
        title = next(t for n, t, _, _ in FIGURES if n == name)
        return _img(figs[name], f"{title}: {a} vs {b}", caption) if name in figs else ""

    sections: list[tuple[str, str, str]] = []
    items = "".join(f"<li>{_esc(t)}</li>" for t in s.get("text", []))
    sections.append(("summary", "Summary", f'<ul class="summary">{items}</ul>'))

    checks = "".join(f'<p class="warn">{_esc(w)}</p>' for w in s.get("warnings", []))
    checks += "".join(f'<p class="note">{_esc(n)}</p>' for n in s.get("notes", []))
    checks = checks or "<p>All runs share languages, neuron shape, token scope, method and thresholds.</p>"
    sections.append(("runs", "Runs and comparability",
                     f"<p>Reference (first) run: <b>{_esc(a)}</b>; every Δ is later − first. λ policy: "
                     f"<code>{_esc(s.get('lambda_policy'))}</code>.</p>" + checks + _table(comp.runs)))

    sections.append(("layers", "Neurons per layer and class",
                     fig("layer_delta", f"Bars: count in {b} minus count in {a}, per layer; shaded bands are the "
                         f"phases found in {a}'s anatomy (if any).") + _table(_layer_view(comp))))
    sections.append(("appear", "Appear histogram",
                     fig("appear", "Selected neurons by the number of languages they are active in.")
                     + _table(comp.appear)))
    mat = comp.transition_matrix(b).reset_index().rename(columns={"from": f"{a} \\ {b}"})
    mat.columns.name = None
    sections.append(("transition", "Class transitions",
                     "<p>Every one of the L·N neurons, counted by its class in the first run (rows) and in the "
                     "last run (columns); <i>other</i> = not selected, or selected but active in no language.</p>"
                     + fig("transition", "Colour: share of the row; numbers: neuron counts.") + _table(mat)))
    ov = comp.overlap[comp.overlap["run_b"] == b]
    sections.append(("overlap", "Per-language overlap",
                     "<p>overlap_a = |A∩B| / |A|: the share of the first run's neurons of a language that are "
                     "still that language's neurons (same class) in the last run; NaN (n/a) when A is empty. "
                     "Jaccard = |A∩B| / |A∪B|, n/a when both are empty.</p>"
                     + fig("overlap", "Bars are missing where the value is undefined.") + _table(ov)))
    trained = s.get("trained_langs") or []
    align_intro = (f"<p>Trained languages: <b>{_esc(','.join(trained))}</b> (from {_esc(s.get('trained_langs_source'))}"
                   ").</p>" if trained else
                   '<p class="note">No trained languages given (--trained-langs, or manifest key '
                   "align.trained_langs): the means are over all languages.</p>")
    sections.append(("alignment", "Spontaneous multilingual alignment",
                     align_intro + fig("alignment", "Change of specific+related neurons per language.")
                     + _table(comp.alignment_summary)
                     + _table(comp.alignment[comp.alignment["run_b"] == b])))
    metrics_body = ("<p>Mean of the un-ablated value (ablation.parquet column <code>base</code>) per evaluation "
                    "language and metric, in both runs.</p>" + _table(comp.metrics_summary) + _table(comp.metrics)
                    if not comp.metrics.empty else
                    '<p class="note">No metric is present in both runs\' ablation.parquet.</p>')
    sections.append(("metrics", "Metrics", metrics_body))
    sections.append(("pivot", f"Pivot ({s.get('pivot')}) vs other languages",
                     _table(comp.pivot) if not comp.pivot.empty else
                     f'<p class="note">The pivot {_esc(s.get("pivot"))} is not among the languages.</p>'))
    if len(labels) > 2:
        totals = comp.trajectory.groupby(["run_index", "run", "class"], sort=False)[["count", "delta"]].sum()
        sections.append(("trajectory", "Checkpoint trajectory",
                         fig("trajectory", f"Per-layer change relative to {a}, one line per later run.")
                         + _table(totals.reset_index())))
    sections.append(("tables", "Tables",
                     "<p>Every table is written as Parquet and CSV under <code>tables/</code> next to this page ("
                     + ", ".join(f"<code>{_esc(n)}</code>" for n in comp.TABLES)
                     + "), with <code>summary.json</code>.</p>"))

    nav = "<nav>" + "".join(f'<a href="#section-{n}">{_esc(t)}</a>' for n, t, _ in sections) + "</nav>"
    body = "\n".join(_section(n, t, b_) for n, t, b_ in sections)
    title = f"langneurons comparison: {' → '.join(labels)}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>{nav}\n{body}\n</body></html>\n")
    path = out_dir / "compare.html"
    atomic_write_text(path, page)
    return path


__all__ = ["build_compare_report", "write_compare_figures", "plot_layer_delta", "plot_appear", "plot_transition",
           "plot_overlap", "plot_alignment", "plot_trajectory", "save_figure"]
