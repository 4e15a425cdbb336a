"""The "Confidence" section of the report: stability of the neuron sets, the chance baseline,
and which intervention effects stand out from their random control.

Shown only when `langneurons stability` wrote its results (stability.parquet,
stability_split_half.parquet or null.parquet in the run directory). Figures:

* ``confidence_selection_freq``: histogram of the selection frequency of every neuron selected
  at least once in the bootstrap (neurons of the full-data selection stacked on top), with the
  stable-core threshold and the share a neuron picked at random would get;
* ``confidence_language_stability``: per language, the expected Jaccard overlap of two
  resamples' sets and the Jaccard with the full-data set (mean, 2.5-97.5 % range);
* ``confidence_null``: the permutation null's distribution of the number of specific and
  related neurons with the observed count marked;
* ``confidence_ablation_<set>``: the ΔNLL heatmap of each neuron set with every cell whose
  bootstrap interval excludes the random control's mean (over seeds) framed and starred, and
  the others hatched; a table lists those cells (only when ablation.parquet has intervals).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_parquet
from ..runs import RunDir
from .figures import COLORS, DPI, save_figure
from .sections import esc, figure_html, note_html, register_section, sections, table_html

NAME, TITLE, ORDER = "confidence", "Confidence", 55


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)


# -- figures ---------------------------------------------------------------------------------------
def plot_selection_freq(table: Any, core: float, chance: float | None, resamples: int) -> Any:
    fig = _new_figure(6.4, 3.6)
    ax = fig.subplots()
    _style(ax)
    bins = np.linspace(0, 1, 21)
    freq = table["selection_freq"].to_numpy(dtype=float)
    in_full = table["in_full_selection"].to_numpy(dtype=bool)
    ax.hist([freq[~in_full], freq[in_full]], bins=bins, stacked=True, zorder=2,
            color=[COLORS["unassigned"], COLORS["specific"]],
            label=["not selected on the full data", "selected on the full data"])
    ax.axvline(core, color=COLORS["tau"], lw=1.5, ls="--", zorder=3)
    n_core = int((freq >= core).sum())
    ax.text(core, 1.0, f" stable core ≥ {core:.0%}: {n_core:,}", transform=ax.get_xaxis_transform(),
            ha="left" if core < 0.8 else "right", va="top", fontsize=8, color=COLORS["tau"])
    if chance is not None and 0 < chance < 1:
        ax.axvline(chance, color="#555555", lw=1, ls=":", zorder=3)
        ax.text(chance, 0.6, f" random pick: {chance:.2%}", transform=ax.get_xaxis_transform(), ha="left",
                va="top", fontsize=8, color="#555555")
    ax.set_yscale("log")
    ax.set_xlabel(f"selection frequency over {resamples} bootstrap resamples of the documents")
    ax.set_ylabel("neurons (log scale)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8, frameon=False, loc="upper center")
    fig.suptitle("How often each neuron is selected again when the documents are resampled", fontsize=10)
    return fig


def plot_language_stability(lang_table: Any) -> Any:
    df = lang_table.reset_index(drop=True)
    n = len(df)
    fig = _new_figure(max(5.5, 0.55 * n + 2.5), 3.8)
    ax = fig.subplots()
    _style(ax)
    x = np.arange(n)
    ej = df["expected_jaccard"].to_numpy(dtype=float)
    jm = df["jaccard_full_mean"].to_numpy(dtype=float)
    lo = df["jaccard_full_low"].to_numpy(dtype=float)
    hi = df["jaccard_full_high"].to_numpy(dtype=float)
    ax.bar(x - 0.2, np.nan_to_num(ej), width=0.4, color=COLORS["related"], zorder=2,
           label="expected Jaccard of two resamples")
    err = np.vstack([np.nan_to_num(jm - lo), np.nan_to_num(hi - jm)])
    ax.bar(x + 0.2, np.nan_to_num(jm), width=0.4, color=COLORS["specific"], zorder=2,
           label="Jaccard with the full-data set (2.5–97.5 %)")
    ax.errorbar(x + 0.2, np.nan_to_num(jm), yerr=err, fmt="none", ecolor="#333333", elinewidth=1, capsize=2, zorder=3)
    labels = [str(s).strip("()") for s in df["set"]]
    tilt = n > 8 or any(len(lab) > 6 for lab in labels)
    ax.set_xticks(x, labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Jaccard overlap")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Stability of each language's specific + related neurons", fontsize=10)
    return fig


def plot_null(null_df: Any, stats: tuple[str, ...] = ("specific", "related")) -> Any:
    fig = _new_figure(4.0 * len(stats) + 1.0, 3.4)
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    obs_row = null_df[null_df["kind"] == "observed"]
    null = null_df[(null_df["kind"] == "null") & null_df["error"].isna()]
    for ax, stat in zip(axes, stats):
        _style(ax)
        vals = null[stat].dropna().to_numpy(dtype=float)
        obs = float(obs_row[stat].iloc[0]) if len(obs_row) else float("nan")
        n = len(vals)
        p = (1 + int((vals >= obs).sum())) / (1 + n) if n else float("nan")
        top = max(float(vals.max()) if n else 0.0, obs if math.isfinite(obs) else 0.0)
        bins = np.linspace(0, max(top, 1.0) * 1.05, 25)
        ax.hist(vals, bins=bins, color=COLORS["unassigned"], zorder=2, label=f"{n} permutations")
        if math.isfinite(obs):
            ax.axvline(obs, color=COLORS["tau"], lw=2, zorder=3, label=f"observed: {int(obs):,}")
        ax.set_xlabel(f"{stat} neurons")
        ax.set_ylabel("permutations")
        ax.set_title(f"{stat}: p = {p:.3g}" if n else stat, fontsize=10)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle("Chance baseline: language labels permuted between document groups", fontsize=10)
    return fig


def plot_interval_heatmap(cells: Any, neuron_set: str, vmax: float) -> Any:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    import matplotlib

    sub = cells[cells["neuron_set"] == neuron_set]
    rows = list(dict.fromkeys(sub["deactivated_lang"]))
    cols = list(dict.fromkeys(sub["eval_lang"]))
    data = np.full((len(rows), len(cols)), np.nan)
    sig = np.zeros_like(data, dtype=bool)
    for r in sub.itertuples():
        i, j = rows.index(r.deactivated_lang), cols.index(r.eval_lang)
        data[i, j], sig[i, j] = r.delta, bool(r.excludes_control)
    fig = _new_figure(max(4.2, 0.62 * len(cols) + 2.6), max(3.2, 0.5 * len(rows) + 1.8))
    ax = fig.subplots()
    norm = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    ax.set_xlabel("evaluated language")
    ax.set_ylabel("deactivated language")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            if not math.isfinite(v):
                continue
            if sig[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.0))
            else:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#9a9a9a",
                                       linewidth=0))
            color = "white" if abs(v) > 0.6 * vmax else "#222222"
            ax.text(j, i, f"{v:+.2f}{'*' if sig[i, j] else ''}", ha="center", va="center", fontsize=8, color=color,
                    fontweight="bold" if sig[i, j] else "normal")
    fig.colorbar(im, ax=ax, shrink=0.85, label="ΔNLL per token (nats)")
    ax.set_title(f"deactivate each language's {neuron_set} neurons\nframed, *: the 95% interval excludes the random "
                 "control's mean;\nhatched: it does not", fontsize=8)
    return fig


# -- the section -----------------------------------------------------------------------------------
def _read(path: Path) -> Any:
    return read_parquet(path, "run the stability/null command again") if path.is_file() else None


def _f(x: Any, digits: int = 3) -> Any:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else round(x, digits)
    return x


def _stability_part(run: RunDir, conf: dict[str, Any], parts: list[str]) -> None:
    from ..confidence import STABILITY_FILE, STABILITY_LANG_FILE

    table, langs = _read(run.path / STABILITY_FILE), _read(run.path / STABILITY_LANG_FILE)
    if table is None and langs is None:
        return
    info = conf.get("stability") or {}
    R = info.get("resamples", "?")
    core = float(info.get("core_threshold", 0.9))
    parts.append("<h3>Stability of the neuron sets</h3>")
    ident = info.get("identify") or {}
    parts.append(
        f"<p>Each language's documents (grouped in {esc(info.get('buckets', '?'))} buckets) were resampled with "
        f"replacement {esc(R)} times and the neurons identified again with the run's method "
        f"({esc(ident.get('method', '?'))}, {esc(json.dumps(ident.get('params', {}), sort_keys=True))}). The "
        "selection frequency of a neuron is the share of resamples that select it; the stable core are the neurons "
        f"selected in at least {core:.0%} of them. A language's expected Jaccard is the mean overlap of its "
        "specific + related neurons between two resamples (averaged over all pairs).</p>")
    if info:
        full, n_core = info.get("full_selected"), info.get("stable_core")
        in_full = info.get("stable_core_in_full")
        if full:
            parts.append(note_html(
                f"Stable core: {n_core:,} neurons; {in_full:,} of the {full:,} neurons selected on the full data "
                f"({100.0 * in_full / full:.1f}%) are selected in at least {core:.0%} of the resamples, and "
                f"{info.get('ever_selected', 0):,} neurons are selected at least once.",
                "ok" if in_full / full >= 0.5 else "warn"))
        valid = info.get("valid")
        if isinstance(R, int) and isinstance(valid, int) and valid < R:
            parts.append(note_html(f"{R - valid} of {R} resamples gave no identification (e.g. no λ passed) and are "
                                   "left out; frequencies are over the other resamples.", "warn"))
        if isinstance(R, int) and R < 100:
            parts.append(note_html(f"Only {R} resamples: frequencies are coarse (step {1 / R:.2g}); use 200.", "warn"))
    figs = run.figures_dir
    if table is not None and len(table):
        chance = (ident.get("params") or {}).get("top_rate")
        fig = plot_selection_freq(table, core, float(chance) if chance else None, int(R) if isinstance(R, int) else 0)
        png, _ = save_figure(fig, figs, "confidence_selection_freq")
        alt = "Histogram of the selection frequency of every neuron selected in at least one bootstrap resample"
        parts.append(figure_html(png, alt, alt + "; orange: neurons selected on the full data. The dashed line is "
                                 "the stable-core threshold, the dotted one the frequency of a neuron picked at random.",
                                 "figure-confidence_selection_freq"))
    if langs is not None and len(langs):
        fig = plot_language_stability(langs)
        png, _ = save_figure(fig, figs, "confidence_language_stability")
        alt = "Bars per language: expected Jaccard overlap of two resamples and Jaccard with the full-data set"
        parts.append(figure_html(png, alt, alt + " (whiskers: 2.5–97.5 % of the resamples).",
                                 "figure-confidence_language_stability"))
        rows = [[r.set, _f(r.expected_jaccard), _f(r.jaccard_full_mean),
                 f"[{_f(r.jaccard_full_low)}, {_f(r.jaccard_full_high)}]", int(r.full_size), _f(r.mean_size, 1),
                 int(r.stable_core)] for r in langs.itertuples()]
        parts.append(table_html(["set", "expected Jaccard", "Jaccard with full", "range (2.5–97.5 %)",
                                 "full-data size", "mean size", "stable core"], rows))


def _split_half_part(run: RunDir, conf: dict[str, Any], parts: list[str]) -> None:
    from ..confidence import SPLIT_HALF_FILE

    df = _read(run.path / SPLIT_HALF_FILE)
    if df is None:
        return
    parts.append("<h3>Split-half agreement</h3>")
    parts.append("<p>Every language's document buckets split at random into two halves, the neurons identified on "
                 "each half and compared (Jaccard). Each half has half the data, so the agreement is a lower bound "
                 "on the stability of the full data's sets.</p>")
    rows = [[r.set, _f(r.jaccard), int(r.size_a), int(r.size_b)] for r in df.itertuples()]
    parts.append(table_html(["set", "Jaccard", "size (half A)", "size (half B)"], rows))


def _null_part(run: RunDir, conf: dict[str, Any], parts: list[str]) -> None:
    from ..confidence import NULL_FILE

    df = _read(run.path / NULL_FILE)
    if df is None:
        return
    info = conf.get("null") or {}
    tests = info.get("tests") or {}
    parts.append("<h3>Chance baseline</h3>")
    parts.append("<p>The same identification on data whose language labels were permuted between document groups "
                 "(all languages' buckets pooled and dealt back at random, each language keeping its number of "
                 "buckets): how many specific / related neurons appear when there is no language structure. "
                 "p-value = (1 + #null ≥ observed) / (1 + permutations); the false-discovery estimate is the null "
                 "mean divided by the observed count.</p>")
    fig = plot_null(df)
    png, _ = save_figure(fig, run.figures_dir, "confidence_null")
    alt = "Histograms of the number of specific and related neurons under permuted language labels"
    parts.append(figure_html(png, alt, alt + ", with the observed counts marked.", "figure-confidence_null"))
    rows = []
    for stat in ("specific", "related", "language", "selected_active"):
        t = tests.get(stat)
        if t:
            rows.append([stat, t.get("observed"), _f(t.get("null_mean"), 1), _f(t.get("null_q95"), 1),
                         _f(t.get("p_value"), 4), _f(t.get("fdr"), 3)])
    if rows:
        parts.append(table_html(["count", "observed", "null mean", "null 95th percentile", "p-value",
                                 "false-discovery estimate"], rows))
        failed = int(info.get("permutations", 0)) - int(info.get("valid", 0))
        if failed:
            parts.append(note_html(f"{failed} permutation(s) gave no identification (e.g. no λ passed) and are "
                                   "left out.", "warn"))


def _interventions_part(run: RunDir, parts: list[str]) -> None:
    from ..confidence import interval_cells

    df = _read(run.ablation_path)
    if df is None:
        return
    parts.append("<h3>Interventions against their random control</h3>")
    from .ablation import run_intervals

    iv = run_intervals(run)
    cells = iv.cells if iv is not None else interval_cells(df, "nll")
    has_ci = bool(len(cells)) and bool(cells["ci_low"].notna().any())
    if not has_ci:
        parts.append(note_html("ablation.parquet has no bootstrap intervals; run `langneurons ablate RUN_DIR "
                               "--bootstrap 1000` to see which effects stand out from the random control."))
        return
    if iv is not None:
        parts.append("<p>For every cell, a 95 % paired bootstrap interval of ΔNLL per token over the evaluation "
                     "documents; framed, starred cells: the interval of the difference to the random control "
                     "(documents and the control's seeds resampled together) excludes 0.</p>")
    else:
        parts.append("<p>For every cell, a 95 % paired bootstrap interval of ΔNLL per token over the evaluation "
                     "documents, against the random control averaged over its seeds. Framed, starred cells: the "
                     "interval excludes the control's mean (the control's own variance is not included: this run "
                     "has no per-document scores).</p>")
    vmax = float(np.nanmax(np.abs(cells["delta"].to_numpy(dtype=float)))) if len(cells) else 1.0
    vmax = vmax if math.isfinite(vmax) and vmax > 0 else 1e-6
    for nset in sorted(cells["neuron_set"].unique(), key=lambda x: (len(x.split(",")), x)):
        fig = plot_interval_heatmap(cells, nset, vmax)
        stem = "confidence_ablation_" + re.sub(r"[^A-Za-z0-9]+", "-", nset).strip("-")
        png, _ = save_figure(fig, run.figures_dir, stem)
        alt = f"ΔNLL heatmap of the {nset} neurons with the cells whose interval excludes the random control marked"
        parts.append(figure_html(png, alt, alt + ".", f"figure-{stem}"))
    sig = cells[cells["excludes_control"]]
    n_ci = int(cells["ci_low"].notna().sum())
    parts.append(note_html(f"{len(sig)} of {n_ci} cells with an interval exclude their random control's mean.",
                           "ok" if len(sig) else "note"))
    if len(sig):
        def size(r: Any) -> str:
            n_docs, n_tok = getattr(r, "n_docs", None), getattr(r, "n_tokens", None)
            return "–" if n_docs is None or n_docs != n_docs else f"{int(n_docs):,} / {int(n_tok):,}"

        rows = [[r.neuron_set, r.deactivated_lang, r.eval_lang, f"{r.delta:+.4f}",
                 f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
                 f"{r.control_mean:+.4f}" + ("" if not math.isfinite(r.control_sd) else f" ± {r.control_sd:.4f}"),
                 int(r.control_seeds), size(r)] for r in sig.itertuples()]
        parts.append(table_html(["neuron set", "deactivated", "evaluated", "ΔNLL", "95% interval",
                                 "control mean ± sd (seeds)", "seeds", "docs / tokens"], rows))


def has_results(run_dir: str | Path) -> bool:
    from ..confidence import NULL_FILE, SPLIT_HALF_FILE, STABILITY_FILE, STABILITY_LANG_FILE

    d = Path(run_dir)
    return any((d / f).is_file() for f in (STABILITY_FILE, STABILITY_LANG_FILE, SPLIT_HALF_FILE, NULL_FILE))


def render_section(run_dir: str | Path) -> str | None:
    """The HTML fragment of the Confidence section, or None when `langneurons stability` has
    not been run on this run directory."""
    if not has_results(run_dir):
        return None
    run = RunDir(run_dir)
    conf = {name: run.stage_result(name) for name in ("stability", "split_half", "null")}
    parts: list[str] = []
    _stability_part(run, conf, parts)
    _split_half_part(run, conf, parts)
    _null_part(run, conf, parts)
    _interventions_part(run, parts)
    return "\n".join(parts)


def register(replace: bool = True) -> None:
    """Register the section. At import time it does not replace a section of the same name that
    someone registered before (a user's own "confidence" section wins); call ``register()`` to
    put ours back."""
    if replace or not any(s.name == NAME for s in sections()):
        register_section(NAME, TITLE, render_section, order=ORDER)


register(replace=False)
