"""`langneurons record | merge | import`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from ..errors import LangNeuronsError
from ..config import parse_shard, split_list
from .app import app


@app.command()
def record(
    model: str = typer.Option("gemma-3-270m", help="Local HF directory, .gguf file or alias (gemma-3-270m, smollm2-135m)."),
    corpus: Optional[Path] = typer.Option(None, help="Corpus path (default: the embedded parallel corpus)."),
    out: Path = typer.Option(..., help="Run directory to write."),
    langs: Optional[str] = typer.Option(None, help="Comma list of languages (default: all in the corpus)."),
    scope: str = typer.Option("all", help="all: every non-pad token; response: response tokens of prompt/response pairs."),
    batch_size: int = typer.Option(8),
    max_length: Optional[int] = typer.Option(None, help="Truncate longer sequences (default: model context)."),
    max_tokens_per_lang: Optional[int] = typer.Option(None),
    include_special: bool = typer.Option(False, help="Also count BOS/EOS tokens added by the tokenizer."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    device: Optional[str] = typer.Option(None),
    device_map: Optional[str] = typer.Option(None, help="e.g. auto, to spread a large model over GPUs."),
    max_memory: Optional[str] = typer.Option(None, help="Per-device memory caps, e.g. 0=20GiB,cpu=64GiB."),
    mlp_act_path: Optional[str] = typer.Option(None, help="Override: path of the activation module, with {i}."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit of --model (the commit is recorded)."),
    trust_remote_code: bool = typer.Option(False, help="Run modelling code shipped with a hub model."),
    offline: bool = typer.Option(False, help="Never contact the hub: use the local cache (also: HF_HUB_OFFLINE=1)."),
    shard: Optional[str] = typer.Option(None, help="i/n: count only shard i of n (merge the shards later)."),
    flush_every: int = typer.Option(50, help="Batches between partial flushes (resume inside a language)."),
    text_column: str = typer.Option("text"),
    lang_column: str = typer.Option("lang"),
    prompt_column: str = typer.Option("prompt"),
    response_column: str = typer.Option("response"),
    doc_sep: str = typer.Option("line", help="line | blank: document separator in <lang>.txt files."),
    seed: int = typer.Option(0),
    buckets: int = typer.Option(16, help="Per-bucket counts for `langneurons stability` (document j -> bucket j mod B); 0: none."),
    separator: str = typer.Option("\n", help="Between prompt and response of pairs read without a chat template "
                                  "(the authors' code uses none: --separator '')."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Render pairs' prompts with the tokenizer's "
                                        "chat template (default: when it has one)."),
    force: bool = typer.Option(False, help="Record again even where stats exist."),
) -> None:
    """Count, per language, how often each MLP neuron is positive.

    Under torchrun / accelerate launch every process counts its share of each language and
    rank 0 writes the sum (see docs/scaling.md).
    """
    from ..config import ModelConfig
    from ..corpus import ColumnMap, load_corpus
    from ..record import RecordConfig, record_in_processes

    if doc_sep not in ("line", "blank"):
        raise LangNeuronsError(f"--doc-sep must be 'line' or 'blank', got {doc_sep!r}")
    cfg = RecordConfig(scope=scope, batch_size=batch_size, max_length=max_length,  # type: ignore[arg-type]
                       max_tokens_per_lang=max_tokens_per_lang, include_special=include_special, seed=seed,
                       act_path=mlp_act_path, flush_every=flush_every, shard=parse_shard(shard),
                       buckets=buckets, separator=separator, chat=chat).validate()
    model_cfg = ModelConfig(model=model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                            revision=revision, trust_remote_code=trust_remote_code, offline=offline or None).validate()
    if out.exists() and not out.is_dir():
        raise LangNeuronsError(f"--out {out} is a file, not a run directory; give a directory")
    cols = ColumnMap(lang=lang_column, text=text_column, prompt=prompt_column, response=response_column)
    corp = load_corpus(corpus, split_list(langs, what="--langs"), kind="qa" if scope == "response" else "text",
                       doc_sep=doc_sep, columns=cols)  # type: ignore[arg-type]
    # Resuming and skipping languages are worth a line each (INFO is otherwise hidden).
    logging.getLogger("langneurons.record").setLevel(logging.INFO)
    stats, rank, world = record_in_processes(model_cfg, corp, out, cfg, force=force)
    if rank == 0:
        for lang, n in zip(stats.languages, stats.tokens.tolist()):
            typer.echo(f"{lang:>8}  {n:>10,} tokens")
        procs = f", {world} processes" if world > 1 else ""
        typer.echo(f"wrote {out}/stats ({stats.num_layers} layers x {stats.num_neurons} neurons{procs})")


@app.command()
def merge(inputs: list[Path] = typer.Argument(..., help="Run directories / shards of the same model."),
          out: Path = typer.Option(...)) -> None:
    """Add up the counts of several runs or shards (exact: counts are sums)."""
    from ..stats import merge_runs

    stats = merge_runs(inputs, out)
    typer.echo(f"merged {len(inputs)} inputs -> {out} ({', '.join(f'{lang}:{n:,}' for lang, n in zip(stats.languages, stats.tokens.tolist()))} tokens)")


@app.command("import")
def import_(paths: list[Path] = typer.Argument(..., help="Files or directories of published activation counts."),
            format: str = typer.Option(..., "--format", help="lape | njunlp"),
            langs: Optional[str] = typer.Option(None, help="Language order (default: sorted names)."),
            model: str = typer.Option("", help="Model id to note in the metadata."),
            out: Path = typer.Option(...)) -> None:
    """Import LAPE or the paper authors' activation files into a run directory."""
    from ..stats import ActivationStats, find_import_files

    parts = find_import_files(format, paths, split_list(langs))
    for p in parts:
        p.meta["model"] = model
        p.meta["model_fingerprint"] = f"imported:{model}" if model else "imported"
        p.validate(p.lang)
    stats = ActivationStats.stack(parts)
    run = stats.save(out, extra_manifest={"model": {"model": model, "imported_from": format}})
    from ..stage import commit_stage

    commit_stage(run, "record", {"imported": format, "stats_fingerprint": stats.fingerprint()},
                 [run.stats_path(lang) for lang in stats.languages],
                 {"scope": stats.meta.get("scope"), "tokens": dict(zip(stats.languages, stats.tokens.tolist()))},
                 0.0, by="import")
    typer.echo(f"imported {len(parts)} languages ({stats.num_layers} x {stats.num_neurons}) -> {out}")
