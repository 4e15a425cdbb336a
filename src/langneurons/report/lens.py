"""Report section and figures of the logit lens (RUN_DIR/lens.parquet), beside the phases.

One figure per language: per layer the probability of the correct next token, the top-1 rate,
and the probability mass on the input language's tokens and on English tokens, with the phase
boundaries of anatomy.json as dashed lines (P1-P4 labelled), so the lens's "where does the
language come back" can be read against the neuron anatomy's phases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..lens import LENS_FILE, lens_summary
from .figures import COLORS, new_figure, save_figure
from .sections import esc, figure_html, note_html, register_section, table_html


def _phases(run_dir: Path) -> tuple[list[dict[str, Any]], bool | None]:
    path = run_dir / "anatomy.json"
    if not path.is_file():
        return [], None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return [], None
    return list(d.get("phases") or []), bool(d.get("phases_reliable"))


def plot_lens(df: Any, lang: str, phases: list[dict[str, Any]], english: str = "en", title: str = "") -> Any:
    g = df[df["lang"] == lang].sort_values("layer")
    fig = new_figure(6.4, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = g["layer"].tolist()
    ax.plot(x, g["p_correct"], color="black", lw=1.6, label="p(correct next token)")
    ax.plot(x, g["top1"], color="black", lw=1.0, ls=":", label="correct is top-1")
    if lang != english:
        ax.plot(x, g["lang_mass"], color=COLORS["specific"], lw=1.6, label=f"mass on {lang} tokens")
    ax.plot(x, g["en_mass"], color=COLORS["related"], lw=1.6, label="mass on English tokens")
    for i, ph in enumerate(phases):
        if i:
            ax.axvline(ph["start"] - 0.5, color="grey", ls="--", lw=0.8)
        ax.text((ph["start"] + ph["end"]) / 2, 1.02, f"P{i + 1}", ha="center", va="bottom", fontsize=8,
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("layer (residual after the block)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.set_title(title or f"Logit lens: {lang}", fontsize=10, pad=14)
    return fig


def write_lens_figures(run_dir: str | Path, english: str = "en") -> list[tuple[str, Path]]:
    """lens_<lang>.png/.svg into RUN_DIR/figures/; returns [(lang, png)]."""
    import pandas as pd

    run_dir = Path(run_dir)
    df = pd.read_parquet(run_dir / LENS_FILE)
    phases, _ = _phases(run_dir)
    out = []
    for lang in dict.fromkeys(df["lang"].tolist()):
        png, _svg = save_figure(plot_lens(df, lang, phases, english), run_dir / "figures", f"lens_{lang}")
        out.append((str(lang), png))
    return out


def _phase_of(layer: int | None, phases: list[dict[str, Any]]) -> str:
    if layer is None:
        return "—"
    for i, ph in enumerate(phases):
        if ph["start"] <= layer <= ph["end"]:
            return f"P{i + 1}"
    return "—"


def render_section(run_dir: str | Path) -> str | None:
    import pandas as pd

    run_dir = Path(run_dir)
    if not (run_dir / LENS_FILE).is_file():
        return None
    df = pd.read_parquet(run_dir / LENS_FILE)
    summary = lens_summary(df)
    phases, reliable = _phases(run_dir)
    rows = []
    for lang, s in summary.items():
        over, top = s["overtakes_english"], s["correct_top1"]
        rows.append([lang, "—" if over is None else f"{over} ({_phase_of(over, phases)})",
                     "—" if top is None else f"{top} ({_phase_of(top, phases)})",
                     round(s["final_p_correct"], 3), round(s["final_top1"], 3), s["n_tokens"]])
    phase_txt = (", ".join(f"P{i + 1} {p['start']}–{p['end']}" for i, p in enumerate(phases))
                 + ("" if reliable else " (segmentation not reliable)")) if phases else "no phases (no anatomy.json)"
    parts = [
        "<p>The residual stream after every block, sent through the model's own final norm and unembedding "
        "(logit lens). <i>Overtakes English</i>: the first layer from which the probability mass on the input "
        "language's tokens stays above the mass on English tokens (— never; not defined for English). <i>Correct "
        "top-1</i>: the first layer from which the top-1 rate stays at least half its last-layer value. Phases: "
        f"{esc(phase_txt)}.</p>",
        table_html(["language", "overtakes English at layer", "correct top-1 from layer", "final p(correct)",
                    "final top-1", "tokens"], rows),
    ]
    try:
        figs = write_lens_figures(run_dir)
    except Exception as exc:  # noqa: BLE001 - the table is still useful
        from .html import strict

        if strict():
            raise
        parts.append(note_html(f"lens figures could not be drawn: {exc}", "warn"))
        figs = []
    for lang, png in figs:
        parts.append(figure_html(png, f"logit lens {lang}",
                                 f"Logit lens on {lang} texts: per layer, p(correct next token), top-1 rate, mass on "
                                 f"{lang} and on English tokens; dashed lines are the phase boundaries."))
    return "\n".join(parts)


register_section("lens", "Logit lens", render_section, order=45)
