"""`langneurons ablate RUN_DIR`: the K x K intervention matrix of a run."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import LangNeuronsError
from .app import app, split_list

DEFAULT_SETS = ("specific", "specific,related", "specific,related,general")
PPL_METRICS = ("nll", "ppl", "bpb")


def parse_class_sets(values: list[str] | None) -> list[str]:
    """--classes may be repeated and/or ';'-separated: 'specific;specific,related'."""
    from ..neurons import parse_classes

    if not values:
        return list(DEFAULT_SETS)
    out: list[str] = []
    for value in values:
        for spec in value.split(";"):
            if spec.strip():
                name = ",".join(parse_classes(spec))
                if name not in out:
                    out.append(name)
    if not out:
        raise LangNeuronsError("--classes is empty; give e.g. specific or 'specific;specific,related'")
    return out


def parse_seeds(value: str) -> list[int]:
    try:
        seeds = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise LangNeuronsError(f"--control-seeds must be a comma list of integers, got {value!r}") from None
    if not seeds:
        raise LangNeuronsError("--control-seeds is empty; give e.g. 0,1,2")
    return seeds


def _limit(by_lang: dict[str, list[Any]], n: int | None) -> dict[str, list[Any]]:
    return {k: v[:n] for k, v in by_lang.items()} if n else by_lang


@app.command()
def ablate(
    run_dir: Path = typer.Argument(..., help="Run directory with neurons.safetensors (after `identify`)."),
    classes: Optional[list[str]] = typer.Option(
        None, "--classes", help="Neuron set(s): specific | specific,related | specific,related,general; repeat the "
        "option or separate sets with ';' (default: all three)."),
    control: str = typer.Option("random", help="random: also deactivate random neurons with the same per-layer "
                                "counts; none: no control."),
    control_seeds: str = typer.Option("0,1,2", help="Seeds of the random control (one row per seed)."),
    metric: str = typer.Option("nll,ppl,bpb", help="Comma list of nll, ppl, bpb, accuracy."),
    eval_corpus: Optional[Path] = typer.Option(None, help="Held-out texts per language (default: the manifest's "
                                               "record.eval_corpus); an MGSM path when only accuracy is asked."),
    math_corpus: Optional[Path] = typer.Option(None, help="MGSM-style problems for --metric accuracy "
                                               "(mgsm_<lang>.tsv, JSON or JSONL) when perplexity is also asked."),
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
    progress: bool = typer.Option(True, help="Show a progress bar over the matrix."),
) -> None:
    """Deactivate each language's neurons and measure every language: writes ablation.parquet."""
    from ..neurons import NeuronMap
    from ..runs import RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise LangNeuronsError(f"{run.path} is not a run directory")
    sets = parse_class_sets(classes)
    ctrl = None if control in ("none", "") else control
    if ctrl not in (None, "random"):
        raise LangNeuronsError(f"--control must be 'random' or 'none', got {control!r}")
    seeds = parse_seeds(control_seeds)
    metrics = split_list(metric) or []
    bad = [m for m in metrics if m not in PPL_METRICS + ("accuracy",)]
    if bad or not metrics:
        raise LangNeuronsError(f"--metric: unknown {bad or metric!r}; use a comma list of nll, ppl, bpb, accuracy")
    if scope not in ("auto", "all", "response"):
        raise LangNeuronsError(f"--scope must be auto, all or response, got {scope!r}")
    if positions not in ("all", "generated"):
        raise LangNeuronsError(f"--positions must be 'all' or 'generated', got {positions!r}")
    if batch_size < 1:
        raise LangNeuronsError(f"--batch-size must be >= 1, got {batch_size}")
    if bootstrap < 0:
        raise LangNeuronsError(f"--bootstrap must be >= 0 (0: no intervals), got {bootstrap}")
    if max_examples is not None and max_examples < 1:
        raise LangNeuronsError(f"--max-examples must be >= 1, got {max_examples}")
    ppl_metrics = [m for m in metrics if m in PPL_METRICS]
    want_acc = "accuracy" in metrics

    nmap = NeuronMap.load(run.neurons_path)
    manifest = run.read_manifest()
    record_info = manifest.get("record", {}) if isinstance(manifest.get("record"), dict) else {}
    model_info = manifest.get("model", {}) if isinstance(manifest.get("model"), dict) else {}
    row_langs = split_list(langs) or list(nmap.languages)
    unknown = [x for x in row_langs if x not in nmap.languages]
    if unknown:
        raise LangNeuronsError(f"--langs {','.join(unknown)} not in the neuron map ({','.join(nmap.languages)})")

    # -- corpora (read before the model: bad paths fail fast) -----------------------------
    eval_path = eval_corpus
    if eval_path is None and record_info.get("eval_corpus"):
        eval_path = Path(record_info["eval_corpus"])
        if not eval_path.is_absolute() and (run.path / eval_path).exists():
            eval_path = run.path / eval_path  # written by `langneurons run` next to the stats
    text_corpus: dict[str, list[Any]] | None = None
    problems: dict[str, list[Any]] | None = None
    if want_acc:
        acc_path = math_corpus or (eval_corpus if not ppl_metrics else None)
        if acc_path is None:
            raise LangNeuronsError("--metric accuracy needs MGSM-style problems: give --math-corpus PATH (or "
                                   "--eval-corpus PATH when accuracy is the only metric)")
        from ..evaluate import group_by_lang, read_mgsm

        problems = _select(group_by_lang(read_mgsm(acc_path)), split_list(langs), nmap.languages, str(acc_path))
        problems = _limit(problems, max_examples)
    if ppl_metrics:
        if eval_path is None:
            raise LangNeuronsError("give --eval-corpus PATH (held-out texts per language; the run's manifest has "
                                   "no record.eval_corpus)")
        from ..corpus import load_corpus

        kind = {"all": "text", "response": "qa"}.get(scope, "auto")
        corp = load_corpus(eval_path, kind=kind)  # type: ignore[arg-type]
        text_corpus = _limit(_select(corp.by_lang, split_list(langs), nmap.languages, str(eval_path)), max_examples)

    # -- model -------------------------------------------------------------------------------
    from ..models import load_model
    from .record import parse_max_memory

    model_name = model or model_info.get("model")
    if not model_name:
        raise LangNeuronsError("the run's manifest names no model; pass --model")
    loaded = load_model(model_name, dtype=dtype or model_info.get("dtype") or "float32", device=device,
                        device_map=device_map, max_memory=parse_max_memory(max_memory))
    want_fp = model_info.get("model_fingerprint")
    if want_fp and getattr(loaded, "fingerprint", None) and loaded.fingerprint != want_fp:
        warnings.warn(f"the model {model_name} differs from the one the neurons were found in "
                      f"({model_info.get('model')}); make sure the neuron map fits it", stacklevel=1)

    import pandas as pd

    from ..evaluate import ablation_matrix, accuracy_matrix, write_generations
    from ..io import atomic_write

    frames, stage_stats = [], {}
    if text_corpus is not None:
        st: dict[str, Any] = {}
        frames.append(ablation_matrix(loaded.model, loaded.tokenizer, nmap, text_corpus, neuron_sets=sets,
                                      control=ctrl, control_seeds=seeds, metrics=ppl_metrics,
                                      batch_size=batch_size, progress=progress, langs=row_langs, scope=scope,
                                      max_length=max_length, act_path=mlp_act_path, bootstrap=bootstrap, stats=st))
        stage_stats["perplexity"] = st
    generations: list[dict] = []
    if problems is not None:
        st = {}
        frames.append(accuracy_matrix(loaded.model, loaded.tokenizer, nmap, problems, neuron_sets=sets,
                                      control=ctrl, control_seeds=seeds, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, progress=progress, langs=row_langs,
                                      act_path=mlp_act_path, generations=generations, chat=chat,
                                      positions=positions, stats=st))
        stage_stats["accuracy"] = st
        write_generations(run.generations_path, generations)
    df = pd.concat(frames, ignore_index=True)

    # Keep rows of other metrics/sets from earlier runs of `ablate` (e.g. accuracy after nll).
    if run.ablation_path.exists():
        old = pd.read_parquet(run.ablation_path)
        # A recomputed set replaces its old rows AND its old random-control rows (which were made
        # on the old evaluation corpus and must not be compared with the new numbers).
        base_sets = {str(x).removeprefix("random:") for x in df["neuron_set"]}
        old_base = old["neuron_set"].astype(str).str.removeprefix("random:")
        keep = old[~(old["metric"].isin(set(df["metric"])) & old_base.isin(base_sets))]
        if len(keep):
            df = pd.concat([keep, df], ignore_index=True)
    atomic_write(run.ablation_path, lambda p: df.to_parquet(p, index=False))
    run.record_checksum(run.ablation_path)
    from ..report.ablation import heatmaps

    figures = heatmaps(df, run.figures_dir)
    run.update_manifest({"ablation": {
        "inputs": None,  # made by hand: `langneurons run` must not take it as its own up-to-date stage
        "neuron_sets": sets, "control": ctrl or "none", "control_seeds": seeds if ctrl else [],
        "metrics": metrics, "eval_corpus": None if eval_path is None or not ppl_metrics else str(eval_path),
        "math_corpus": None if problems is None else str(math_corpus or eval_corpus),
        "languages": row_langs, "eval_languages": list((text_corpus or problems or {}).keys()),
        "model": loaded.source if hasattr(loaded, "source") else model_name, "scope": scope,
        "batch_size": batch_size, "max_examples": max_examples, "bootstrap": bootstrap, "mode": "zero",
        "positions": {"perplexity": "all", "accuracy": positions} if problems is not None else "all",
        "passes": sum(int(s.get("passes", s.get("generation_cells", 0))) for s in stage_stats.values()),
        "seconds": round(sum(float(s.get("seconds", 0)) for s in stage_stats.values()), 3),
        "rows": int(len(df)), "figures": [str(p.relative_to(run.path)) for p in figures]}})
    _print_matrices(df, sets)
    typer.echo(f"wrote {run.ablation_path} ({len(df)} rows) and {len(figures) // 2} heatmaps in {run.figures_dir}")


