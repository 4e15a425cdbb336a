"""`langneurons stability RUN_DIR`: stability of the neuron sets and a chance baseline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import LangNeuronsError
from .app import app


def parse_null(value: str | None) -> int:
    """'permutations=100' or '100' -> 100; None/'' -> 0 (no null)."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    key, sep, number = text.partition("=")
    if sep and key.strip() != "permutations":
        raise LangNeuronsError(f"--null takes permutations=N (e.g. permutations=100), got {value!r}")
    try:
        n = int((number if sep else text).strip())
    except ValueError:
        raise LangNeuronsError(f"--null takes permutations=N (e.g. permutations=100), got {value!r}") from None
    if n < 1:
        raise LangNeuronsError(f"--null needs at least 1 permutation, got {n}")
    return n


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _echo_failures(rows: list[dict[str, Any]]) -> None:
    errors = [r["error"] for r in rows if r.get("error")]
    if errors:
        common = max(set(errors), key=errors.count)
        typer.echo(f"note: {len(errors)} left out, identification failed ({common})")


@app.command()
def stability(
    run_dir: Path = typer.Argument(..., help="Run directory recorded with per-bucket counts (the default)."),
    resamples: int = typer.Option(200, help="Bootstrap resamples of each language's documents (0: skip)."),
    method: Optional[str] = typer.Option(None, help="lape | entropy-lambda (default: the run's method)."),
    lam: str = typer.Option("run", "--lambda", help="entropy-lambda: run (what the run did), auto (search λ "
                            "again in every resample), fixed (keep the run's λ) or a number."),
    quick: bool = typer.Option(False, help="Split-half agreement instead of the bootstrap (two fits)."),
    seed: int = typer.Option(0, help="Seed of the resampling (results are reproducible)."),
    null: Optional[str] = typer.Option(None, help="Chance baseline: permutations=N relabellings of the documents "
                                       "(e.g. permutations=100)."),
    core: float = typer.Option(0.9, help="Stable core: neurons selected in at least this share of resamples."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (1 is often fastest on a busy machine)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Bootstrap the documents to measure how stable the neuron sets are (selection frequency,
    expected Jaccard overlap, stable core), and permute languages for a chance baseline."""
    from .. import confidence as conf

    permutations = parse_null(null)
    if resamples < 0:
        raise LangNeuronsError(f"--resamples must be >= 0, got {resamples}")
    if not quick and resamples == 1:
        raise LangNeuronsError("--resamples must be 0 (skip) or >= 2; 200 is a good default")
    if not quick and resamples == 0 and not permutations:
        raise LangNeuronsError("nothing to do: --resamples 0 and no --null; give --resamples N, --quick or --null")
    if not 0 < core <= 1:
        raise LangNeuronsError(f"--core must be in (0, 1], got {core}")
    if threads is not None:
        if threads < 1:
            raise LangNeuronsError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    if not run_dir.is_dir():
        raise LangNeuronsError(f"{run_dir} is not a run directory; give one written by `langneurons record`")

    if quick:
        sh = conf.run_split_half(run_dir, method=method, lam=lam, seed=seed)
        typer.echo(f"split-half agreement ({sh.spec.method}; each half has half of every language's documents, "
                   "so this is a lower bound):")
        for name, j in sh.jaccard.items():
            a, b = sh.sizes[name]
            typer.echo(f"  {name:>16}  Jaccard {_fmt(j)}  (sizes {a:,} / {b:,})")
        typer.echo(f"wrote {run_dir / conf.SPLIT_HALF_FILE}")
    elif resamples:
        res = conf.run_stability(run_dir, resamples=resamples, method=method, lam=lam, seed=seed, core=core,
                                 progress=progress)
        s = res.summary()
        typer.echo(f"{res.valid} of {res.resamples} bootstrap resamples identified ({res.spec.method}, "
                   f"{res.num_buckets} buckets per language, {s['seconds_per_resample']:.2f} s per resample)")
        _echo_failures(res.per_resample)
        typer.echo(f"{'set':>16}  {'E[Jaccard]':>10}  {'J(full) mean [2.5%, 97.5%]':>28}  {'full':>7}  {'core':>7}")
        for name, d in res.per_set.items():
            interval = f"{_fmt(d['jaccard_full_mean'])} [{_fmt(d['jaccard_full_low'])}, {_fmt(d['jaccard_full_high'])}]"
            typer.echo(f"{name:>16}  {_fmt(d['expected_jaccard']):>10}  {interval:>28}  "
                       f"{int(d['full_size']):>7,}  {int(d['stable_core']):>7,}")
        typer.echo(f"stable core (selected in >= {core:.0%} of resamples): {s['stable_core']:,} neurons, "
                   f"{s['stable_core_in_full']:,} of the {s['full_selected']:,} selected on the full data; "
                   f"{s['ever_selected']:,} neurons selected at least once")
        if s.get("lambda_saturated"):
            typer.echo(f"note: the λ search saturated in {s['lambda_saturated']} resample(s)")
        typer.echo(f"wrote {run_dir / conf.STABILITY_FILE}, {run_dir / conf.STABILITY_LANG_FILE}"
                   + (" and the neuron map's selection_freq / stable_core" if s.get("neuron_map_updated") else ""))
    if permutations:
        nr = conf.run_null(run_dir, permutations=permutations, method=method, lam=lam, seed=seed, progress=progress)
        valid = len(nr.values("specific"))
        typer.echo(f"chance baseline: {valid} of {permutations} relabellings identified (documents' language labels "
                   "permuted between bucket groups)")
        _echo_failures(nr.null)
        typer.echo(f"{'count':>16}  {'observed':>9}  {'null mean':>9}  {'null 95%':>9}  {'p-value':>8}  {'FDR est.':>8}")
        for stat in ("specific", "related", "language", "selected_active"):
            t = nr.test(stat)
            typer.echo(f"{stat:>16}  {t['observed']:>9,}  {_fmt(t['null_mean'], 1):>9}  {_fmt(t['null_q95'], 1):>9}  "
                       f"{_fmt(t['p_value']):>8}  {_fmt(t['fdr']):>8}")
        typer.echo(f"wrote {run_dir / conf.NULL_FILE}")
