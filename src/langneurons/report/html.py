"""`build_report(run_dir)`: one self-contained HTML page per run.

Everything is inline: CSS in a <style> element, figures as base64 PNG data URIs, no scripts,
no fonts, no external links, so the file can be mailed, archived or opened offline.
Sections come from the registry in `sections.py`; each appears only when its artifact exists.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import LangNeuronsError
from ..io import atomic_write_text, read_parquet
from ..runs import RunDir
from .figures import FigureResult, phase_evidence_html, saturation_text, short_model, write_figures
from .sections import esc, figure_html, note_html, register_section, sections, table_html

if TYPE_CHECKING:
    from ..anatomy import Anatomy
    from ..neurons import NeuronMap

log = logging.getLogger(__name__)

#: report modules that are not section plug-ins (everything else in the package is imported)
_OWN_MODULES = {"figures", "html", "sections"}


@dataclass
class ReportContext:
    """What the built-in sections (and plug-ins that ask for it) get besides the run directory."""

    run_dir: Path
    manifest: dict[str, Any]
    nmap: "NeuronMap | None" = None
    anatomy: "Anatomy | None" = None
    figures: dict[str, FigureResult] = field(default_factory=dict)

    @property
    def model(self) -> str:
        m = self.manifest.get("model")
        if isinstance(m, dict) and m.get("model"):
            return str(m["model"])
        if self.nmap is not None and self.nmap.meta.get("model"):
            return str(self.nmap.meta["model"])
        return self.run_dir.name

    def figure(self, name: str) -> str:
        """The figure's HTML, or a note saying why it is missing ('' when it was never drawn)."""
        fig = self.figures.get(name)
        if fig is None:
            return ""
        if not fig.ok:
            return note_html(f"{fig.title}: not shown, {fig.skipped}.")
        return figure_html(fig.png, alt=f"{fig.title} ({short_model(self.model)})", caption=fig.caption,
                           fig_id=f"figure-{fig.name}")


# -- built-in sections ------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _section_manifest(run_dir: Path, ctx: ReportContext) -> str | None:
    man, nmap = ctx.manifest, ctx.nmap
    if not man and nmap is None:
        return None
    model = man.get("model") if isinstance(man.get("model"), dict) else {}
    stages = man.get("stages") if isinstance(man.get("stages"), dict) else {}

    def section(name: str) -> dict[str, Any]:
        rec = stages.get(name)
        return rec.get("result") or {} if isinstance(rec, dict) else {}

    rec = section("record")
    meta = nmap.meta if nmap is not None else {}
    params = meta.get("params") or {}
    ident = section("identify")
    rows: list[list[Any]] = [
        ["model", ctx.model],
        ["architecture / family", f"{model.get('architecture', '—')} / {model.get('family', '—')}"],
        ["hook point", model.get("hook_point", "—")],
        ["layers × neurons", f"{model.get('num_layers', nmap.num_layers if nmap else '—')} × "
                             f"{model.get('num_neurons', nmap.num_neurons if nmap else '—')}"],
        ["dtype", model.get("dtype", "—")],
        ["revision / fingerprint", f"{model.get('revision') or '—'} / {model.get('model_fingerprint') or '—'}"],
        ["corpus", rec.get("corpus", "—")],
        ["token scope", f"{rec.get('scope', meta.get('scope', '—'))}"
                        + ("" if rec.get("include_special") is None
                           else f" (special tokens {'counted' if rec['include_special'] else 'not counted'})")],
        ["languages", ", ".join(man.get("languages") or (nmap.languages if nmap else []))],
    ]
    if nmap is not None:
        lam = meta.get("lambda")
        sat = meta.get("lambda_saturated")
        rows += [
            ["identification method", meta.get("method", ident.get("method", "—"))],
            ["τ (activity threshold)", _fmt(meta.get("tau"), 6)],
            ["bar (τ quantile)", _fmt(params.get("bar"))],
            ["top_rate (selected share)", _fmt(params.get("top_rate"))],
            ["λ", "not used by this method" if lam is None else
             f"{_fmt(lam)} ({'fixed' if params.get('lam') not in (None, 'auto') else 'automatic'}; search range "
             f"{params.get('lam_range', '—')}; {saturation_text(meta) if sat else 'not saturated'})"],
            ["selected neurons", _fmt(meta.get("num_selected", int(nmap.selected.sum())))],
        ]
    versions = man.get("versions") or meta.get("versions") or {}
    if versions:
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items())])
    out = [table_html(["", ""], rows, cls="facts")]
    tokens = rec.get("tokens") or {}
    if tokens:
        total = sum(int(v) for v in tokens.values())
        out.append("<h3>Counted tokens per language</h3>")
        out.append(table_html(["language", "tokens"], [[k, int(v)] for k, v in tokens.items()],
                              footer=[["total", total]]))
    if man:
        out.append("<details><summary>manifest.json</summary><pre>"
                   + esc(json.dumps(man, indent=2, ensure_ascii=False, default=str)) + "</pre></details>")
    return "\n".join(out)


