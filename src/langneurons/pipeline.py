"""The main job: record -> identify (auto λ) -> anatomy -> ablation matrix -> report.

Every stage writes its artifact into the run directory and is skipped on a re-run when its
artifact exists and was made with the same inputs and settings (the stage records its
settings in manifest.json), so an interrupted run resumes where it stopped. The corpus is
split once, deterministically and in parallel across languages, into an identification
part (recorded) and a held-out part (perplexity under ablation), so the neurons are never
evaluated on the text they were found on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .corpus import Corpus, load_corpus
from .io import atomic_write_text, sha256_file
from .runs import RunDir

log = logging.getLogger(__name__)

DEFAULT_SETS = ("specific", "specific,related", "specific,related,general")


@dataclass
class RunConfig:
    """Everything `langneurons run` needs; the defaults are the demo's."""

    out: Path
    model: str = "gemma-3-270m"
    corpus: Path | None = None  # default: the embedded parallel corpus
    langs: list[str] | None = None
    scope: str = "all"
    holdout: float = 0.2  # fraction of each language's documents kept for evaluation
    method: str = "entropy-lambda"
    top_rate: float = 0.01
    bar: float = 0.95
    lam: str | float = "auto"
    neuron_sets: tuple[str, ...] = DEFAULT_SETS
    control: str | None = "random"
    control_seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = ("nll", "ppl", "bpb")
    batch_size: int = 8
    max_tokens_per_lang: int | None = None
    max_eval_docs: int | None = None  # cap held-out documents per language
    dtype: str = "float32"
    device: str | None = None
    pivot: str = "en"
    bootstrap: int = 1000  # resamples of evaluation documents for ΔNLL intervals (0: none)
    stability: int = 0  # bootstrap resamples of the identification (0: skip; `langneurons stability`)
    skip_ablation: bool = False
    force: bool = False
    progress: bool = True


@dataclass
class StageTimer:
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any], echo: Callable[[str], None]) -> Any:
        t0 = time.perf_counter()
        echo(f"[{name}] ...")
        out = fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        echo(f"[{name}] done in {self.times[name]:.1f} s")
        return out


def _example_record(e: Any) -> dict[str, Any]:
    if e.is_pair:
        return {"lang": e.lang, "id": e.id, "prompt": e.prompt, "response": e.response}
    return {"lang": e.lang, "id": e.id, "text": e.text}


