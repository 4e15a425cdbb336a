"""`langneurons steer RUN`: steer the output language with language neurons vs DiffMean vs random."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from .app import app, split_list


def _langs(value: str | None, what: str) -> list[str] | None:
    return None if value is None or value.strip() == "all" else split_list(value, what=what)


@app.command()
def steer(
    run_dir: Path = typer.Argument(..., help="Run directory (stats with sums, neuron map, eval_corpus.jsonl)."),
    src: str = typer.Option("all", "--from", help="Prompt language(s): a comma list or all."),
    tgt: str = typer.Option("all", "--to", help="Target language(s): a comma list or all."),
    classes: str = typer.Option("specific", help="Neuron classes of the target language, e.g. specific or "
                                "specific,related."),
    mode: str = typer.Option("set", help="set (a := S * target mean) | add (a += S * (target - source mean)) | "
                             "scale (a := S * a)."),
    strength: str = typer.Option("1,2", help="Strengths S of the neuron methods (comma list), or best (the best of "
                                 "steer.parquet)."),
    layers: str = typer.Option("all", help="Layer ranges of the neuron methods: all or e.g. '0-8;9-17' (inclusive)."),
    positions: str = typer.Option("both", help="both | prompt | generated: where the intervention acts."),
    neurons: str = typer.Option("target", help="target (the target language's neurons) | pair (also the source's)."),
    methods: str = typer.Option("neurons,random,diffmean", help="Comma list of neurons, random, diffmean, and for "
                                "a mixture of experts experts, random-experts (force the target's experts into "
                                "the router's top-k; S scales their logit); no intervention always runs."),
    diffmean_layers: Optional[str] = typer.Option(None, help="Blocks whose output gets the DiffMean vector (comma "
                                                  "list; default: the middle block)."),
    diffmean_strength: str = typer.Option("1,2,4", help="Strengths of the DiffMean vector, or best."),
    diffmean_docs: int = typer.Option(32, help="Identification documents per language for the mean residuals."),
    control_seeds: str = typer.Option("0", help="Seeds of the activity-matched random neurons."),
    prompts: int = typer.Option(8, help="Held-out documents (prompts) per source language."),
    prompt_fraction: float = typer.Option(0.3, help="Share of each document's characters used as the prompt."),
    max_new_tokens: int = typer.Option(32, help="Tokens generated per prompt (greedy)."),
    batch_size: int = typer.Option(8),
    diagonal: bool = typer.Option(False, help="Also steer a language to itself (a sanity check)."),
    model: Optional[str] = typer.Option(None, help="Model (default: the run's)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: the run's)."),
    device: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, help="Recompute (and drop the earlier rows of steer.parquet)."),
) -> None:
    """Steer continuations towards a language and measure forcing success, fidelity and fluency cost
    of language neurons, random neurons and DiffMean: writes steer.parquet and figures."""
    from ..config import ModelConfig
    from ..stages import SteerStage
    from ..steer import SteerConfig, summary_table

    if not (run_dir / "manifest.json").is_file():
        raise LangNeuronsError(f"{run_dir} is not a run directory (no manifest.json)")
    try:
        seeds = tuple(int(x) for x in control_seeds.split(",") if x.strip())
    except ValueError:
        raise LangNeuronsError(f"--control-seeds must be a comma list of integers, got {control_seeds!r}") from None
    cfg = SteerConfig(
        sources=_langs(src, "--from"), targets=_langs(tgt, "--to"), classes=classes, mode=mode, strengths=strength,
        layers=tuple(layers.split(";")), positions=positions, neurons=neurons,
        methods=tuple(split_list(methods, what="--methods") or ()), diffmean_layers=diffmean_layers,
        diffmean_strengths=diffmean_strength, diffmean_docs=diffmean_docs, control_seeds=seeds, prompts=prompts,
        prompt_fraction=prompt_fraction, max_new_tokens=max_new_tokens, batch_size=batch_size, diagonal=diagonal,
        model=ModelConfig(model=model, dtype=dtype, device=device), force=force).validate()
    stage = SteerStage(run_dir, cfg, by="steer")
    df = stage.run_stage(echo=typer.echo)
    table = summary_table(df[df["setting"] == stage.setting()] if "setting" in df.columns else df)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {run_dir / 'steer.parquet'} ({len(df)} rows), steer_generations.jsonl and figures/steer_*.png")
