"""Publication figures of a run (matplotlib, no display needed).

Every figure is drawn on a bare `matplotlib.figure.Figure` with the Agg canvas (no pyplot, so no
global backend switch and no window) and saved as PNG and SVG into RUN_DIR/figures/.
Colours are the Okabe–Ito palette and the heatmaps use *cividis*: both stay distinguishable
with colour-vision deficiencies and in greyscale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..io import atomic_write
from ..runs import RunDir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..anatomy import Anatomy
    from ..neurons import NeuronMap
    from ..stats import ActivationStats

log = logging.getLogger(__name__)

# Okabe & Ito (2008), colour-blind safe
COLORS = {"specific": "#E69F00", "related": "#0072B2", "general": "#009E73", "unassigned": "#999999",
          "tau": "#D55E00", "accent": "#CC79A7", "phase": ("#F0F0F0", "#DCDCDC")}
HEATMAP = "cividis"
DPI = 150


@dataclass
class FigureResult:
    """One figure of the report: where it was written, or why it was skipped."""

    name: str
    title: str
    caption: str
    png: Path | None = None
    svg: Path | None = None
    skipped: str | None = None  # reason when the figure could not be drawn

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.png is not None


def new_figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Any, integer_y: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)
    if integer_y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def short_model(name: str | None) -> str:
    """'/models/google/gemma-3-270m' -> 'gemma-3-270m' (titles stay short)."""
    if not name:
        return "model"
    return str(name).rstrip("/").split("/")[-1] or str(name)


def save_figure(fig: "Figure", directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``name``.png and ``name``.svg atomically (SVG without a date so reruns are identical)."""
    directory = Path(directory)
    png = atomic_write(directory / f"{name}.png", lambda p: fig.savefig(p, format="png", dpi=DPI))
    svg = atomic_write(directory / f"{name}.svg",
                       lambda p: fig.savefig(p, format="svg", metadata={"Date": None}))
    return png, svg


def _layer_ticks(ax: Any, n_layers: int) -> None:
    step = max(1, int(np.ceil(n_layers / 16)))
    ax.set_xticks(np.arange(0, n_layers, step))
    ax.set_xlim(-0.6, n_layers - 0.4)


