"""`langneurons compare RUN_A RUN_B [RUN_C ...] --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from .app import app, split_list


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN_A RUN_B [RUN_C ...]",
                                      help="Run directories: the reference (base) first, then the aligned "
                                           "model or later checkpoints."),
    out: Path = typer.Option(..., help="Directory for compare.html, tables/ (Parquet + CSV), figures/ and "
                                       "summary.json."),
    trained_langs: Optional[str] = typer.Option(
        None, help="Comma list of the languages in the alignment data (default: manifest align.trained_langs)."),
    lambda_policy: Optional[str] = typer.Option(
        None, "--lambda", help="When the runs chose different λ: 'own' keeps each run's λ, 'shared' re-identifies "
                               "the later runs with the first run's λ (needs their stats)."),
    pivot: str = typer.Option("en", help="Pivot language compared with all others."),
) -> None:
    """Compare the language neurons of a base model and its aligned version (or a checkpoint series)."""
    from ..compare import compare_runs
    from ..report.compare import build_compare_report

    if lambda_policy is not None and lambda_policy not in ("shared", "own"):
        raise LangNeuronsError(f"--lambda must be 'shared' or 'own', got {lambda_policy!r}")
    if len(runs) < 2:
        raise LangNeuronsError("compare needs at least two run directories (base first, then aligned)")
    out_resolved = out.resolve()
    if any(out_resolved == r.resolve() for r in runs):
        raise LangNeuronsError(f"--out {out} is one of the compared runs; give a separate directory "
                               "(the comparison writes its own figures/ and tables/)")
    comparison = compare_runs(runs, trained_langs=split_list(trained_langs),
                              lambda_policy=lambda_policy or "strict", pivot=pivot)  # type: ignore[arg-type]
    comparison.save(out)
    page = build_compare_report(comparison, out)
    s = comparison.summary
    typer.echo(f"compared {' -> '.join(s['runs'])} ({len(s['languages'])} languages, "
               f"{s['num_layers']} x {s['num_neurons']} neurons, λ policy {s['lambda_policy']})")
    totals = s["totals"]
    for cls in ("specific", "related", "general", "unassigned"):
        counts = "  ".join(f"{totals[label][cls]:>8,}" for label in s["runs"])
        typer.echo(f"{cls:>11}  {counts}   Δ {s['delta_totals'][cls]:+,}")
    for line in s["text"]:
        typer.echo(f"  {line}")
    typer.echo(f"wrote {out}/tables, {out}/summary.json and {page}")