def _section_summary(run_dir: Path, ctx: ReportContext) -> str | None:
    an = ctx.anatomy
    if an is None:
        return None
    rows = [[lang, v["specific"], v["related"], v["language"], v["general"]] for lang, v in an.per_language.items()]
    foot = [["all (distinct neurons)", an.totals["specific"], an.totals["related"],
             an.totals["specific"] + an.totals["related"], an.totals["general"]]]
    out = ["<p>Per language: selected neurons active only in this language (specific), in this and some "
           "but not all other languages (related), and neurons active in every language (general). A related "
           "neuron counts for each of its languages, so the rows add up to more than the total.</p>",
           table_html(["language", "specific", "related", "specific + related", "general"], rows, footer=foot)]
    facts = [["selected neurons", an.selected],
             ["unassigned (selected, active in no language; never ablated)",
              f"{an.unassigned:,} ({an.unassigned_share:.1%} of the selection)"]]
    out.append(table_html(["", ""], facts, cls="facts"))
    if an.unassigned:
        out.append(note_html(f"{an.unassigned:,} selected neurons ({an.unassigned_share:.1%}) are active in no "
                             "language (p ≤ τ everywhere): they are reported, not treated as language neurons.",
                             "warn"))
    out.append(note_html(f"Pivot: {an.pivot.get('note', '')}"))
    return "\n".join(out)


def _section_identification(run_dir: Path, ctx: ReportContext) -> str | None:
    if ctx.nmap is None:
        return None
    an = ctx.anatomy
    parts = []
    if an is not None:
        k = len(an.languages)
        parts.append(table_html(["active in N languages"] + [str(i) for i in range(k + 1)],
                                [["selected neurons"] + list(an.appear)]))
    parts += [ctx.figure("appear"), ctx.figure("lambda_sweep"), ctx.figure("example_neuron")]
    return "\n".join(p for p in parts if p)


def _section_anatomy(run_dir: Path, ctx: ReportContext) -> str | None:
    an = ctx.anatomy
    if an is None:
        return None
    out = []
    if an.phases:
        rows = [[i + 1, p.name, f"{p.start}–{p.end}", p.layers, f"{p.mean_share.get('specific', 0):.2%}",
                 f"{p.mean_share.get('related', 0):.2%}", f"{p.mean_share.get('general', 0):.2%}"]
                for i, p in enumerate(an.phases)]
        out.append(table_html(["phase", "name", "layers", "n layers", "specific", "related", "general"], rows,
                              cls="phases"))
        out.append("<p class=small>Shares are means over the phase's layers of the class count divided by the "
                   f"layer's {an.num_neurons:,} neurons.</p>")
    ev = an.phase_evidence
    out.append(phase_evidence_html(an))
    if an.phases_reliable:
        out.append(note_html("The four-phase segmentation is reliable: every check below passed."
                             + (f" Note: {an.phases_note}." if an.phases_note else ""), "ok"))
    else:
        missing = ", ".join(ev.get("missing") or []) or "see the note"
        out.append(note_html(f"The four-phase segmentation is not reliable (missing: {missing}): "
                             f"{an.phases_note}.", "warn"))
    out += [ctx.figure("layer_classes"), ctx.figure("language_heatmap"), ctx.figure("overlap")]
    phase_of = an.phase_of_layer()
    rows = [[layer, an.per_layer["specific"][layer], an.per_layer["related"][layer], an.per_layer["general"][layer],
             an.per_layer.get("unassigned", [0] * an.num_layers)[layer], phase_of[layer] or "—"]
            for layer in range(an.num_layers)]
    out.append("<details><summary>Per-layer counts</summary>"
               + table_html(["layer", "specific", "related", "general", "unassigned", "phase"], rows) + "</details>")
    return "\n".join(o for o in out if o)