def _shade_phases(ax: Any, an: "Anatomy", label: bool) -> None:
    for i, ph in enumerate(an.phases):
        ax.axvspan(ph.start - 0.5, ph.end + 0.5, color=COLORS["phase"][i % 2], zorder=0, lw=0)
        if label:
            ax.text((ph.start + ph.end) / 2, 1.0, f"P{i + 1}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9, fontweight="bold", color="#333333")


# -- the figures ---------------------------------------------------------------------------
def plot_layer_classes(an: "Anatomy", model: str = "") -> "Figure":
    """Stacked per-layer counts (language neurons on top, general below) with the phases shaded."""
    fig = new_figure(8.0, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    layers = np.arange(an.num_layers)
    spec = np.asarray(an.per_layer["specific"])
    rel = np.asarray(an.per_layer["related"])
    una = np.asarray(an.per_layer.get("unassigned", [0] * an.num_layers))
    for ax in (top, bottom):
        _shade_phases(ax, an, label=ax is top)
        _style(ax)
    top.bar(layers, spec, color=COLORS["specific"], label="specific", zorder=2)
    top.bar(layers, rel, bottom=spec, color=COLORS["related"], label="related", zorder=2)
    if una.any():
        top.bar(layers, una, bottom=spec + rel, color=COLORS["unassigned"], hatch="//", edgecolor="white",
                lw=0, label="unassigned (selected, active nowhere)", zorder=2)
    top.set_ylabel("selected neurons")
    top.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom.bar(layers, an.per_layer["general"], color=COLORS["general"], label="general", zorder=2)
    bottom.set_ylabel("general neurons")
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _layer_ticks(bottom, an.num_layers)
    if an.phases:
        names = "   ".join(f"P{i + 1}: {p.name} ({p.start}–{p.end})" for i, p in enumerate(an.phases))
        flag = "" if an.phases_reliable else "   [segmentation not reliable: see report]"
        fig.supxlabel(_wrap(names + flag, 120), fontsize=8, color="#333333")
    fig.suptitle(f"{model or short_model(an.model)}: language-specific, -related and general neurons per layer",
                 fontsize=11)
    return fig


def plot_appear(an: "Anatomy", model: str = "") -> "Figure":
    """Selected neurons by the number of languages they are active in (0 = unassigned)."""
    k = len(an.languages)
    fig = new_figure(max(5.5, 0.5 * (k + 1) + 2.5), 3.6)
    ax = fig.subplots()
    _style(ax)
    xs = np.arange(k + 1)
    colors = [COLORS["unassigned"]] + [COLORS["specific"]] + [COLORS["related"]] * max(k - 2, 0) + \
        ([COLORS["general"]] if k >= 2 else [])
    bars = ax.bar(xs, an.appear, color=colors[:k + 1], zorder=2)
    ax.bar_label(bars, labels=[f"{v:,}" for v in an.appear], fontsize=8, padding=2)
    ax.set_xticks(xs)
    ax.set_xlabel("languages the neuron is active in (0 = unassigned)")
    ax.set_ylabel("selected neurons")
    ax.margins(y=0.12)
    fig.suptitle(f"{model or short_model(an.model)}: appear histogram (K = {k})", fontsize=11)
    return fig


def plot_language_heatmap(an: "Anatomy", model: str = "") -> "Figure":
    """Specific + related neurons per language (rows) and layer (columns)."""
    data = np.asarray(an.per_layer_language["specific"], dtype=float) + \
        np.asarray(an.per_layer_language["related"], dtype=float)
    k, n_layers = data.shape if data.size else (len(an.languages), an.num_layers)
    fig = new_figure(min(14.0, max(6.0, 0.28 * n_layers + 2.5)), max(2.6, 0.32 * k + 1.6))
    ax = fig.subplots()
    im = ax.imshow(data.reshape(k, n_layers), aspect="auto", cmap=HEATMAP, interpolation="nearest")
    ax.set_yticks(np.arange(k), labels=an.languages)
    ax.set_xlabel("layer")
    ax.set_ylabel("language")
    ax.tick_params(labelsize=9)
    step = max(1, int(np.ceil(n_layers / 16)))
    ax.set_xticks(np.arange(0, n_layers, step))
    for ph in an.phases[1:]:
        ax.axvline(ph.start - 0.5, color="white", lw=1.2, ls="--")
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label("specific + related neurons", fontsize=9)
    _integer_colorbar(cbar)
    fig.suptitle(f"{model or short_model(an.model)}: language neurons per language and layer", fontsize=11)
    return fig


def plot_overlap(an: "Anatomy", model: str = "") -> "Figure":
    """How many selected specific/related neurons two languages share (diagonal: own count).

    The colour scale covers the off-diagonal cells only (the diagonal, each language's own count,
    would otherwise swamp it); diagonal cells are grey with their count printed in bold."""
    m = np.asarray(an.overlap, dtype=float).reshape(len(an.languages), len(an.languages))
    k = m.shape[0]
    size = max(3.8, 0.5 * k + 2.2)
    fig = new_figure(size + 0.9, size)
    ax = fig.subplots()
    off = np.ma.masked_array(m, mask=np.eye(k, dtype=bool))
    cmap = _cmap_with_bad(HEATMAP, "#D9D9D9")
    top = float(off.max()) if k > 1 and off.count() else 0.0
    im = ax.imshow(off, cmap=cmap, interpolation="nearest", vmin=0, vmax=max(top, 1.0))
    ax.set_xticks(np.arange(k), labels=an.languages, rotation=90 if k > 8 else 0)
    ax.set_yticks(np.arange(k), labels=an.languages)
    ax.tick_params(labelsize=9)
    if k <= 14:
        for i in range(k):
            for j in range(k):
                diag = i == j
                light = diag or (top > 0 and m[i, j] > 0.6 * top)
                ax.text(j, i, f"{int(m[i, j]):,}", ha="center", va="center", fontsize=7 if k > 8 else 8,
                        color="black" if light else "white", fontweight="bold" if diag else "normal")
    cbar = fig.colorbar(im, ax=ax, pad=0.02, shrink=0.85)
    cbar.set_label("shared specific/related neurons\n(off-diagonal; diagonal: own count)", fontsize=8)
    _integer_colorbar(cbar)
    fig.suptitle(f"{model or short_model(an.model)}: language overlap of selected neurons", fontsize=11)
    return fig


def _cmap_with_bad(name: str, bad: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _integer_colorbar(cbar: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()


def pick_example_neuron(nmap: "NeuronMap") -> tuple[int, int] | None:
    """The lowest-score specific neuron (most language-specific), else the lowest-score selected one;
    without scores, the first in (layer, neuron) order. None when nothing is selected."""
    import torch

    from ..neurons import SPECIFIC

    for mask in (nmap.classes == SPECIFIC, nmap.selected.to(torch.bool)):
        if not bool(mask.any()):
            continue
        if nmap.scores is not None:
            scores = torch.where(mask, nmap.scores.to(torch.float64), torch.full_like(nmap.scores, float("inf"),
                                                                                      dtype=torch.float64))
            flat = int(torch.argmin(scores.flatten()))  # argmin returns the first minimum: deterministic
        else:
            flat = int(mask.flatten().nonzero()[0])
        return divmod(flat, nmap.num_neurons)
    return None


def plot_example_neuron(stats: "ActivationStats", nmap: "NeuronMap", layer: int, neuron: int,
                        model: str = "") -> "Figure":
    """Activation probability of one neuron in every language, with τ marked."""
    from ..neurons import CLASS_NAMES

    p = (stats.positive[:, layer, neuron].double() / stats.tokens.clamp(min=1).double()).numpy()
    tau = nmap.meta.get("tau")
    k = len(stats.languages)
    fig = new_figure(max(4.5, 0.45 * k + 2.5), 3.6)
    ax = fig.subplots()
    _style(ax, integer_y=False)
    active = nmap.active[:, layer, neuron].numpy().astype(bool)
    colors = [COLORS["specific"] if a else "#BBBBBB" for a in active]
    bars = ax.bar(np.arange(k), p, color=colors, zorder=2)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in p], fontsize=7, padding=2)
    if tau is not None:
        ax.axhline(float(tau), color=COLORS["tau"], ls="--", lw=1.5, zorder=3, label=f"τ = {float(tau):.4f}")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xticks(np.arange(k), labels=stats.languages, rotation=90 if k > 12 else 0)
    ax.set_ylabel("P(activation > 0)")
    ax.set_xlabel("language (coloured: active, p > τ)")
    ax.set_ylim(0, max(1e-6, float(p.max(initial=0)), float(tau or 0)) * 1.18)
    cls = CLASS_NAMES[int(nmap.classes[layer, neuron])]
    score = "" if nmap.scores is None else f", score {float(nmap.scores[layer, neuron]):.3f}"
    fig.suptitle(f"{model or short_model(nmap.meta.get('model'))}: layer {layer}, neuron {neuron} ({cls}{score})",
                 fontsize=11)
    return fig


def plot_lambda_sweep(meta: dict[str, Any], K: int, model: str = "") -> "Figure":
    """λ vs the number of selected neurons active in all K languages, chosen λ marked."""
    trace = meta["lambda_trace"]
    lam = np.array([float(t["lambda"]) for t in trace])
    app = np.array([float(t["appear_K"]) for t in trace])
    ok = np.array([bool(t.get("passes", t["appear_K"] == 0)) for t in trace])
    order = np.argsort(lam, kind="stable")
    fig = new_figure(6.0, 3.6)
    ax = fig.subplots()
    _style(ax)
    ax.plot(lam[order], app[order], color="#555555", lw=1, zorder=1)
    ax.scatter(lam[ok], app[ok], color=COLORS["general"], zorder=3, label=f"passes (appear[{K}] = 0)", s=28)
    ax.scatter(lam[~ok], app[~ok], facecolors="white", edgecolors=COLORS["tau"], zorder=3, s=28,
               label=f"fails (appear[{K}] > 0)")
    # label points with their evaluation order, skipping labels that would overlap (bisection clusters)
    span = float(lam.max() - lam.min()) or 1.0
    labelled: list[tuple[float, float]] = []
    top = float(app.max()) or 1.0
    for i, (x, y) in enumerate(zip(lam, app)):
        if all(abs(x - a) / span > 0.03 or abs(y - b) / top > 0.08 for a, b in labelled):
            ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center",
                        color="#555555")
            labelled.append((x, y))
    rng = (meta.get("params") or {}).get("lam_range")
    if rng and len(rng) == 2:
        ax.axvspan(float(rng[0]), float(rng[1]), color="#EEEEEE", zorder=0, lw=0, label="initial λ range")
    chosen = meta.get("lambda")
    if chosen is not None:
        ax.axvline(float(chosen), color=COLORS["accent"], ls="--", lw=1.5, label=f"chosen λ = {float(chosen):.4f}")
    ax.set_xlabel("λ (numbers: evaluation order)")
    ax.set_ylabel(f"selected neurons active in all {K} languages")
    ax.legend(fontsize=8, frameon=False)
    sat = f" ({saturation_text(meta, short=True)})" if meta.get("lambda_saturated") else ""
    fig.suptitle(f"{model or short_model(meta.get('model'))}: automatic λ search{sat}", fontsize=11)
    return fig


def saturation_text(meta: dict[str, Any], short: bool = False) -> str:
    """Plain words for a saturated λ search (the range's top already passed)."""
    rng = (meta.get("params") or {}).get("lam_range")
    widened = bool((meta.get("params") or {}).get("widen")) and meta.get("lambda_bracket") is not None
    top = f" {float(rng[1]):g}" if rng else ""
    if short:
        return f"range top{top} passed; range widened" if widened else f"saturated at the range top{top}"
    if widened:
        br = meta["lambda_bracket"]
        return (f"saturated: the range top{top} already passed, so the range was widened; the largest passing λ "
                f"lies in [{float(br[0]):.4g}, {float(br[1]):.4g}]")
    return f"saturated: even the range top{top} passes, so λ is the range's top"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) if len(text) > width else text