def _select(by_lang: dict[str, list[Any]], langs: list[str] | None, map_langs: list[str], where: str
            ) -> dict[str, list[Any]]:
    if langs:
        missing = [x for x in langs if x not in by_lang]
        if missing:
            raise LangNeuronsError(f"{where} has no examples for {','.join(missing)} (it has {','.join(by_lang)})")
        return {x: by_lang[x] for x in langs}
    chosen = {x: by_lang[x] for x in map_langs if x in by_lang}
    if not chosen:
        raise LangNeuronsError(f"{where} has none of the neuron map's languages ({','.join(map_langs)}); "
                               f"it has {','.join(by_lang) or 'nothing'}")
    return chosen


def _print_matrices(df: Any, sets: list[str]) -> None:
    from ..report.ablation import matrices

    for metric in ("nll", "accuracy"):
        mats = matrices(df, metric)
        for nset in [s for s in sets if s in mats] + [f"random:{s}" for s in sets if f"random:{s}" in mats]:
            tab, _ = mats[nset]
            what = "ΔNLL/token (nats)" if metric == "nll" else "Δaccuracy"
            typer.echo(f"\n{what}, {nset}{' (mean over seeds)' if nset.startswith('random:') else ''}; "
                       "rows: deactivated, columns: evaluated")
            typer.echo(tab.to_string(float_format=lambda v: f"{v:+.3f}"))