def _fresh_neuron_map(run: RunDir, cfg: RunConfig, stats_fingerprint: str, languages: list[str]) -> Any:
    """The run's neuron map if it was made from these stats with these settings, else None.

    Judged from the map's own metadata (not from the manifest, which `langneurons identify`
    may have changed since), so a map made by hand with other settings is never taken for
    this stage's output."""
    from .errors import LangNeuronsError
    from .neurons import NeuronMap

    if not run.neurons_path.exists():
        return None
    try:
        nmap = NeuronMap.load(run.neurons_path)
    except LangNeuronsError:
        return None
    meta, params = nmap.meta, nmap.meta.get("params") or {}
    lam = params.get("lam")
    want_lam = None if cfg.method != "entropy-lambda" else ("auto" if cfg.lam == "auto" else float(cfg.lam))
    fresh = (meta.get("method") == cfg.method and meta.get("stats_fingerprint") == stats_fingerprint
             and nmap.languages == languages and params.get("top_rate") == float(cfg.top_rate)
             and params.get("bar") == float(cfg.bar) and lam == want_lam)
    return nmap if fresh else None


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] = print) -> Path:
    from .anatomy import analyze_run
    from .evaluate import ablation_matrix
    from .identify import identify
    from .models import load_model
    from .neurons import NeuronMap
    from .record import RecordConfig, record
    from .report import build_report
    from .stats import ActivationStats

    run = RunDir(cfg.out)
    timer = StageTimer()
    kind = "qa" if cfg.scope == "response" else "text"
    corpus = load_corpus(cfg.corpus, cfg.langs, kind=kind)  # type: ignore[arg-type]
    id_corpus, eval_corpus = corpus.split(cfg.holdout)
    if cfg.max_eval_docs:
        eval_corpus = Corpus({k: v[: cfg.max_eval_docs] for k, v in eval_corpus.by_lang.items()}, eval_corpus.source)

    loaded = timer.run("load model", lambda: load_model(cfg.model, dtype=cfg.dtype, device=cfg.device), echo)
    echo(f"model {loaded.source}: {type(loaded.model).__name__}, {loaded.dtype}")
    from .align import read_align_info

    align_info = read_align_info(loaded.resolved_path)  # an aligned checkpoint says which languages it saw
    if align_info:
        run.update_manifest({"align": {k: align_info.get(k) for k in (
            "trained_langs", "pivot", "requested_langs", "base_model", "base_fingerprint", "step", "method")}})

    rec_cfg = RecordConfig(scope=cfg.scope, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                           max_tokens_per_lang=cfg.max_tokens_per_lang)
    stats: ActivationStats = timer.run(
        "record", lambda: record(loaded.model, loaded.tokenizer, id_corpus, run.path, rec_cfg, model_id=loaded.source,
                                 model_fingerprint=loaded.fingerprint, force=cfg.force, progress=cfg.progress,
                                 redo_stale=True), echo)
    # The held-out documents are written next to the stats so `langneurons ablate RUN` finds them.
    eval_path = run.path / "eval_corpus.jsonl"
    atomic_write_text(eval_path, "".join(json.dumps(_example_record(e), ensure_ascii=False) + "\n"
                                         for exs in eval_corpus.by_lang.values() for e in exs))
    run.update_manifest({"record": {"holdout": cfg.holdout, "eval_corpus": eval_path.name,
                                    "eval_split": {"source": corpus.source, "kind": kind,
                                                   "rule": f"every {max(int(round(1 / cfg.holdout)), 2)}th document",
                                                   "documents": {k: len(v) for k, v in eval_corpus.by_lang.items()}}}})

    stats_fingerprint = stats.fingerprint()
    id_params = {"method": cfg.method, "top_rate": cfg.top_rate, "bar": cfg.bar, "lam": cfg.lam,
                 "stats_fingerprint": stats_fingerprint}
    nmap = _fresh_neuron_map(run, cfg, stats_fingerprint, list(stats.languages)) if not cfg.force else None
    if nmap is not None:
        echo("[identify] up to date, skipped")
    else:
        params: dict[str, Any] = {"top_rate": cfg.top_rate, "bar": cfg.bar}
        if cfg.method == "entropy-lambda":
            params["lam"] = cfg.lam
        nmap = timer.run("identify", lambda: identify(stats, method=cfg.method, **params), echo)
        nmap.save(run.neurons_path)
        run.record_checksum(run.neurons_path)
        run.update_manifest({"identify": {"inputs": id_params, "method": cfg.method, "tau": nmap.meta.get("tau"),
                                          "lambda": nmap.meta.get("lambda"),
                                          "lambda_saturated": nmap.meta.get("lambda_saturated"),
                                          "path": run.neurons_path.name}})
    summary = nmap.summary()
    echo(f"selected {summary['selected']} neurons: {summary['totals']}; tau={nmap.meta.get('tau')}, "
         f"lambda={nmap.meta.get('lambda')}")

    timer.run("anatomy", lambda: analyze_run(run.path, pivot=cfg.pivot).save(run.path), echo)

    if cfg.stability:
        from .confidence import run_stability

        timer.run("stability", lambda: run_stability(run.path, resamples=cfg.stability, progress=cfg.progress), echo)

    if not cfg.skip_ablation:
        abl_inputs = {"neurons_sha256": sha256_file(run.neurons_path), "identify": id_params,
                      "sets": list(cfg.neuron_sets), "control": cfg.control, "seeds": list(cfg.control_seeds),
                      "metrics": list(cfg.metrics), "eval_sha256": sha256_file(eval_path),
                      "holdout": cfg.holdout, "scope": cfg.scope, "bootstrap": cfg.bootstrap}
        if not cfg.force and run.ablation_path.exists() and _same(run.read_manifest().get("ablation", {}).get("inputs"),
                                                                  abl_inputs):
            echo("[ablate] up to date, skipped")
        else:
            def ablate() -> None:
                from .io import atomic_write
                from .report.ablation import heatmaps

                df = ablation_matrix(loaded.model, loaded.tokenizer, nmap, eval_corpus.by_lang,
                                     neuron_sets=cfg.neuron_sets, control=cfg.control,
                                     control_seeds=cfg.control_seeds, metrics=cfg.metrics,
                                     batch_size=cfg.batch_size, progress=cfg.progress, bootstrap=cfg.bootstrap)
                atomic_write(run.ablation_path, lambda p: df.to_parquet(p, index=False))
                run.record_checksum(run.ablation_path)
                heatmaps(df, run.figures_dir)
                run.update_manifest({"ablation": {"inputs": abl_inputs, "rows": len(df),
                                                  "path": run.ablation_path.name}})
            timer.run("ablate", ablate, echo)

    report = timer.run("report", lambda: build_report(run.path), echo)
    run.update_manifest({"run": {"config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
                                 "stage_seconds": timer.times}})
    return Path(report)