def _ablation_tables(path: Path, max_tables: int = 12) -> str:
    """Plain tables of ablation.parquet (used when report.ablation offers no section)."""
    df = read_parquet(path, "run `langneurons ablate` again")
    need = {"deactivated_lang", "eval_lang", "neuron_set", "metric", "delta"}
    if not need <= set(df.columns):
        return note_html(f"{path.name} lacks columns {sorted(need - set(df.columns))}; cannot show it.", "warn")
    out = ["<p>Change of each metric (ablated − base) in the evaluated language (columns) when the neurons of "
           "the deactivated language (rows) are set to zero.</p>"]
    metrics = sorted(df["metric"].unique(), key=lambda m: (["nll", "bpb", "ppl", "accuracy", "choice_accuracy"] + [m]).index(m))
    shown = 0
    for metric in metrics:
        for nset in sorted(df.loc[df["metric"] == metric, "neuron_set"].unique()):
            if shown >= max_tables:
                out.append(note_html(f"… {path.name} has more tables than shown here."))
                return "\n".join(out)
            sub = df[(df["metric"] == metric) & (df["neuron_set"] == nset)]
            tab = sub.pivot_table(index="deactivated_lang", columns="eval_lang", values="delta", aggfunc="mean")
            out.append(f"<h3>Δ{esc(metric)}, neuron set {esc(nset)}</h3>")
            rows = [[idx] + [float(v) for v in row] for idx, row in zip(tab.index, tab.to_numpy())]
            out.append(table_html(["deactivated \\ evaluated"] + [str(c) for c in tab.columns], rows))
            shown += 1
    return "\n".join(out)


def _section_interventions(run_dir: Path, ctx: ReportContext) -> str | None:
    path = RunDir(run_dir).ablation_path
    if not path.exists():
        return None
    try:
        from . import ablation  # owned by the intervention stage; may not exist yet
    except ImportError:
        ablation = None
    render = getattr(ablation, "render_section", None)
    if render is not None:
        try:
            fragment = render(run_dir)
            if fragment:
                return fragment
        except LangNeuronsError:  # a damaged artifact is the user's to fix, not a rendering failure
            raise
        except Exception as exc:  # a broken plug-in must not lose the rest of the report
            if strict():
                raise
            log.warning("report.ablation.render_section failed (%s); showing plain tables", exc)
            return note_html(f"The interventions view failed ({exc}); plain tables instead.", "warn") + \
                _ablation_tables(path)
    return _ablation_tables(path)


register_section("manifest", "Run", _section_manifest, order=10, takes_context=True)
register_section("summary", "Language neurons", _section_summary, order=20, takes_context=True)
register_section("identification", "Identification", _section_identification, order=30, takes_context=True)
register_section("anatomy", "Layer anatomy and the four phases", _section_anatomy, order=40, takes_context=True)
register_section("interventions", "Interventions", _section_interventions, order=50, takes_context=True)


# -- assembling the page ---------------------------------------------------------------------
def discover_plugins() -> list[str]:
    """Import every other module of ``langneurons.report`` so that it can register its section."""
    from .. import report as pkg

    loaded = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _OWN_MODULES or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
            loaded.append(info.name)
        except Exception as exc:  # one broken plug-in must not break the report
            if strict():
                raise
            log.warning("report plug-in %s could not be imported: %s", info.name, exc)
    return loaded


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#222;
 max-width:1100px;margin:0 auto;padding:1.5rem 1.5rem 4rem;line-height:1.45;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;border-bottom:2px solid #ddd;padding-bottom:.2rem;
 margin-top:2.2rem} h3{font-size:1.02rem;margin-top:1.4rem}
