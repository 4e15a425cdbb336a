"""Interventions in the report: K x K heatmaps of ablation.parquet and a summary per neuron set.

Rows are the language whose neurons are deactivated, columns the language evaluated. The
primary quantity is ΔNLL per token in nats (= Δ log PPL): additive, comparable between
languages and not dominated by one fragile language as ΔPPL is. Every neuron set gets its matrix,
and the random control of the same per-layer sizes gets one too (averaged over its seeds). All
ΔNLL heatmaps share one symmetric colour scale centred at 0 so that they can be compared by eye.

`heatmaps(df, figures_dir)` draws the figures; `render_section(run_dir)` returns the HTML fragment
that report/html.py places in the "Interventions" section (html.py adds the ``<section>`` and its
heading; ``standalone=True`` adds them here for use outside the report).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_parquet
from ..runs import RunDir
from .figures import DPI, save_figure
from .sections import esc, figure_html, note_html, table_html

SET_ORDER = ("specific", "specific,related", "specific,related,general")
CMAP = "RdBu_r"  # diverging: red = the loss rises, blue = it falls; white = no change
METRIC_LABEL = {"nll": "ΔNLL per token (nats) = Δ log PPL", "bpb": "Δ bits per byte", "ppl": "Δ perplexity",
                "accuracy": "Δ accuracy (number right and in the language)",
                "number_accuracy": "Δ accuracy of the final number", "language_accuracy": "Δ share in the language",
                "choice_accuracy": "Δ multiple-choice accuracy"}
HEATMAP_METRICS = ("nll", "accuracy", "choice_accuracy")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _set_key(name: str) -> tuple[int, int, str]:
    base = name.split(":", 1)[1] if name.startswith("random:") else name
    rank = SET_ORDER.index(base) if base in SET_ORDER else len(SET_ORDER)
    return rank, int(name.startswith("random:")), name


def _order(values: Any) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def matrices(df: Any, metric: str = "nll") -> dict[str, tuple[Any, dict[str, int]]]:
    """{neuron_set: (DataFrame deactivated x eval of mean delta, {deactivated: n_neurons})}; random
    controls are averaged over seeds. Row/column order: first appearance in ``df``."""
    sub = df[df["metric"] == metric]
    rows, cols = _order(sub["deactivated_lang"]), _order(sub["eval_lang"])
    out = {}
    for nset in sorted(sub["neuron_set"].unique(), key=_set_key):
        part = sub[sub["neuron_set"] == nset]
        tab = part.pivot_table(index="deactivated_lang", columns="eval_lang", values="delta", aggfunc="mean")
        tab = tab.reindex(index=[r for r in rows if r in tab.index], columns=[c for c in cols if c in tab.columns])
        counts: dict[str, int] = {}
        if "n_neurons" in part.columns:
            counts = {k: int(v) for k, v in part.groupby("deactivated_lang")["n_neurons"].max().items()}
        out[nset] = (tab, counts)
    return out


def _fmt_cell(v: float) -> str:
    if not math.isfinite(v):
        return ""
    if v == 0 or abs(v) >= 0.01:
        return f"{v:+.2f}"
    return f"{v:+.0e}"


def _draw(tab: Any, counts: dict[str, int], title: str, label: str, vmax: float) -> Any:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    n_rows, n_cols = tab.shape
    fig = Figure(figsize=(max(4.2, 0.62 * n_cols + 2.6), max(3.2, 0.5 * n_rows + 1.8)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    data = tab.to_numpy(dtype=float)
    empty_rows = np.array([counts.get(r, 1) == 0 for r in tab.index])
    shown = np.ma.masked_invalid(np.where(empty_rows[:, None], np.nan, data))
    norm = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad="#e6e6e6")  # grey: nothing was deactivated
    im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in tab.columns], fontsize=9)
    ylabels = [f"{r} ({counts[r]:,})" if r in counts else str(r) for r in tab.index]
    ax.set_yticks(range(n_rows), ylabels, fontsize=9)
    ax.set_xlabel("evaluated language")
    ax.set_ylabel("deactivated language (neurons)")
    ax.set_title(title, fontsize=10)
    for i, r in enumerate(tab.index):
        for j in range(n_cols):
            v = data[i, j]
            if counts.get(r, 1) == 0:
                text, color = "none", "#777777"
            else:
                text = _fmt_cell(v)
                color = "white" if math.isfinite(v) and abs(v) > 0.6 * vmax else "#222222"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
            if str(r) == str(tab.columns[j]):
                ax.add_patch(_diag_box(j, i))
    fig.colorbar(im, ax=ax, shrink=0.85, label=label)
    return fig


def _diag_box(x: int, y: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#222222", linewidth=1.2)


def heatmaps(df: Any, figures_dir: str | Path) -> list[Path]:
    """Draw one heatmap per neuron set (and per seed-averaged random control) for ΔNLL and, when
    present, Δaccuracy; PNG + SVG into ``figures_dir``. Returns the written paths (PNG, SVG, ...)."""
    figures_dir = Path(figures_dir)
    written: list[Path] = []
    for metric in HEATMAP_METRICS:
        mats = matrices(df, metric)
        if not mats:
            continue
        vmax = max((float(np.nanmax(np.abs(t.to_numpy(dtype=float)))) for t, _ in mats.values() if t.size),
                   default=0.0)
        vmax = vmax if math.isfinite(vmax) and vmax > 0 else 1e-6
        for nset, (tab, counts) in mats.items():
            if tab.empty:
                continue
            what = f"random neurons, per-layer counts of each language's {nset.split(':', 1)[1]} set " \
                "(mean over seeds)" if nset.startswith("random:") else f"deactivate each language's {nset} neurons"
            fig = _draw(tab, counts, f"{what}", METRIC_LABEL.get(metric, f"Δ{metric}"), vmax)
            written.extend(save_figure(fig, figures_dir, f"ablation_{metric}_{_slug(nset)}"))
    return written


# -- the report section ------------------------------------------------------------------------
def _diag_off(tab: Any, counts: dict | None = None) -> tuple[list[float], list[float]]:
    """Own-language and other-language deltas; rows of languages with no neurons (delta exactly
    0, nothing was deactivated) are left out so they do not dilute the means."""
    diag, off = [], []
    for r in tab.index:
        if counts is not None and counts.get(r) == 0:
            continue
        for c in tab.columns:
            v = float(tab.loc[r, c])
            if math.isfinite(v):
                (diag if r == c else off).append(v)
    return diag, off


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def summary(df: Any, metric: str = "nll", cells: Any = None) -> list[dict[str, Any]]:
    """Per real neuron set: per-language own vs other-language deltas and the random control.

    ``cells`` (optional, from `intervals.ablation_intervals(...).cells` or the fallback
    `confidence.interval_cells`) adds, per language, whether the own-language cell's interval
    excludes the control (``confirmed``): only those count in ``own_most_confirmed``."""
    mats = matrices(df, metric)
    excl: dict[tuple[str, str], bool] = {}
    if cells is not None and len(cells):
        for r in cells.itertuples():
            if r.deactivated_lang == r.eval_lang:
                excl[(r.neuron_set, r.deactivated_lang)] = bool(r.excludes_control) and _above(r)
    out = []
    for nset, (tab, counts) in mats.items():
        if nset.startswith("random:"):
            continue
        rand = mats.get(f"random:{nset}", (None, {}))[0]
        langs = []
        for k in tab.index:
            if k not in tab.columns:
                continue
            own = float(tab.loc[k, k])
            others = {c: float(tab.loc[k, c]) for c in tab.columns if c != k}
            worst_other = max(others, key=lambda c: others[c]) if others else None
            n = counts.get(k)
            most = bool(n != 0 and own > 0 and (not others or own > max(others.values())))
            langs.append({
                "lang": k, "n_neurons": n, "own": own,
                "others_mean": _mean(list(others.values())),
                "worst_other": worst_other, "worst_other_delta": others.get(worst_other, float("nan")) if worst_other else float("nan"),
                "random_own": float(rand.loc[k, k]) if rand is not None and k in rand.index and k in rand.columns else float("nan"),
                # "hurts most": the own loss rises, and by more than any other language's
                "hurts_own_most": most,
                # ... and the own cell's interval lies above the control (None: no interval)
                "confirmed": (most and excl[(nset, k)]) if (nset, k) in excl else None,
            })
        diag, off = _diag_off(tab, counts)
        rdiag, roff = _diag_off(rand, counts) if rand is not None else ([], [])
        out.append({"neuron_set": nset, "languages": langs, "diag_mean": _mean(diag), "off_mean": _mean(off),
                    "random_diag_mean": _mean(rdiag), "random_off_mean": _mean(roff),
                    "own_most": sum(x["hurts_own_most"] for x in langs),
                    "own_most_confirmed": sum(bool(x["confirmed"]) for x in langs),
                    "with_intervals": sum(x["confirmed"] is not None for x in langs),
                    "with_neurons": sum(1 for x in langs if x["n_neurons"] != 0)})
    return out


def _above(r: Any) -> bool:
    """The interval lies above the control (not below it)."""
    if hasattr(r, "excess_low") and math.isfinite(getattr(r, "excess_low", float("nan"))):
        return float(r.excess_low) > 0
    return float(r.ci_low) > float(r.control_mean)


def _verdict(s: dict[str, Any], control_name: str = "random neurons of the same per-layer sizes") -> str:
    n, k = s["own_most"], s["with_neurons"]
    failing = [x["lang"] for x in s["languages"] if x["n_neurons"] != 0 and not x["hurts_own_most"]]
    none = [x["lang"] for x in s["languages"] if x["n_neurons"] == 0]
    if k == 0:
        return f"No language has {s['neuron_set']} neurons, so nothing was deactivated."
    if s["with_intervals"]:
        c = s["own_most_confirmed"]
        unconfirmed = [x["lang"] for x in s["languages"] if x["hurts_own_most"] and not x["confirmed"]]
        text = (f"Deactivating a language's {s['neuron_set']} neurons raises that language's own loss more than any "
                f"other language's, with the 95% interval of its own loss above the control, for {c} of {k} "
                f"languages")
        text += "." if c == k else (f" ({n} of {k} by point estimates alone"
                                    + (f"; not beyond the control: {', '.join(unconfirmed)}" if unconfirmed else "")
                                    + (f"; not hurt most: {', '.join(failing)}" if failing else "") + ").")
    else:
        text = (f"Deactivating a language's {s['neuron_set']} neurons raises that language's own loss more than any "
                f"other language's for {n} of {k} languages by point estimates")
        text += ("" if not failing else f" (not for {', '.join(failing)})") + "; no interval was computed, so none " \
            "of them is confirmed against the control."
    if math.isfinite(s["random_diag_mean"]):
        ratio = ""
        if s["random_diag_mean"] > 1e-12 and s["diag_mean"] > 0:
            ratio = f", {s['diag_mean'] / s['random_diag_mean']:.3g}x the control"
        text += (f" Mean ΔNLL on the own language {s['diag_mean']:+.4f} nats/token vs {s['off_mean']:+.4f} on the "
                 f"others; {control_name}: {s['random_diag_mean']:+.4f} vs {s['random_off_mean']:+.4f}{ratio}.")
    else:
        text += (f" Mean ΔNLL on the own language {s['diag_mean']:+.4f} nats/token vs {s['off_mean']:+.4f} on the "
                 "others (no random control was run).")
    if none:
        text += f" No such neurons for: {', '.join(none)}."
    return text


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:+.4f}"
    return "–" if v is None else v


def _expected_stems(df: Any) -> list[str]:
    return [f"ablation_{metric}_{_slug(nset)}" for metric in HEATMAP_METRICS for nset in matrices(df, metric)]


def _current_pngs(df: Any, run: RunDir) -> dict[str, Path] | None:
    """The heatmaps `ablate` already drew, when all exist and are newer than ablation.parquet."""
    stamp = run.ablation_path.stat().st_mtime
    out = {}
    for stem in _expected_stems(df):
        png = run.figures_dir / f"{stem}.png"
        if not png.exists() or png.stat().st_mtime < stamp:
            return None
        out[stem] = png
    return out


def render_section(run_dir: str | Path, *, standalone: bool = False) -> str:
    """The Interventions section of the report as an HTML fragment (figures embedded as PNG data URIs)."""
    import pandas as pd

    run = RunDir(run_dir)
    if not run.ablation_path.exists():
        return ""
    df = read_parquet(run.ablation_path, "run `langneurons ablate` again")
    pngs = _current_pngs(df, run)
    if pngs is None:  # missing or older than ablation.parquet: draw them again
        pngs = {p.stem: p for p in heatmaps(df, run.figures_dir) if p.suffix == ".png"}
    manifest = run.stage_result("ablation")
    parts = ["<p>Rows: the language whose neurons are set to zero; columns: the language evaluated. Cells show "
             "the change of the mean negative log-likelihood per token (nats, = Δ log perplexity) against the "
             "unablated model; random neurons are the chance baseline (averaged over its seeds): with the "
             "activity-matched control (the default) as many per layer and activity stratum as the real set, so "
             "that a set is not credited for merely firing often; with the layer-only control the same number per "
             "layer. Log space is the default because perplexity ratios of one fragile "
             "language can dominate any average; bits per byte (in ablation.parquet) compares languages whose "
             "tokenisers split them unequally. The boxed diagonal is each language's own loss.</p>"]
    if manifest:
        facts = []
        for key in ("eval_corpus", "scope", "ppl_style", "batch_size", "control", "control_bins", "control_seeds",
                    "passes", "seconds"):
            if key in manifest:
                facts.append(f"{key.replace('_', ' ')}: {manifest[key]}")
        if facts:
            parts.append(f'<p class="small">{esc("; ".join(str(f) for f in facts))}</p>')
        if manifest.get("ppl_style") == "paper":
            parts.append(note_html("Perplexity style: paper. NLL and perplexity are the mean over documents of each "
                                   "document's mean NLL (then exp), as the published code reports them, not the "
                                   "token-weighted mean; intervals resample documents in the same style.", "note"))
    for metric in HEATMAP_METRICS:
        for nset, _ in matrices(df, metric).items():
            stem = f"ablation_{metric}_{_slug(nset)}"
            if stem not in pngs:
                continue
            if nset.startswith("random:"):
                alt = (f"Heatmap of {METRIC_LABEL.get(metric, metric)} when random neurons with the per-layer counts "
                       f"of each language's {nset.split(':', 1)[1]} set are deactivated, mean over seeds")
            else:
                alt = (f"Heatmap of {METRIC_LABEL.get(metric, metric)} in each evaluated language when each "
                       f"language's {nset} neurons are deactivated")
            parts.append(figure_html(pngs[stem], alt=alt, caption=alt + ".", fig_id=f"figure-{stem}"))
    iv = run_intervals(run)
    cells = iv.cells if iv is not None else None
    if cells is None and "ci_low" in df.columns and df["ci_low"].notna().any():
        from ..confidence import interval_cells

        cells = interval_cells(df, "nll")  # old runs: the control's seed variance is not included
        parts.append(note_html("Intervals from ablation.parquet: the control's variance across seeds is not part of "
                               "them (no per-document scores, ablation_docs.parquet); run the ablation again for "
                               "intervals that include it.", "warn"))
    parts.extend(_size_warnings(df, iv))
    kind = _control_kind(df)
    for s in summary(df, "nll", cells):
        parts.append(f"<h3>Neuron set: {esc(s['neuron_set'])}</h3>")
        ok = s["with_neurons"] and s["with_intervals"] and s["own_most_confirmed"] == s["with_neurons"]
        parts.append(note_html(_verdict(s, CONTROL_NAMES.get(kind, CONTROL_NAMES[None])), "ok" if ok else "note"))
        rows = [[x["lang"], "–" if x["n_neurons"] is None else x["n_neurons"], _fmt(x["own"]), _fmt(x["others_mean"]),
                 f"{x['worst_other']} ({_fmt(x['worst_other_delta'])})" if x["worst_other"] else "–",
                 _fmt(x["random_own"]), "yes" if x["hurts_own_most"] else "no",
                 "–" if x["confirmed"] is None else ("yes" if x["confirmed"] else "no")] for x in s["languages"]]
        footer = [["mean", "", _fmt(s["diag_mean"]), _fmt(s["off_mean"]), "", _fmt(s["random_diag_mean"]),
                   f"{s['own_most']}/{s['with_neurons']}",
                   f"{s['own_most_confirmed']}/{s['with_neurons']}" if s["with_intervals"] else "–"]]
        parts.append(table_html(["deactivated", "neurons", "ΔNLL own", "ΔNLL others (mean)", "most hurt other",
                                 "control ΔNLL own", "own hurt most", "… beyond the control (95%)"], rows,
                                footer=footer))
        if cells is not None and len(cells):
            parts.append(_cell_table(df, cells, s["neuron_set"]))
        if iv is not None and len(iv.selectivity):
            parts.append(_selectivity_table(iv.selectivity, s["neuron_set"]))
    parts.extend(_choice_tables(df))
    if not any(df["metric"] == "nll"):
        parts.append(note_html("No perplexity rows in ablation.parquet (only task accuracy)."))
    body = "\n".join(parts)
    if standalone:
        return f'<section id="section-interventions">\n<h2>Interventions</h2>\n{body}\n</section>'
    return body


# -- uncertainty: intervals, sample sizes, warnings ------------------------------------------------
CONTROL_NAMES = {"matched": "random neurons of the same layers and activity strata (activity-matched control)",
                 "layer": "random neurons of the same per-layer sizes (layer-only control)",
                 None: "random neurons of the same per-layer sizes"}
_IV_CACHE: dict[tuple, Any] = {}


def _control_kind(df: Any) -> str | None:
    if "control" not in df.columns:
        return None
    kinds = sorted(set(df.loc[df["neuron_set"].str.startswith("random:"), "control"].dropna()))
    return kinds[0] if len(kinds) == 1 else None


def run_intervals(run: RunDir, resamples: int | None = None, seed: int = 0) -> Any:
    """`intervals.ablation_intervals` of the run's per-document scores (``ablation_docs.parquet``),
    or None when the run has none. Resamples: the ablation's ``bootstrap`` setting from the
    manifest, else 1000. Cached per file version (the report and the confidence section share it)."""
    from ..intervals import DOCS_FILE, ablation_intervals

    path = run.path / DOCS_FILE
    if not path.is_file():
        return None
    if resamples is None:
        man = run.stage_result("ablation")
        resamples = int(man.get("bootstrap") or 1000)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, resamples, seed)
    if key not in _IV_CACHE:
        import pandas as pd

        _IV_CACHE.clear()
        docs = pd.read_parquet(path)
        paper = run.stage_result("ablation").get("ppl_style") == "paper"
        if paper:
            # the paper's style averages per-document means: as ratios of sums that is every
            # document's mean NLL over a weight of 1 (token counts are restored for display)
            tokens = docs[docs["neuron_set"] == "none"].groupby("eval_lang")["tokens"].sum()
            docs = docs.assign(nll=docs["nll"] / docs["tokens"].clip(lower=1), tokens=1)
        iv = ablation_intervals(docs, resamples=resamples, seed=seed)
        if paper:
            for frame in (iv.cells, getattr(iv, "selectivity", None)):
                if frame is not None and len(frame) and "n_tokens" in frame.columns:
                    lang_col = "eval_lang" if "eval_lang" in frame.columns else "deactivated_lang"
                    frame["n_tokens"] = frame[lang_col].map(tokens).fillna(frame["n_tokens"]).astype("int64")
        _IV_CACHE[key] = iv
    return _IV_CACHE[key]


def _eval_sizes(df: Any, iv: Any) -> dict[str, tuple[int | None, int]]:
    """{eval language: (documents or None when unknown, tokens)}."""
    out: dict[str, tuple[int | None, int]] = {}
    if iv is not None and len(iv.cells):
        for r in iv.cells.drop_duplicates("eval_lang").itertuples():
            out[r.eval_lang] = (int(r.n_docs), int(r.n_tokens))
        return out
    sub = df[df["metric"] == "nll"] if (df["metric"] == "nll").any() else df
    for r in sub.drop_duplicates("eval_lang").itertuples():
        n_docs = getattr(r, "n_docs", None)
        out[r.eval_lang] = (int(n_docs) if n_docs is not None and n_docs == n_docs and n_docs > 0 else None,
                            int(r.n_tokens))
    return out


def _size_warnings(df: Any, iv: Any) -> list[str]:
    from ..intervals import FEW_DOCS, distinct_resamples

    out = []
    sizes = _eval_sizes(df, iv)
    few = {j: n for j, (n, _) in sizes.items() if n is not None and n < FEW_DOCS}
    if few:
        out.append(note_html(f"Fewer than {FEW_DOCS} evaluated documents for {len(few)} language(s): "
                             + ", ".join(f"{j} ({n})" for j, n in few.items())
                             + ". Their intervals rest on very few documents; evaluate on more held-out text.",
                             "warn"))
    unknown = [j for j, (n, _) in sizes.items() if n is None]
    if unknown:
        out.append(note_html(f"The number of evaluated documents is not recorded for {', '.join(unknown)} "
                             "(an ablation.parquet from an older version).", "warn"))
    if iv is not None:
        R = iv.resamples
        short = {j: distinct_resamples(n) for j, (n, _) in sizes.items() if n is not None
                 and distinct_resamples(n) < R}
    else:
        R = int(df["n_resamples"].max()) if "n_resamples" in df.columns and len(df) else 0
        short = {j: distinct_resamples(n) for j, (n, _) in sizes.items() if n is not None and R
                 and distinct_resamples(n) < R}
    if short:
        out.append(note_html(f"The bootstrap drew {R:,} resamples, but fewer distinct ones exist for "
                             + ", ".join(f"{j} ({d:,})" for j, d in short.items())
                             + ": the interval repeats the same few resamples and overstates its precision.",
                             "warn"))
    return out


def _ci(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" [{lo:+.3f}, {hi:+.3f}]"


def _choice_tables(df: Any) -> list[str]:
    """Multiple-choice accuracy (Belebele-style): per real set and deactivated language, the own
    language's accuracy before, its change [paired 95% interval over questions], the mean change of
    the other languages and the control's own change (mean over seeds)."""
    sub = df[df["metric"] == "choice_accuracy"]
    if sub.empty:
        return []
    out = ["<h3>Multiple-choice accuracy</h3>",
           "<p>Share of questions answered right (the choice with the highest log-likelihood), with each "
           "language's neurons zeroed. Intervals resample questions in pairs (the same questions with and "
           "without the intervention); accuracy moves in steps of 1/questions.</p>"]
    for nset in sorted({s for s in sub["neuron_set"] if not str(s).startswith("random:")}, key=_set_key):
        real = sub[sub["neuron_set"] == nset]
        ctrl = sub[sub["neuron_set"] == f"random:{nset}"]
        rows = []
        for lang in _order(real["deactivated_lang"]):
            mine = real[real["deactivated_lang"] == lang]
            own = mine[mine["eval_lang"] == lang]
            others = mine[mine["eval_lang"] != lang]
            c_own = ctrl[(ctrl["deactivated_lang"] == lang) & (ctrl["eval_lang"] == lang)]
            if own.empty:
                continue
            r = own.iloc[0]
            ci = (f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if "ci_low" in own.columns
                  and math.isfinite(float(r["ci_low"])) else "")
            rows.append([lang, int(r["n_neurons"]), int(r["n_docs"]), f"{float(r['base']):.3f}",
                         f"{float(r['delta']):+.3f}{ci}",
                         _fmt(float(others["delta"].mean())) if len(others) else "–",
                         _fmt(float(c_own["delta"].mean())) if len(c_own) else "–"])
        if rows:
            out.append(f"<h4>Neuron set: {esc(nset)}</h4>")
            out.append(table_html(["deactivated", "neurons", "questions", "accuracy own (before)",
                                   "Δ accuracy own [95%]", "Δ others (mean)", "control Δ own"], rows))
    return out


