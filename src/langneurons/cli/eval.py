"""`langneurons eval`: lm-evaluation-harness tasks under a grid of interventions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import split_list
from .app import app


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="Run directory (its model, revision and neuron map are used)."),
    tasks: str = typer.Option(..., help="Comma list of lm-eval tasks, e.g. mgsm_direct_de,belebele_deu_Latn."),
    deactivate: Optional[str] = typer.Option(None, help="Comma list of languages: each one's neurons are "
                                             "intervened on in its own cell of the grid."),
    classes: str = typer.Option("specific", help="Neuron sets, ';'-separated (each a comma list of classes)."),
    mode: str = typer.Option("zero", help="zero | scale (--factor) | set (to the mean in --set-lang)."),
    factor: float = typer.Option(0.0, help="--mode scale: the factor."),
    set_lang: Optional[str] = typer.Option(None, help="--mode set: the language whose mean activation is used."),
    baseline: bool = typer.Option(True, help="Also run the unmodified model (= lm-eval's hf model)."),
    include_path: Optional[Path] = typer.Option(None, help="Folder of local task YAML files."),
    limit: Optional[float] = typer.Option(None, help="Documents per task (a fraction if < 1)."),
    num_fewshot: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(8),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Apply the tokenizer's chat template."),
    gen_kwargs: Optional[str] = typer.Option(None, help="lm-eval generation kwargs, e.g. max_gen_toks=256."),
    model: Optional[str] = typer.Option(None, help="Model (default: the run's, at its recorded commit)."),
    dtype: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    revision: Optional[str] = typer.Option(None),
    trust_remote_code: bool = typer.Option(False),
    mlp_act_path: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, help="Run again even when the results are current."),
) -> None:
    """Run lm-eval tasks on the run's model under each intervention; results go into RUN/eval/."""
    from ..config import ModelConfig, parse_class_sets
    from ..evalharness import EvalConfig, EvalStage, results_table

    cfg = EvalConfig(tasks=tuple(split_list(tasks, what="--tasks") or ()),
                     deactivate=tuple(split_list(deactivate, what="--deactivate") or ()),
                     classes=parse_class_sets(classes), mode=mode, factor=factor, set_lang=set_lang,
                     baseline=baseline, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                     batch_size=batch_size, apply_chat_template=chat, gen_kwargs=gen_kwargs,
                     model=ModelConfig(model=model, dtype=dtype, device=device, revision=revision,
                                       trust_remote_code=trust_remote_code, act_path=mlp_act_path))
    result = EvalStage(run_dir, cfg, by="eval").run_stage(force=force, echo=typer.echo)
    header, rows = results_table(result)
    typer.echo("\t".join(header))
    for row in rows:
        typer.echo("\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    typer.echo(f"wrote {run_dir / 'eval'}")
