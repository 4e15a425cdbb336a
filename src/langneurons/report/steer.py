"""Report section and figures of steering (RUN_DIR/steer.parquet, `langneurons steer`).

* ``steer_strength``: forcing success and fidelity (chrF) against the strength, one line per
  method and layer range, averaged over the (from, to) pairs; the unsteered model as a dashed line.
* ``steer_grid``: forcing success per (from, to) pair at each method's best setting (the highest
  mean harmonic of success and fidelity), when more than one pair was steered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..steer import STEER_FILE, best_settings, read_steer, summary_table
from .figures import COLORS, HEATMAP, save_figure
from .sections import esc, figure_html, note_html, register_section, table_html

METHOD_COLORS = {"neurons": COLORS["specific"], "random": COLORS["unassigned"], "diffmean": COLORS["related"],
                 "experts": COLORS["general"], "random-experts": COLORS["unassigned"], "none": "black"}
STEERED = ("neurons", "random", "diffmean", "experts", "random-experts")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_strength(df: Any) -> Any:
    fig = _figure(8.0, 3.2)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    table = summary_table(df)
    base = table[table["method"] == "none"]
    styles = ["-", "--", ":", "-."]
    for ax, metric, label in zip(axes, ("success", "chrf"), ("forcing success", "fidelity (chrF)")):
        for method in STEERED:
            g = table[table["method"] == method]
            for i, (layers, gl) in enumerate(g.groupby("layers", sort=True)):
                gl = gl.sort_values("strength")
                name = f"{method} (layers {layers})" if method != "diffmean" else f"diffmean (block {layers})"
                ax.plot(gl["strength"], gl[metric], marker="o", ms=3, lw=1.4, ls=styles[i % len(styles)],
                        color=METHOD_COLORS[method], label=name)
        if len(base):
            ax.axhline(float(base[metric].mean()), color="black", ls="--", lw=0.8, label="no intervention")
        ax.set_xlabel("strength")
        ax.set_ylabel(label)
        steered = table[table["method"] != "none"]
        if len(steered) and (steered["strength"] > 0).all():
            ax.set_xscale("log", base=2)  # strengths are swept by factors
        if metric == "success":
            ax.set_ylim(0, 1.02)
        else:  # chrF of short continuations is small: scale to the data, from 0
            top = float(table[metric].max()) if len(table) else 0.0
            ax.set_ylim(0, max(0.05, 1.2 * top) if top == top else 1)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(fontsize=6, frameon=False, loc="best")
    fig.suptitle("Steering: mean over (from, to) pairs", fontsize=10)
    return fig


def plot_grid(df: Any) -> Any | None:
    """Success per pair at each method's best setting (None when fewer than 2 pairs)."""
    import numpy as np

    pairs = df[["src", "tgt"]].drop_duplicates()
    if len(pairs) < 2:
        return None
    methods = [m for m in ("none", *STEERED) if (df["method"] == m).any()]
    srcs = list(dict.fromkeys(pairs["src"]))
    tgts = list(dict.fromkeys(pairs["tgt"]))
    fig = _figure(2.6 * len(methods) + 0.8, 2.6)
    im = None
    for i, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1)
        g = df[df["method"] == method]
        title = "no intervention"
        if method != "none":
            best = best_settings(df, method)
            if best is None:
                continue
            g = g[(g["strength"] == best[0]) & (g["layers"] == best[1])]
            title = f"{method} S={best[0]:g} ({best[1]})"
        cell = g.groupby(["src", "tgt"])["success"].mean()
        mat = np.full((len(srcs), len(tgts)), np.nan)
        for (s, t), v in cell.items():
            mat[srcs.index(s), tgts.index(t)] = v
        im = ax.imshow(mat, vmin=0, vmax=1, cmap=HEATMAP)
        ax.set_xticks(range(len(tgts)), tgts, fontsize=6)
        ax.set_yticks(range(len(srcs)), srcs, fontsize=6)
        ax.set_xlabel("to", fontsize=7)
        if i == 0:
            ax.set_ylabel("from", fontsize=7)
        ax.set_title(title, fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="forcing success")
    return fig


def steer_figures(df: Any, directory: str | Path) -> list[Path]:
    """steer_strength.png/.svg and (several pairs) steer_grid.png/.svg; returns the PNG paths."""
    out = [save_figure(plot_strength(df), directory, "steer_strength")[0]]
    grid = plot_grid(df)
    if grid is not None:
        out.append(save_figure(grid, directory, "steer_grid")[0])
    return out


def _fmt(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return "—" if f != f else round(f, 3)


def render_section(run_dir: str | Path) -> str | None:
    run_dir = Path(run_dir)
    if not (run_dir / STEER_FILE).is_file():
        return None
    df = read_steer(run_dir)
    table = summary_table(df)
    rows = [[r.method, r.mode, r.layers or "—", _fmt(r.strength) if r.method != "none" else "—", _fmt(r.success),
             _fmt(r.chrf), _fmt(r.harmonic), _fmt(r.fluency_cost), int(r.pairs), int(r.prompts)]
            for r in table.itertuples()]
    best = []
    for method in STEERED:
        b = best_settings(df, method)
        if b is not None:
            best.append(f"{method}: strength {b[0]:g}, layers {b[1]}")
    parts = [
        "<p>Continuations of held-out prompts (the first words of documents in the <i>from</i> language), steered "
        "towards the <i>to</i> language. <i>Forcing success</i>: share of outputs detected (lingua) in the target "
        "language. <i>Fidelity</i>: chrF (0–1) against the continuation of the parallel document in the target "
        "language. <i>Harmonic</i>: their harmonic mean (as CLaS-Bench). <i>Fluency cost</i>: NLL per token of the "
        "output under the unsteered model minus that of the unsteered outputs (nats; Δ log PPL). Methods: the "
        "target's language neurons (<i>neurons</i>), activity-matched random neurons of the same per-layer counts "
        "(<i>random</i>), a difference-of-means residual vector (<i>diffmean</i>), for a mixture of experts the "
        "target's language-specific experts forced into the router's choice (<i>experts</i>) and random experts of "
        "the same per-layer counts (<i>random-experts</i>), and no intervention. Values are "
        "means over the pairs (and control seeds).</p>",
        table_html(["method", "mode", "layers", "strength", "success", "chrF", "harmonic", "fluency cost", "pairs",
                    "prompts"], rows),
    ]
    if best:
        parts.append(f"<p>Best setting per method (highest mean harmonic): {esc('; '.join(best))}.</p>")
    small = int(table["prompts"].min()) if len(table) else 0
    if small and small < 20:
        parts.append(note_html(f"few prompts: the smallest row rests on {small} outputs; read differences of a few "
                               "points as noise", "warn"))
    try:
        figs = steer_figures(df, run_dir / "figures")
    except Exception as exc:  # noqa: BLE001 - the table is still useful
        parts.append(note_html(f"steering figures could not be drawn: {exc}", "warn"))
        figs = []
    captions = {"steer_strength": "Forcing success and fidelity against the strength, per method (mean over pairs).",
                "steer_grid": "Forcing success per (from, to) pair at each method's best setting."}
    for png in figs:
        parts.append(figure_html(png, png.stem.replace("_", " "), captions.get(png.stem, "")))
    return "\n".join(parts)


register_section("steer", "Steering the output language", render_section, order=55)