# -- all figures of a run ------------------------------------------------------------------
def _load_stats(run_dir: Path, nmap: "NeuronMap") -> tuple["ActivationStats | None", str]:
    from ..errors import LangNeuronsError
    from ..stats import ActivationStats

    try:
        stats = ActivationStats.load(run_dir)
        if stats.languages != nmap.languages:
            stats = stats.subset(nmap.languages)
    except LangNeuronsError as exc:
        return None, f"activation statistics are not available ({exc})"
    if (stats.num_layers, stats.num_neurons) != (nmap.num_layers, nmap.num_neurons):
        return None, "the activation statistics do not match the neuron map's shape"
    return stats, ""


def write_figures(run_dir: str | Path, an: "Anatomy", nmap: "NeuronMap",
                  stats: "ActivationStats | None" = None) -> list[FigureResult]:
    """Draw every figure into RUN_DIR/figures/ (PNG + SVG); figures that cannot be drawn come
    back with ``skipped`` set to the reason (the report prints it)."""
    run = RunDir(run_dir)
    out = run.figures_dir
    model = short_model(an.model or nmap.meta.get("model"))
    results: list[FigureResult] = []

    def draw(name: str, title: str, caption: str, make: Callable[[], "Figure"]) -> None:
        fig = make()
        png, svg = save_figure(fig, out, name)
        results.append(FigureResult(name, title, caption, png, svg))

    phases_txt = ("the four phases found by the segmentation are shaded and numbered P1–P4"
                  + ("" if an.phases_reliable else " (the segmentation is flagged as not reliable; see the note)")
                  if an.phases else "no phases could be segmented")
    draw("layer_classes", "Neuron classes per layer",
         "Per layer, the selected language-specific (orange) and language-related (blue) neurons, plus selected "
         "neurons active in no language (grey, hatched) on top; general neurons (active in every language, selected "
         f"or not) below; {phases_txt}.",
         lambda: plot_layer_classes(an, model))
    draw("appear", "Appear histogram",
         "Number of selected neurons by the number of languages in which they are active (p > τ). Bar 0 counts "
         "the unassigned selections, bar 1 the language-specific ones, bars 2..K−1 the language-related ones and "
         "bar K the selected neurons active in every language.",
         lambda: plot_appear(an, model))
    draw("language_heatmap", "Language neurons per language and layer",
         "Specific + related neurons of each language (rows) in each layer (columns); dashed lines mark the phase "
         "boundaries.", lambda: plot_language_heatmap(an, model))
    draw("overlap", "Language overlap",
         "Number of selected specific/related neurons active in both languages of a pair; the diagonal is each "
         "language's own count.", lambda: plot_overlap(an, model))

    # the example neuron needs the counts
    title, caption = "Example neuron", ""
    pick = pick_example_neuron(nmap)
    reason = ""
    if pick is None:
        reason = "no neuron is selected, so there is no example neuron"
    elif stats is None:
        stats, reason = _load_stats(run.path, nmap)
    if pick is not None and stats is not None:
        layer, neuron = pick
        from ..neurons import SPECIFIC

        kind = "specific" if int(nmap.classes[layer, neuron]) == SPECIFIC else "selected"
        why = ("the lowest selection score (the most language-specific)" if nmap.scores is not None
               else "the first in layer order (the map has no scores)")
        caption = (f"Activation probability P(activation > 0) of layer {layer}, neuron {neuron} in every language; "
                   "the dashed line is the activity threshold τ, coloured bars are the languages where the neuron "
                   f"counts as active. It is the {kind} neuron with {why}.")
        draw("example_neuron", title, caption, lambda: plot_example_neuron(stats, nmap, layer, neuron, model))
    else:
        results.append(FigureResult("example_neuron", title, caption, skipped=reason))

    meta = nmap.meta
    trace = meta.get("lambda_trace") or []
    if trace and meta.get("lambda") is not None:
        draw("lambda_sweep", "Automatic λ search",
             f"Each evaluated λ against the number of selected neurons active in all {nmap.K} languages (filled: "
             "passes, i.e. none; hollow: fails); the chosen λ is the largest passing one (dashed)."
             + (f" The search {saturation_text(meta)}." if meta.get("lambda_saturated") else ""),
             lambda: plot_lambda_sweep(meta, nmap.K, model))
    else:
        why = (f"the identification method ({meta.get('method') or 'unknown'}) has no λ"
               if meta.get("lambda") is None else "the neuron map carries no λ trace")
        results.append(FigureResult("lambda_sweep", "Automatic λ search", "", skipped=why))
    return results


