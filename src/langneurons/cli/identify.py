"""`langneurons identify | export | import-neurons`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from ..config import split_list
from .app import app


def _run_dir_of(path: Path) -> Path:
    """The run directory that `ActivationStats.load` reads ``path`` from."""
    if (path / "stats").is_dir() or (path / "manifest.json").exists():
        return path
    return path.parent


def _neurons_file(path: Path) -> Path:
    return path / "neurons.safetensors" if path.is_dir() else path


@app.command()
def identify(
    stats_path: Path = typer.Argument(..., metavar="STATS_OR_RUN_DIR",
                                      help="Run directory written by `langneurons record` (or its stats/ folder)."),
    method: str = typer.Option("entropy-lambda", help="lape | entropy-lambda (or a registered method)."),
    top_rate: float = typer.Option(0.01, "--top-rate", help="Fraction of all L·N neurons to select."),
    bar: float = typer.Option(0.95, help="τ = the round(bar·K·L·N)-th smallest probability; active means p > τ."),
    lam: str = typer.Option("auto", "--lambda", help="entropy-lambda: auto, or a fixed λ."),
    lambda_range: str = typer.Option("0,0.2", "--lambda-range", help="LO,HI of the automatic λ search."),
    eps: float = typer.Option(1e-3, help="Bisection stops when HI − LO <= eps."),
    widen: bool = typer.Option(True, "--widen/--no-widen",
                               help="Double the λ range while its top still passes (else: published behaviour)."),
    langs: Optional[str] = typer.Option(None, help="Comma list: identify on this subset of the languages."),
    out: Optional[Path] = typer.Option(None, help="Neuron map to write (default RUN_DIR/neurons.safetensors)."),
) -> None:
    """Select language neurons (LAPE or entropy-λ) and classify them."""
    from ..config import IdentifyConfig
    from ..identify import format_summary
    from ..stages import IdentifyStage

    cfg = IdentifyConfig(method=method, top_rate=top_rate, bar=bar, lam=lam, lam_range=lambda_range, eps=eps,
                         widen=widen, langs=split_list(langs, what="--langs")).validate()
    if not stats_path.exists():
        raise LangNeuronsError(f"{stats_path} does not exist; give a run directory written by `langneurons record`")
    run_dir = _run_dir_of(stats_path)
    if out is not None and _neurons_file(out).resolve() != (run_dir / "neurons.safetensors").resolve():
        # A map written elsewhere is not the run's identify stage: compute and save it only.
        stage = IdentifyStage(run_dir, cfg, by="identify")
        nmap = stage.compute()
        nmap.save(_neurons_file(out))
        target = _neurons_file(out)
    else:
        nmap = IdentifyStage(run_dir, cfg, by="identify").run_stage(force=True)
        target = run_dir / "neurons.safetensors"
    typer.echo(format_summary(nmap))
    typer.echo(f"wrote {target}")


@app.command()
def export(
    neurons: Path = typer.Argument(..., help="Neuron map file or run directory."),
    format: str = typer.Option("lape", "--format", help="lape (List[K][L] index tensors) | njunlp (the "
                               "arXiv:2505.21505 authors' mask) | pruned-model (a model copy with the set's "
                               "down-projection inputs zeroed) | lm-eval-steer (lm-eval's steered-model .pt) | parquet."),
    classes: Optional[str] = typer.Option(None, help="Comma list of specific,related,general, or 'selected' "
                                          "(default: selected for njunlp, else specific,related)."),
    out: Path = typer.Option(..., help="File to write (a directory for pruned-model)."),
    langs: Optional[str] = typer.Option(None, help="pruned-model / lm-eval-steer: the languages whose neurons "
                                        "form the set (default: all)."),
    value: float = typer.Option(1.0, help="lm-eval-steer: the value added to each neuron of the set."),
    model: Optional[str] = typer.Option(None, help="pruned-model: the model (default: the run's)."),
    dtype: Optional[str] = typer.Option(None, help="pruned-model: float32 | bfloat16 | float16 (default: the run's)."),
    revision: Optional[str] = typer.Option(None, help="pruned-model: hub revision (default: the run's commit)."),
    trust_remote_code: bool = typer.Option(False, help="pruned-model: run modelling code shipped with the model."),
) -> None:
    """Export a neuron map for other tools (published masks, a pruned model, lm-eval, parquet)."""
    from ..config import ModelConfig
    from ..export import export as do_export

    cfg = ModelConfig(model=model, dtype=dtype, device="cpu", revision=revision, trust_remote_code=trust_remote_code)
    typer.echo(do_export(neurons, format, out, classes=classes, langs=split_list(langs, what="--langs"), value=value,
                         model=cfg.validate()))


@app.command("import-neurons")
def import_neurons(
    mask: Path = typer.Argument(..., help="A LAPE-format neuron file (List[K][L] of index tensors)."),
    langs: str = typer.Option(..., help="The file's languages, in its order (comma list)."),
    num_neurons: int = typer.Option(..., "--num-neurons", help="Neurons per layer of the model."),
    model: str = typer.Option("", help="Model id to note in the metadata."),
    out: Path = typer.Option(..., help="Neuron map to write (a directory gets neurons.safetensors)."),
    stats: Optional[Path] = typer.Option(None, help="Run directory with the model's stats: general neurons "
                                         "(active in all languages, among ALL neurons) are computed from them."),
    bar: float = typer.Option(0.95, help="τ for --stats, as in `identify`."),
) -> None:
    """Import a published neuron list (e.g. LAPE's *.neuron.pth) into a neuron map."""
    from ..identify import format_summary
    from ..neurons import load_lape

    languages = split_list(langs)
    if not languages:
        raise LangNeuronsError("--langs must list the file's languages in order, e.g. en,zh,fr")
    nmap = load_lape(mask, languages, num_neurons, {"model": model or None})
    if stats is not None:
        from ..neurons import complete_general
        from ..stats import ActivationStats

        nmap = complete_general(nmap, ActivationStats.load(stats), bar)
    target = _neurons_file(out)
    nmap.save(target)
    if (target.parent / "manifest.json").is_file() and target.name == "neurons.safetensors":
        # written into a run: it is that run's identification now (and anatomy/report accept it)
        from ..runs import RunDir
        from ..stage import commit_stage

        commit_stage(RunDir(target.parent), "identify", {"imported": str(mask), "languages": languages,
                                                         "stats": None if stats is None else str(stats)},
                     [target], {"method": nmap.meta.get("method"), "languages": languages,
                                "general_available": nmap.meta.get("general_available"), "path": target.name},
                     0.0, by="import-neurons")
    typer.echo(format_summary(nmap))
    typer.echo(f"wrote {target}")
