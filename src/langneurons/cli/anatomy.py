"""`langneurons anatomy | report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import NeuronMapError
from .app import app


def _need_neurons(run_dir: Path) -> None:
    from ..runs import RunDir

    if not RunDir(run_dir).neurons_path.is_file():
        raise NeuronMapError(f"{run_dir} has no neurons.safetensors; run `langneurons identify` on it first")


def format_anatomy(an) -> str:  # noqa: ANN001 - Anatomy, imported lazily
    """The per-layer table and the phases with their evidence, as terminal text."""
    phase_of = an.phase_of_layer()
    lines = [f"{'layer':>5}  {'specific':>8}  {'related':>8}  {'general':>8}  {'unassigned':>10}  phase"]
    for layer in range(an.num_layers):
        lines.append(f"{layer:>5}  {an.per_layer['specific'][layer]:>8,}  {an.per_layer['related'][layer]:>8,}  "
                     f"{an.per_layer['general'][layer]:>8,}  {an.per_layer['unassigned'][layer]:>10,}  "
                     f"{phase_of[layer] or '-'}")
    t = an.totals
    lines.append(f"{'total':>5}  {t['specific']:>8,}  {t['related']:>8,}  {t['general']:>8,}  {t['unassigned']:>10,}")
    lines.append("")
    lines.append(f"selected {an.selected:,}; unassigned {an.unassigned:,} ({an.unassigned_share:.1%}); "
                 f"appear[N=0..{len(an.languages)}] = {an.appear}")
    lines.append(f"pivot: {an.pivot.get('note', '')}")
    lines.append("")
    lines.append("phases" + ("" if an.phases_reliable else " (NOT reliable)") + ":")
    for i, p in enumerate(an.phases):
        s = p.mean_share
        lines.append(f"  {i + 1}. {p.name:<42} layers {p.start:>3}-{p.end:<3} mean share: specific "
                     f"{s.get('specific', 0):.2%}, related {s.get('related', 0):.2%}, general {s.get('general', 0):.2%}")
    ev = an.phase_evidence
    if ev.get("r2_by_segments") is not None:
        pv = ev.get("p_value")
        lines.append("  evidence: R² by number of phases " + ", ".join(f"{i + 1}:{v:.3f}" for i, v in
                                                                      enumerate(ev["r2_by_segments"]))
                     + f"; 4th phase adds {ev.get('gain4', 0):.1%}; permutation p = "
                     + ("-" if pv is None else f"{pv:.3f}") + f"; min {ev.get('min_segment_layers')} layers/phase")
    if an.phases_note:
        lines.append(f"  note: {an.phases_note}")
    return "\n".join(lines)


@app.command()
def anatomy(run_dir: Path = typer.Argument(..., help="Run directory with neurons.safetensors."),
            pivot: str = typer.Option("en", help="Pivot language compared with the others."),
            accept_edited: bool = typer.Option(False, help="Use a neuron map that differs from what `identify` "
                                               "recorded (deliberately edited).")) -> None:
    """Per-layer neuron classes and the four phases; writes RUN_DIR/anatomy.json."""
    from ..stages import AnatomyStage

    _need_neurons(run_dir)
    an = AnatomyStage(run_dir, pivot, by="anatomy", accept_edited=accept_edited).run_stage(force=True)
    typer.echo(format_anatomy(an))
    typer.echo(f"wrote {run_dir / 'anatomy.json'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory with neurons.safetensors."),
           pivot: Optional[str] = typer.Option(None, help="Pivot language compared with the others "
                                                          "(default: the one in anatomy.json, else en)."),
           accept_edited: bool = typer.Option(False, help="Render artifacts that differ from what their stage "
                                              "recorded (deliberately edited).")) -> None:
    """Figures (PNG + SVG) and one self-contained RUN_DIR/report.html."""
    from ..report import build_report

    _need_neurons(run_dir)
    path = build_report(run_dir, pivot=pivot, accept_edited=accept_edited)
    typer.echo(str(path))
