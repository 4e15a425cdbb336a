"""`langneurons lens RUN`: the logit lens on the run's held-out (else recording) corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from .app import app


def _corpus_path(run_dir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    from ..runs import RunDir

    run = RunDir(run_dir)
    if run.eval_corpus_path.is_file():
        return run.eval_corpus_path
    source = run.stage_result("record").get("corpus")
    if isinstance(source, str) and Path(source).exists():
        return Path(source)
    raise LangNeuronsError("the run names no corpus for the lens; pass --corpus PATH (texts per language)")


@app.command()
def lens(run_dir: Path = typer.Argument(..., help="Run directory (its manifest names the model and corpus)."),
         model: Optional[str] = typer.Option(None, help="Model (default: the run's)."),
         corpus: Optional[Path] = typer.Option(None, help="Texts per language (default: the run's eval corpus)."),
         max_docs: int = typer.Option(64, help="Documents per language."),
         batch_size: int = typer.Option(8, help="Documents per forward pass."),
         max_length: int = typer.Option(256, help="Tokens per document (truncated)."),
         dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 (default: the run's)."),
         device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
         english: str = typer.Option("en", help="The language the others are compared with.")) -> None:
    """Logit lens per layer and language; writes RUN_DIR/lens.parquet and prints the summary."""
    from ..config import ModelConfig
    from ..corpus import load_corpus
    from ..lens import LensConfig, lens_summary
    from ..runs import RunDir
    from ..stages import LensStage, lens_texts

    if max_docs < 1 or batch_size < 1 or max_length < 2:
        raise LangNeuronsError("--max-docs and --batch-size must be >= 1, --max-length >= 2")
    run = RunDir(run_dir)
    texts = lens_texts(load_corpus(_corpus_path(run.path, corpus), kind="auto").by_lang, max_docs)
    loaded = ModelConfig(model=model, dtype=dtype, device=device).validate().load(run.read_manifest())
    cfg = LensConfig(batch_size=batch_size, max_length=max_length, max_docs=max_docs, english=english)
    df = LensStage(run, loaded, texts, cfg, by="lens").run_stage(echo=typer.echo)
    for lang, s in lens_summary(df, english).items():
        typer.echo(f"{lang:>6}: overtakes English at layer {s['overtakes_english']}, correct top-1 from layer "
                   f"{s['correct_top1']}, final p(correct) {s['final_p_correct']:.3f} ({s['n_tokens']} tokens)")
    typer.echo(f"wrote {run.path / 'lens.parquet'}")
