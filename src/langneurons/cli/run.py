"""`langneurons run`: the whole analysis in one command (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from .app import app, split_list


@app.command()
def run(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (re-running resumes)."),
    model: str = typer.Option("gemma-3-270m", help="Alias (gemma-3-270m, smollm2-135m), local HF directory or .gguf."),
    corpus: Optional[Path] = typer.Option(None, help="Corpus (default: the embedded 10-language parallel corpus)."),
    langs: Optional[str] = typer.Option(None, help="Comma list of languages (default: all in the corpus)."),
    scope: str = typer.Option("all", help="all | response"),
    holdout: float = typer.Option(0.2, help="Fraction of documents held out for the ablation perplexities."),
    method: str = typer.Option("entropy-lambda", help="entropy-lambda | lape"),
    top_rate: float = typer.Option(0.01),
    bar: float = typer.Option(0.95),
    lam: str = typer.Option("auto", "--lambda", help="auto or a number"),
    sets: str = typer.Option("specific;specific,related;specific,related,general",
                             help="Neuron sets to deactivate, ';'-separated (each a comma list of classes)."),
    control: str = typer.Option("random", help="random | none"),
    control_seeds: str = typer.Option("0,1,2", help="Seeds of the random control sets."),
    batch_size: int = typer.Option(8),
    max_tokens_per_lang: Optional[int] = typer.Option(None),
    max_eval_docs: Optional[int] = typer.Option(None, help="Cap held-out documents per language."),
    dtype: str = typer.Option("float32"),
    device: Optional[str] = typer.Option(None),
    pivot: str = typer.Option("en"),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of evaluation documents for ΔNLL intervals (0: none)."),
    stability: int = typer.Option(0, help="Bootstrap resamples of the identification (0: skip)."),
    skip_ablation: bool = typer.Option(False, help="Stop after anatomy (no intervention matrix)."),
    force: bool = typer.Option(False, help="Redo every stage."),
) -> None:
    """Record -> identify (auto λ) -> anatomy -> ablation matrix -> report.html."""
    from ..pipeline import RunConfig, run_pipeline

    from ..identify import METHODS

    # Everything is checked before the model loads: a bad option must not cost a recording.
    checks = [
        (scope in ("all", "response"), f"--scope must be 'all' or 'response', got {scope!r}"),
        (method in METHODS, f"--method must be one of {', '.join(sorted(METHODS))}, got {method!r}"),
        (0 < top_rate <= 1, f"--top-rate must be in (0, 1], got {top_rate}"),
        (0 < bar <= 1, f"--bar must be in (0, 1], got {bar}"),
        (0 < holdout <= 0.5, f"--holdout must be in (0, 0.5], got {holdout}"),
        (control in ("random", "none"), f"--control must be 'random' or 'none', got {control!r}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (max_tokens_per_lang is None or max_tokens_per_lang >= 1,
         f"--max-tokens-per-lang must be >= 1, got {max_tokens_per_lang}"),
        (max_eval_docs is None or max_eval_docs >= 1, f"--max-eval-docs must be >= 1, got {max_eval_docs}"),
        (bootstrap >= 0, f"--bootstrap must be >= 0 (0: no intervals), got {bootstrap}"),
        (stability >= 0, f"--stability must be >= 0 (0: skip), got {stability}"),
        (langs is None or len(split_list(langs) or []) >= 2, f"--langs needs at least 2 languages, got {langs!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LangNeuronsError(message)
    try:
        lam_value: str | float = lam if lam == "auto" else float(lam)
        seeds = tuple(int(s) for s in (split_list(control_seeds) or []))
    except ValueError:
        raise LangNeuronsError("--lambda must be 'auto' or a number, --control-seeds a comma list of integers") from None
    if not isinstance(lam_value, str) and lam_value < 0:
        raise LangNeuronsError(f"--lambda must be >= 0, got {lam_value}")
    from ..neurons import parse_classes

    neuron_sets = tuple(",".join(parse_classes(x)) for x in sets.split(";") if x.strip())
    if not neuron_sets:
        raise LangNeuronsError("--sets needs at least one neuron set, e.g. 'specific,related'")
    cfg = RunConfig(out=out, neuron_sets=neuron_sets, model=model, corpus=corpus, langs=split_list(langs), scope=scope, holdout=holdout,
                    method=method, top_rate=top_rate, bar=bar, lam=lam_value,
                    control=None if control == "none" else control, control_seeds=seeds, batch_size=batch_size,
                    max_tokens_per_lang=max_tokens_per_lang, max_eval_docs=max_eval_docs, dtype=dtype, device=device,
                    pivot=pivot, bootstrap=bootstrap, stability=stability, skip_ablation=skip_ablation,
                    force=force)
    report = run_pipeline(cfg, echo=typer.echo)
    typer.echo(f"report: {report}")
