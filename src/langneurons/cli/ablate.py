"""`langneurons ablate RUN_DIR`: the K x K intervention matrix of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import LangNeuronsError
from ..config import split_list
from .app import app


@app.command()
def ablate(
    run_dir: Path = typer.Argument(..., help="Run directory with neurons.safetensors (after `identify`)."),
    classes: Optional[list[str]] = typer.Option(
        None, "--classes", help="Neuron set(s): specific | specific,related | specific,related,general; repeat the "
        "option or separate sets with ';' (default: all three)."),
    control: str = typer.Option("matched", help="matched: random neurons of the same activity strata per layer; "
                                "layer: random neurons with the same per-layer counts; none: no control."),
    control_seeds: str = typer.Option("0,1,2", help="Seeds of the random control (one row per seed)."),
    control_bins: int = typer.Option(20, help="Activity strata per layer of the matched control."),
    metric: str = typer.Option("nll,ppl,bpb", help="Comma list of nll, ppl, bpb, accuracy (MGSM-style, generated), "
                               "choice_accuracy (multiple choice, e.g. Belebele)."),
    eval_corpus: Optional[Path] = typer.Option(None, help="Held-out texts per language (default: the run's "
                                               "eval_corpus.jsonl); an MGSM path when only accuracy is asked."),
    math_corpus: Optional[Path] = typer.Option(None, help="MGSM-style problems for --metric accuracy "
                                               "(mgsm_<lang>.tsv, JSON or JSONL) when perplexity is also asked."),
    choice_corpus: Optional[str] = typer.Option(None, help="Multiple-choice questions for --metric choice_accuracy: "
                                                "hf:belebele, or Belebele-style JSONL (docs/interventions.md)."),
    langs: Optional[str] = typer.Option(None, help="Comma list of languages (rows and columns; default: the "
                                        "neuron map's languages found in the corpus)."),
    batch_size: int = typer.Option(8),
    model: Optional[str] = typer.Option(None, help="Model (default: the run's manifest model)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16 (default: the run's dtype)."),
    device: Optional[str] = typer.Option(None),
    device_map: Optional[str] = typer.Option(None, help="e.g. auto, to spread a large model over GPUs."),
    max_memory: Optional[str] = typer.Option(None, help="Per-device memory caps, e.g. 0=20GiB,cpu=64GiB."),
    mlp_act_path: Optional[str] = typer.Option(None, help="Override: path of the activation module, with {i}."),
    scope: str = typer.Option("auto", help="auto | all | response: which tokens are scored (auto: response for "
                              "prompt/response pairs)."),
    max_length: Optional[int] = typer.Option(None, help="Truncate longer sequences (default: model context)."),
    max_examples: Optional[int] = typer.Option(None, help="Use at most this many examples per language."),
    max_new_tokens: int = typer.Option(256, help="Generation length for --metric accuracy."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap MGSM prompts in the tokenizer's chat "
                                        "template (default: when it has one)."),
    positions: str = typer.Option("all", help="all | generated: where neurons are zeroed during generation "
                                  "(--metric accuracy); perplexity always patches all positions."),
    bootstrap: int = typer.Option(0, help="Resamples of documents for 95% intervals of each delta (0: none)."),
    ppl_style: str = typer.Option("token", help="token: token-weighted NLL; paper: mean over documents of each "
                                  "document's mean NLL, then exp (the published aggregation)."),
    progress: bool = typer.Option(True, help="Show a progress bar over the matrix."),
    force: bool = typer.Option(False, help="Recompute every row (and use a map made for another model)."),
    accept_edited: bool = typer.Option(False, help="Use a neuron map that differs from what `identify` recorded."),
) -> None:
    """Deactivate each language's neurons and measure every language: writes ablation.parquet."""
    from ..config import AblationConfig, ModelConfig
    from ..stages import AblationStage

    if not run_dir.is_dir():
        raise LangNeuronsError(f"{run_dir} is not a run directory")
    cfg = AblationConfig(
        sets=tuple(classes or ()), control=control, control_seeds=control_seeds, control_bins=control_bins, metrics=tuple(split_list(metric) or ()),
        eval_corpus=eval_corpus, math_corpus=math_corpus, choice_corpus=choice_corpus, langs=split_list(langs, what="--langs"),
        batch_size=batch_size, scope=scope, positions=positions, bootstrap=bootstrap, max_length=max_length,
        max_examples=max_examples, max_new_tokens=max_new_tokens, chat=chat, progress=progress, force=force,
        ppl_style=ppl_style,
        model=ModelConfig(model=model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                          act_path=mlp_act_path)).validate()
    df = AblationStage(run_dir, cfg, by="ablate", accept_edited=accept_edited).run_stage(echo=typer.echo)
    _print_matrices(df, list(cfg.sets))
    typer.echo(f"wrote {run_dir / 'ablation.parquet'} ({len(df)} rows); heatmaps in {run_dir / 'figures'}")


def _print_matrices(df: Any, sets: list[str]) -> None:
    from ..report.ablation import matrices

    for metric in ("nll", "accuracy", "choice_accuracy"):
        mats = matrices(df, metric)
        for nset in [s for s in sets if s in mats] + [f"random:{s}" for s in sets if f"random:{s}" in mats]:
            tab, _ = mats[nset]
            what = {"nll": "ΔNLL/token (nats)", "accuracy": "Δaccuracy"}.get(metric, "Δmultiple-choice accuracy")
            typer.echo(f"\n{what}, {nset}{' (mean over seeds)' if nset.startswith('random:') else ''}; "
                       "rows: deactivated, columns: evaluated")
            typer.echo(tab.to_string(float_format=lambda v: f"{v:+.3f}"))