.sub{color:#666;margin-top:0} nav{background:#f6f6f6;padding:.5rem .8rem;border-radius:6px;font-size:.92rem}
nav a{margin-right:1rem;color:#0060a0;text-decoration:none}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem} th,td{padding:.22rem .6rem;border-bottom:1px solid #e4e4e4;
 text-align:left;vertical-align:top} th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600;border-top:2px solid #ccc} table.facts td:first-child{color:#555;white-space:nowrap}
figure{margin:1.2rem 0;padding:.6rem;border:1px solid #eee;border-radius:6px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto} figcaption{font-size:.88rem;color:#444;margin-top:.4rem}
p.note{background:#f4f8fb;border-left:4px solid #0072B2;padding:.4rem .7rem}
p.warn{background:#fff6e8;border-left:4px solid #E69F00;padding:.4rem .7rem}
p.ok{background:#eef8f3;border-left:4px solid #009E73;padding:.4rem .7rem}
p.error{background:#fdecea;border-left:4px solid #D55E00;padding:.4rem .7rem}
.small{font-size:.85rem;color:#555} pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:.8rem}
details{margin:.8rem 0} summary{cursor:pointer;color:#0060a0}
"""


def strict() -> bool:
    """``LANGNEURONS_STRICT_REPORT=1`` (set by the test suite): a section or figure that fails to
    render raises instead of showing an error note, so a crashing renderer fails the tests."""
    import os

    return os.environ.get("LANGNEURONS_STRICT_REPORT") == "1"


def _render(section: Any, run_dir: Path, ctx: ReportContext) -> str | None:
    try:
        frag = section.render(run_dir, ctx) if section.takes_context else section.render(run_dir)
    except LangNeuronsError:  # damaged input (e.g. a truncated ablation.parquet): one error line, no report
        raise
    except Exception as exc:  # noqa: BLE001 - show, do not crash the whole report
        if strict():
            raise
        log.warning("report section %s failed: %s", section.name, exc)
        frag = note_html(f"This section could not be rendered: {type(exc).__name__}: {exc}", "error")
    return frag or None


def build_report(run_dir: str | Path, pivot: str | None = None, *, accept_edited: bool = False) -> Path:
    """Write RUN_DIR/report.html (and the figures under RUN_DIR/figures/); returns its path.

    Computes (and saves) the anatomy when anatomy.json is missing or stale. ``pivot`` defaults to
    the pivot of an existing anatomy.json, else "en".
    """
    from ..anatomy import load_or_analyze
    from ..neurons import NeuronMap

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise LangNeuronsError(f"{run.path} is not a directory; give a run directory written by langneurons")
    from ..stage import verify_inputs

    manifest = run.read_manifest()
    # Every number on the page comes from a stage's artifact: an edited or corrupted one is refused.
    verify_inputs(run, *[n for n in (manifest.get("stages") or {}) if n != "report"], accept_edited=accept_edited)
    has_neurons = run.neurons_path.is_file()
    if not manifest and not has_neurons:
        raise LangNeuronsError(f"{run.path} holds neither manifest.json nor neurons.safetensors; "
                               "run `langneurons record` and `langneurons identify` first")
    ctx = ReportContext(run.path, manifest)
    if has_neurons:
        ctx.nmap = NeuronMap.load(run.neurons_path)
        if not ctx.nmap.meta.get("model"):
            ctx.nmap.meta["model"] = ctx.model
        ctx.anatomy = load_or_analyze(run.path, pivot, accept_edited=accept_edited)
        ctx.figures = {f.name: f for f in write_figures(run.path, ctx.anatomy, ctx.nmap)}
    discover_plugins()
    body, nav = [], []
    for section in sections():
        frag = _render(section, run.path, ctx)
        if frag is None:
            continue
        sid = f"section-{section.name}"
        nav.append(f'<a href="#{sid}">{esc(section.title)}</a>')
        body.append(f'<section id="{sid}">\n<h2>{esc(section.title)}</h2>\n{frag}\n</section>')
    title = f"Language neurons of {short_model(ctx.model)}"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header id=\"report-header\"><h1>{esc(title)}</h1>\n"
        f"<p class=\"sub\">{esc(ctx.model)} · run directory {esc(run.path.name)} · langneurons {esc(__version__)}</p>\n"
        f"<nav>{''.join(nav)}</nav></header>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n"
    )
    path = atomic_write_text(run.report_path, page)
    from ..stage import commit_stage

    # The report reads every stage's artifact; its key is their checksums (audit, not freshness:
    # `report` always renders again, it takes seconds).
    inputs = {name: rec.get("outputs") for name, rec in (manifest.get("stages") or {}).items()
              if isinstance(rec, dict) and name != "report"}
    commit_stage(run, "report", inputs, [path], {"file": run.report_path.name,
                                                 "sections": [s.split('"')[1] for s in body],
                                                 "figures": sorted(n for n, f in ctx.figures.items() if f.ok)},
                 0.0, by="report")
    return path
