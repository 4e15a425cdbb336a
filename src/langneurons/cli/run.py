"""`langneurons run`: the whole analysis in one command (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import split_list
from .app import app


@app.command()
def run(
    ctx: typer.Context,
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
    control: str = typer.Option("matched", help="matched (activity strata within each layer) | layer (per-layer "
                                "counts only) | none"),
    control_seeds: str = typer.Option("0,1,2", help="Seeds of the random control sets."),
    control_bins: int = typer.Option(20, help="Activity strata per layer of the matched control."),
    ablation_langs: Optional[str] = typer.Option(None, help="Languages deactivated and evaluated in the matrix "
                                                 "(default: all; identification always uses every language)."),
    eval_tokens_per_lang: Optional[int] = typer.Option(2000, help="Held-out tokens per language scored in each "
                                                       "ablation pass (more, shorter documents: tighter intervals)."),
    batch_size: int = typer.Option(8),
    max_tokens_per_lang: Optional[int] = typer.Option(None),
    max_eval_docs: Optional[int] = typer.Option(None, help="Cap held-out documents per language."),
    dtype: str = typer.Option("float32"),
    device: Optional[str] = typer.Option(None),
    device_map: Optional[str] = typer.Option(None, help="e.g. auto, to spread a large model over GPUs."),
    max_memory: Optional[str] = typer.Option(None, help="Per-device memory caps, e.g. 0=20GiB,cpu=64GiB."),
    mlp_act_path: Optional[str] = typer.Option(None, help="Override: path of the activation module, with {i}."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit of --model (the commit is recorded)."),
    trust_remote_code: bool = typer.Option(False, help="Run modelling code shipped with a hub model."),
    offline: bool = typer.Option(False, help="Never contact the hub: use the local cache (also: HF_HUB_OFFLINE=1)."),
    pivot: str = typer.Option("en"),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of evaluation documents for ΔNLL intervals (0: none)."),
    stability: int = typer.Option(0, help="Bootstrap resamples of the identification (0: skip)."),
    lens_docs: int = typer.Option(16, help="Held-out documents per language for the logit lens (0: skip it)."),
    lens_max_length: int = typer.Option(128, help="Tokens per document read by the logit lens."),
    skip_ablation: bool = typer.Option(False, help="Stop after anatomy (no intervention matrix)."),
    force: bool = typer.Option(False, help="Redo every stage."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    config: Optional[Path] = typer.Option(None, help="Run options from a YAML file (as --dump-config writes it); "
                                          "options given on the command line override it."),
    dump_config: bool = typer.Option(False, help="Print the run's options as YAML and stop (nothing is run)."),
) -> None:
    """Record -> identify (auto λ) -> anatomy -> ablation matrix -> report.html."""
    from ..config import parse_class_sets
    from ..pipeline import RunConfig, run_pipeline

    cfg = RunConfig(out=out, neuron_sets=parse_class_sets(sets), model=model, corpus=corpus,
                    langs=split_list(langs, what="--langs"), scope=scope, holdout=holdout, method=method,
                    top_rate=top_rate, bar=bar, lam=lam, control=control, control_seeds=control_seeds,
                    control_bins=control_bins, ablation_langs=split_list(ablation_langs, what="--ablation-langs"),
                    eval_tokens_per_lang=eval_tokens_per_lang,
                    batch_size=batch_size, max_tokens_per_lang=max_tokens_per_lang, max_eval_docs=max_eval_docs,
                    dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                    mlp_act_path=mlp_act_path, revision=revision, trust_remote_code=trust_remote_code,
                    offline=offline or None, pivot=pivot, bootstrap=bootstrap, stability=stability,
                    lens_docs=lens_docs, lens_max_length=lens_max_length,
                    skip_ablation=skip_ablation, force=force, progress=progress)
    if config is not None:
        from ..config import run_config_from_yaml

        given = {n for n in ctx.params if (src := ctx.get_parameter_source(n)) is not None and src.name == "COMMANDLINE"
                 and n not in ("config", "dump_config")}
        cfg = run_config_from_yaml(config, {("neuron_sets" if n == "sets" else n): getattr(cfg, "neuron_sets" if n == "sets"
                                                                                          else n) for n in given})
    cfg = cfg.validate()
    if dump_config:
        from ..config import run_config_to_yaml

        typer.echo(run_config_to_yaml(cfg), nl=False)
        return
    report = run_pipeline(cfg, echo=typer.echo)
    typer.echo(f"report: {report}")