_CHECK_TEXT = {
    "layers": "enough layers (more than 4 × the minimum phase length)",
    "signal": "the class curves vary over layers",
    "fit": "R² of the four-phase shape",
    "permutation": "permutation p (shuffled layer orders)",
    "low_middle": "low middle: phase 1 − phase 2 language level",
    "rise": "rise: end of phase 3 − phase 2 language level",
    "final_change": "final change: fall from phase 3's peak, or rise of general neurons",
}


def phase_evidence_html(an: "Anatomy") -> str:
    """The phase evidence as an HTML paragraph plus one table row per check (value, threshold, pass)."""
    from .sections import esc, table_html

    ev = an.phase_evidence
    checks = ev.get("checks") or []
    if not checks:
        return ""
    scales = ev.get("scales") or {}
    gen = ("general neurons are not available for this map (imported without statistics), so the language "
           "curve alone is segmented" if ev.get("general_available") is False
           else f"the general curve (scale {scales.get('general', float('nan')):,.4g}) only breaks ties")
    intro = ("<p>Evidence: the phases are the exact least-squares fit (dynamic programming over change points) "
             "of the shape <i>level, level, line, level</i> to the per-layer language neurons (specific + related), "
             f"divided by a robust scale ({esc(scales.get('language', '—'))}: the "
             f"{esc(ev.get('thresholds', {}).get('scale_quantile', 0.9))} quantile over layers) and clipped; "
             f"{esc(gen)}. Shape checks are in units of that scale. At least "
             f"{esc(ev.get('min_segment_layers', '—'))} layers per phase.</p>")
    rows = []
    for c in checks:
        v, th = c.get("value"), c.get("threshold")
        rows.append([_CHECK_TEXT.get(c["name"], c["name"]),
                     "—" if v is None else (round(float(v), 3) if isinstance(v, float) else v),
                     "—" if th is None else th, "yes" if c.get("passed") else "NO"])
    r2s = ev.get("r2_by_segments")
    ref = ("<p class=small>For reference, four plain levels (no line) explain R² = "
           + esc(", ".join(f"{i + 1}: {v:.3f}" for i, v in enumerate(r2s))) + " with 1–4 phases.</p>") if r2s else ""
    return intro + table_html(["check", "value", "threshold", "passed"], rows, cls="checks") + ref