def _cell_table(df: Any, cells: Any, nset: str) -> str:
    """Every cell of one set: ΔNLL [95% interval]; † when the interval lies beyond the control.
    Column headers carry the documents and tokens evaluated."""
    sub = cells[cells["neuron_set"] == nset]
    if sub.empty:
        return ""
    rows_l = list(dict.fromkeys(sub["deactivated_lang"]))
    cols_l = list(dict.fromkeys(sub["eval_lang"]))
    sizes: dict[str, tuple[Any, Any]] = {}
    for r in sub.itertuples():
        sizes[r.eval_lang] = (getattr(r, "n_docs", None), getattr(r, "n_tokens", None))
    if any(v[0] is None for v in sizes.values()):
        rows_df = _eval_sizes(df, None)
        sizes = {j: rows_df.get(j, (None, 0)) for j in cols_l}
    header = ["deactivated \\ evaluated"] + [
        f"{j} ({'?' if sizes[j][0] is None else f'{int(sizes[j][0]):,}'} docs, {int(sizes[j][1] or 0):,} tokens)"
        for j in cols_l]
    table = {(r.deactivated_lang, r.eval_lang): r for r in sub.itertuples()}
    body = []
    for k in rows_l:
        line: list[Any] = [k]
        for j in cols_l:
            r = table.get((k, j))
            if r is None:
                line.append("–")
                continue
            mark = " †" if bool(r.excludes_control) else ""
            line.append(f"{r.delta:+.3f}{_ci(float(r.ci_low), float(r.ci_high))}{mark}")
        body.append(line)
    note = ("<p class=\"small\">ΔNLL per token with its 95% bootstrap interval over the evaluation documents; "
            "†: the interval of the difference to the control excludes 0"
            + (" (documents and control seeds resampled together)" if "excess_low" in sub.columns else
               " (the control's mean lies outside the interval)") + ".</p>")
    return note + table_html(header, body)


def _selectivity_table(sel: Any, nset: str) -> str:
    sub = sel[sel["neuron_set"] == nset]
    if sub.empty:
        return ""
    rows = []
    for r in sub.itertuples():
        rows.append([r.deactivated_lang, int(r.n_docs), int(r.n_tokens),
                     f"{r.own:+.3f}", f"{r.selectivity:+.3f}{_ci(r.selectivity_low, r.selectivity_high)}",
                     "–" if not math.isfinite(r.control_own) else f"{r.control_own:+.3f} ({int(r.control_seeds)} seeds)",
                     "–" if not math.isfinite(r.excess) else f"{r.excess:+.3f}{_ci(r.excess_low, r.excess_high)}",
                     f"{int(r.n_resamples):,} of {int(r.distinct_resamples):,}"])
    return ("<p class=\"small\">Selectivity: own-language ΔNLL minus the mean ΔNLL of the other languages. Excess: "
            "own-language ΔNLL minus the control's (mean over its seeds). 95% intervals resample the documents of "
            "every language and the control's seeds.</p>"
            + table_html(["deactivated", "docs", "tokens", "ΔNLL own", "selectivity [95%]", "control ΔNLL own",
                          "excess over control [95%]", "resamples (of distinct)"], rows))
