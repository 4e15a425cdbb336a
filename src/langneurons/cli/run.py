"""`langneurons run`: the whole analysis in one command (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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
    choice_corpus: Optional[str] = typer.Option(None, help="Multiple-choice questions (hf:belebele, or Belebele-"
                                                "style JSONL): adds their accuracy to the ablation matrix."),
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
    separator: str = typer.Option("\n", help="Between prompt and response of pairs read without a chat template "
                                  "(the authors' code uses none: --separator '')."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Chat template for pairs and task prompts "
                                        "(default: when the tokenizer has one)."),
    ppl_style: str = typer.Option("token", help="token: token-weighted NLL; paper: mean over documents of each "
                                  "document's mean NLL, then exp (the published aggregation)."),
    task: Optional[Path] = typer.Option(None, help="Questions (MGSM/MSVAMP/JSONL): the model answers them and its "
                                        "answers' response tokens are recorded (instead of --corpus)."),
    max_questions: Optional[int] = typer.Option(None, help="--task: the first N questions per language."),
    max_new_tokens: int = typer.Option(256, help="--task: tokens per answer at most (generation and accuracy)."),
    sample: bool = typer.Option(False, help="--task: sample the answers instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="--task --sample: temperature."),
    top_p: float = typer.Option(1.0, help="--task --sample: nucleus (1: off)."),
    top_k: int = typer.Option(0, help="--task --sample: top-k (0: off)."),
    gen_seed: int = typer.Option(0, help="--task --sample: sampling seed."),
    template: Optional[str] = typer.Option(None, help="--task: user message with {question} (default: the question "
                                           "for chat models, 'Question: {question}\nAnswer:' otherwise)."),
    counting: str = typer.Option("pass", help="--task: pass (one pass over the generated ids) | during (counted "
                                 "while generating)."),
) -> None:
    """Record -> identify (auto λ) -> anatomy -> ablation matrix -> report.html."""
    options = {k: v for k, v in locals().items() if k not in ("ctx", "config", "dump_config")}  # the options only
    from ..pipeline import run_config_from_options, run_pipeline

    given = {n for n in ctx.params if (src := ctx.get_parameter_source(n)) is not None and src.name == "COMMANDLINE"}
    cfg = run_config_from_options(options, config_file=config, given=given)
    if dump_config:
        from ..config import run_config_to_yaml

        typer.echo(run_config_to_yaml(cfg), nl=False)
        return
    typer.echo(f"report: {run_pipeline(cfg, echo=typer.echo)}")
