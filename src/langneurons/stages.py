"""The stages of an analysis, each on the one stage layer (`stage.Stage`).

`langneurons run`, every stage command and Python callers all go through these classes, so a
stage is current by the same rule whoever ran it, and its manifest section has one shape.

* `SplitStage` -- the held-out documents (eval_corpus.jsonl); the rest is recorded.
* (record) -- `record.record` resumes per language and commits the ``record`` stage itself.
* `IdentifyStage` -- neurons.safetensors from the stats.
* `AnatomyStage` -- anatomy.json from the neuron map.
* `AblationStage` -- ablation.parquet; rows are merged by their key columns, so rows written by
  another command (accuracy by ``ablate``, perplexity by ``run``) survive, and only rows whose
  provenance no longer matches (another neuron map, model, evaluation text or setting) are
  recomputed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import ACCURACY_METRICS, CHOICE_METRICS, PPL_METRICS, AblationConfig, IdentifyConfig
from .corpus import Corpus, Example
from .errors import LangNeuronsError, NeuronMapError
from .io import atomic_write, atomic_write_text
from .runs import RunDir
from .stage import Stage, commit_stage, input_key

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- held-out split ------------------------------------------------------------------------------
def example_record(e: Example) -> dict[str, Any]:
    if e.is_pair:
        return {"lang": e.lang, "id": e.id, "prompt": e.prompt, "response": e.response}
    return {"lang": e.lang, "id": e.id, "text": e.text}


class SplitStage(Stage[tuple[Corpus, Corpus]]):
    """Split a corpus into the part that is recorded and the held-out part that the ablation is
    evaluated on (written to eval_corpus.jsonl), so neurons are never evaluated on the text they
    were found on."""

    name = "split"

    def __init__(self, run: RunDir | str | Path, corpus: Corpus, holdout: float, *, kind: str = "text",
                 max_eval_docs: int | None = None, eval_langs: Sequence[str] | None = None,
                 eval_tokens_per_lang: int | None = None, tokenizer: Any = None, by: str = ""):
        super().__init__(run, by=by)
        self.corpus, self.holdout, self.kind, self.max_eval_docs = corpus, holdout, kind, max_eval_docs
        self.eval_langs = list(eval_langs) if eval_langs else None
        self.eval_tokens_per_lang, self.tokenizer = eval_tokens_per_lang, tokenizer
        self.selection: Any = None
        if eval_tokens_per_lang and tokenizer is None:
            raise LangNeuronsError("a token budget for the held-out documents needs the tokenizer")

    def inputs(self) -> dict[str, Any]:
        return {"source": self.corpus.source, "kind": self.kind, "holdout": self.holdout,
                "max_eval_docs": self.max_eval_docs, "eval_langs": self.eval_langs,
                "eval_tokens_per_lang": self.eval_tokens_per_lang,
                "tokenizer": None if self.tokenizer is None else getattr(self.tokenizer, "name_or_path", "")
                and input_key(sorted(self.tokenizer.get_vocab().items()))[:16],
                "corpus": {lang: self.corpus.fingerprint(lang) for lang in self.corpus.languages}}

    def compute(self) -> tuple[Corpus, Corpus]:
        id_corpus, eval_corpus = self.corpus.split(self.holdout)
        by_lang = eval_corpus.by_lang
        if self.eval_langs:
            missing = [x for x in self.eval_langs if x not in by_lang]
            if missing:
                raise LangNeuronsError(f"--ablation-langs {','.join(missing)} are not in the corpus "
                                       f"(it has {','.join(by_lang)})")
            by_lang = {x: by_lang[x] for x in self.eval_langs}
        if self.max_eval_docs:
            by_lang = {k: v[: self.max_eval_docs] for k, v in by_lang.items()}
        if self.eval_tokens_per_lang:
            from .evaluate import select_eval_docs

            self.selection = select_eval_docs(self.tokenizer, by_lang, self.eval_tokens_per_lang,
                                              scope="response" if self.kind == "qa" else "all")
            by_lang = self.selection.by_lang
        return id_corpus, Corpus(by_lang, eval_corpus.source)

    def load(self) -> tuple[Corpus, Corpus] | None:
        if self.eval_tokens_per_lang:
            return None  # the selection tokenizes: cheap enough, and its summary belongs in the record
        return self.compute()  # cheap and deterministic; only the file write is skipped

    def write(self, result: tuple[Corpus, Corpus]) -> tuple[list[Path], dict[str, Any]]:
        id_corpus, eval_corpus = result
        path = self.run.eval_corpus_path
        atomic_write_text(path, "".join(json.dumps(example_record(e), ensure_ascii=False) + "\n"
                                        for exs in eval_corpus.by_lang.values() for e in exs))
        section = {"holdout": self.holdout, "eval_corpus": path.name, "source": self.corpus.source, "kind": self.kind,
                   "rule": f"every {max(int(round(1 / self.holdout)), 2)}th document",
                   "documents": {k: len(v) for k, v in eval_corpus.by_lang.items()},
                   "identification_documents": {k: len(v) for k, v in id_corpus.by_lang.items()},
                   "identification_corpus": {k: id_corpus.fingerprint(k) for k in id_corpus.languages}}
        if self.selection is not None:
            section["selection"] = self.selection.summary()
        return [path], section


# -- identification ----------------------------------------------------------------------------
class IdentifyStage(Stage[Any]):
    """neurons.safetensors from the run's stats (or stats given in memory)."""

    name = "identify"
    # no `upstream`: every stats file is checked against the record stage's checksum as it loads
    # (stats.load_language_stats), so hashing them here too would read ~GBs twice at 7B scale

    def __init__(self, run: RunDir | str | Path, config: IdentifyConfig, stats: Any = None, *, by: str = ""):
        super().__init__(run, by=by)
        self.config = config.validate()
        self._stats = stats
        self._inputs: dict[str, Any] | None = None

    @property
    def stats(self) -> Any:
        if self._stats is None:
            from .stats import ActivationStats

            stats = ActivationStats.load(self.run.path, buckets=False)  # identification never reads buckets
            self._stats = stats.subset(self.config.langs) if self.config.langs else stats
            info = self.run.read_manifest().get("model") or {}
            for key in ("model", "model_fingerprint", "revision", "hook_point"):
                if self._stats.meta.get(key) is None and info.get(key) is not None:
                    self._stats.meta[key] = info[key]
        return self._stats

    def inputs(self) -> dict[str, Any]:
        if self._inputs is None:  # the stats' fingerprint hashes [K, L, N] counts: once per stage
            self._inputs = {"method": self.config.method, "params": self.config.params(),
                            "stats_fingerprint": self.stats.fingerprint(), "languages": list(self.stats.languages)}
        return self._inputs

    def compute(self) -> Any:
        from .identify import identify
        from .moe import identify_moe, is_moe_stats

        if is_moe_stats(self.stats):  # expert neurons: p over routed tokens, unobserved neurons unclassified
            return identify_moe(self.stats, method=self.config.method, **self.config.params())
        return identify(self.stats, method=self.config.method, **self.config.params())

    def load(self) -> Any:
        from .neurons import NeuronMap

        return NeuronMap.load(self.run.neurons_path)

    def write(self, nmap: Any) -> tuple[list[Path], dict[str, Any]]:
        nmap.save(self.run.neurons_path)
        meta = nmap.meta
        section = {k: meta.get(k) for k in ("method", "params", "tau", "lambda", "lambda_saturated", "num_selected",
                                            "num_unassigned", "appear", "stats_fingerprint")}
        section.update(languages=list(nmap.languages), path=self.run.neurons_path.name)
        return [self.run.neurons_path], section


# -- anatomy -----------------------------------------------------------------------------------
class AnatomyStage(Stage[Any]):
    """anatomy.json from the neuron map (and the phase settings)."""

    name = "anatomy"
    upstream = ("identify",)

    def __init__(self, run: RunDir | str | Path, pivot: str = "en", config: Any = None, *, by: str = "",
                 accept_edited: bool = False):
        super().__init__(run, by=by, accept_edited=accept_edited)
        self.pivot, self.config = pivot, config

    def inputs(self) -> dict[str, Any]:
        from .anatomy import SCHEMA_VERSION, PhaseConfig

        if not self.run.neurons_path.is_file():
            raise NeuronMapError(f"{self.run.neurons_path} does not exist; run `langneurons identify "
                                 f"{self.run.path}` first")
        from .neurons import NeuronMap

        return {"neurons": NeuronMap.load(self.run.neurons_path).fingerprint(), "pivot": self.pivot,
                "phases": asdict(self.config or PhaseConfig()), "schema": SCHEMA_VERSION}

    def compute(self) -> Any:
        from .anatomy import analyze_run

        return analyze_run(self.run.path, self.pivot, self.config)

    def load(self) -> Any:
        from .anatomy import Anatomy

        return Anatomy.load(self.run.path)

    def write(self, an: Any) -> tuple[list[Path], dict[str, Any]]:
        path = an.save(self.run.path)
        return [path], {"file": path.name, "pivot": self.pivot, "phases_reliable": an.phases_reliable,
                        "phases": [[p.name, p.start, p.end] for p in an.phases]}


# -- ablation ----------------------------------------------------------------------------------
#: columns that identify an ablation row: a newer row with the same key replaces an older one
ROW_KEY = ("metric", "neuron_set", "deactivated_lang", "eval_lang", "seed")
#: columns that say what a row was computed from: a row is current only if they match the plan
PROVENANCE = ("neurons_sha256",  # NeuronMap.fingerprint() of the map the rows were computed with
              "model_fingerprint", "dtype", "eval_sha256", "scope",
              "control_plan",  # the control kind of the computation (the per-row `control` says which row is one)
              "control_bins", "bootstrap", "mode", "positions", "max_length",
              "prompt",  # accuracy: chat + prompt template (a hash); multiple choice: its template; "" for perplexity
              "ppl_style")  # token-weighted NLL or the paper's mean of document means ("none": accuracy rows)


def texts_fingerprint(by_lang: Mapping[str, Sequence[Example]]) -> str:
    """Content fingerprint of evaluation examples (whatever file or directory they came from)."""
    return input_key({lang: [[e.text, e.prompt, e.response, getattr(e, "answer", None)] for e in exs]
                      for lang, exs in by_lang.items()})[:16]


def _limit(by_lang: dict[str, list[Any]], n: int | None) -> dict[str, list[Any]]:
    return {k: v[:n] for k, v in by_lang.items()} if n else by_lang


def _select(by_lang: dict[str, list[Any]], langs: Sequence[str] | None, map_langs: Sequence[str], where: str
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


class AblationStage:
    """The K x K intervention matrix of a run, merged row by row into ablation.parquet.

    Not a plain `Stage`: its output is a table that several commands add to. Freshness is decided
    per neuron set and metric family from the rows themselves (their `PROVENANCE` columns), so
    ``ablate --metric accuracy`` then ``run`` keeps the accuracy rows, and ``run`` then ``ablate``
    with the same settings recomputes nothing. The manifest's ``ablation`` record is rewritten
    after every merge and holds the table's checksum."""

    name = "ablation"

    def __init__(self, run: RunDir | str | Path, config: AblationConfig, *, nmap: Any = None,
                 eval_corpus: Mapping[str, Sequence[Example]] | None = None, by: str = "ablate",
                 accept_edited: bool = False):
        from .stage import verify_inputs

        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.config = config.validate()
        self.by = by
        verify_inputs(self.run, "identify", "split", accept_edited=accept_edited)
        from .neurons import NeuronMap

        self.nmap = nmap if nmap is not None else NeuronMap.load(self.run.neurons_path)
        self.neurons_sha256 = self.nmap.fingerprint()
        unknown = [x for x in (config.langs or []) if x not in self.nmap.languages]
        if unknown:
            raise LangNeuronsError(f"--langs {','.join(unknown)} not in the neuron map ({','.join(self.nmap.languages)})")
        self.langs = list(config.langs or self.nmap.languages)
        self.texts, self.problems = self._read_corpora(eval_corpus)
        self.choices = self._read_choices() if "choice_accuracy" in config.metrics else None
        self._activity: Any = None

    #: the metric families of the table: each is computed, kept fresh and merged on its own
    FAMILIES = {"ppl": PPL_METRICS, "acc": ACCURACY_METRICS, "choice": CHOICE_METRICS}

    def _read_choices(self) -> dict[str, list[Any]]:
        """The multiple-choice questions of --langs, else of the map's languages that the source
        has (a templated hf: source loads exactly the map's languages)."""
        from .choice import read_choice_questions, select_languages
        from .langcodes import same_language

        cfg, spec = self.config, str(self.config.choice_corpus)
        if cfg.langs or spec.startswith("hf:"):
            return read_choice_questions(spec, cfg.langs or list(self.nmap.languages), max_per_lang=cfg.max_examples)
        have = read_choice_questions(spec)
        chosen = [x for x in self.nmap.languages if any(same_language(x, h) for h in have)]
        if not chosen:
            raise LangNeuronsError(f"{spec} has none of the neuron map's languages ({','.join(self.nmap.languages)}); "
                                   f"it has {','.join(have)}")
        return select_languages(have, chosen, spec, max_per_lang=cfg.max_examples)

    def corpus(self, family: str) -> dict[str, list[Any]] | None:
        return {"ppl": self.texts, "acc": self.problems, "choice": self.choices}[family]

    # -- inputs --------------------------------------------------------------------------------
    def _read_corpora(self, given: Mapping[str, Sequence[Example]] | None
                      ) -> tuple[dict[str, list[Any]] | None, dict[str, list[Any]] | None]:
        cfg, texts, problems = self.config, None, None
        if "accuracy" in cfg.metrics:
            from .evaluate import group_by_lang, read_mgsm

            path = cfg.math_corpus or cfg.eval_corpus
            problems = _limit(_select(group_by_lang(read_mgsm(path)), cfg.langs, self.nmap.languages, str(path)),
                              cfg.max_examples)
        if cfg.ppl_metrics:
            if given is not None:
                texts = _limit({k: list(v) for k, v in given.items()}, cfg.max_examples)
            else:
                path = cfg.eval_corpus
                if path is None:
                    split = self.run.stage_result("split")
                    if split.get("eval_corpus") and (self.run.path / split["eval_corpus"]).is_file():
                        path = self.run.path / split["eval_corpus"]
                if path is None:
                    raise LangNeuronsError("give --eval-corpus PATH (held-out texts per language; the run has no "
                                           "eval_corpus.jsonl)")
                from .corpus import load_corpus

                kind = {"all": "text", "response": "qa"}.get(cfg.scope, "auto")
                corp = load_corpus(path, kind=kind)  # type: ignore[arg-type]
                texts = _limit(_select(corp.by_lang, cfg.langs, self.nmap.languages, str(path)), cfg.max_examples)
        return texts, problems

    def dtype(self) -> str:
        """The dtype the rows are computed in (asked for, else the run's)."""
        info = self.run.read_manifest().get("model") or {}
        return str(self.config.model.dtype or info.get("dtype") or "float32")

    def provenance(self, family: str, model_fingerprint: str | None) -> dict[str, Any]:
        cfg = self.config
        if family == "choice":
            from .choice import BELEBELE_TEMPLATE, NO_PASSAGE_TEMPLATE

            return {"neurons_sha256": self.neurons_sha256, "model_fingerprint": model_fingerprint or "",
                    "dtype": self.dtype(), "scope": "choice", "control_plan": cfg.control,
                    "control_bins": cfg.control_bins if cfg.control == "matched" else 0,
                    "prompt": input_key([BELEBELE_TEMPLATE, NO_PASSAGE_TEMPLATE])[:12], "bootstrap": cfg.bootstrap,
                    "mode": "zero", "positions": "all", "max_length": cfg.max_length or 0, "ppl_style": "none"}
        ppl = family == "ppl"
        corpus = self.texts if ppl else self.problems
        scope = cfg.scope
        if scope == "auto":  # what "auto" resolves to on these texts (evaluate._resolve_scope's rule)
            examples = [e for v in (corpus or {}).values() for e in v]
            scope = "response" if examples and all(getattr(e, "is_pair", False) for e in examples) else "all"
        return {"neurons_sha256": self.neurons_sha256, "model_fingerprint": model_fingerprint or "",
                "dtype": self.dtype(),
                "scope": scope if ppl else "generate",
                "control_plan": cfg.control, "control_bins": cfg.control_bins if cfg.control == "matched" else 0,
                "prompt": "" if ppl else input_key([cfg.chat, cfg.prompt_template])[:12],
                "bootstrap": cfg.bootstrap if ppl else 0, "mode": "zero",
                "positions": "all" if ppl else cfg.positions,
                "max_length": cfg.max_length or 0 if ppl else cfg.max_new_tokens,
                "ppl_style": cfg.ppl_style if ppl else "none"}

    def eval_fingerprints(self, family: str) -> dict[str, str]:
        """Per evaluated language, the fingerprint of its texts (the rows' ``eval_sha256``): a
        row stays valid as long as ITS language's texts are unchanged, whichever other languages
        an ablation evaluated with it."""
        corpus = self.corpus(family) or {}
        if family == "choice":
            from .choice import questions_fingerprint

            return questions_fingerprint(corpus)
        return {lang: texts_fingerprint({lang: exs}) for lang, exs in corpus.items()}

    def _metric_names(self, family: str) -> tuple[str, ...]:
        return self.config.ppl_metrics if family == "ppl" else self.FAMILIES[family]

    def stale_sets(self, old: Any, family: str, model_fingerprint: str | None) -> list[str]:
        """The neuron sets of the plan whose rows are missing or were computed from other inputs."""
        import pandas as pd

        if old is None or not len(old):
            return list(self.config.sets)
        prov = self.provenance(family, model_fingerprint)
        if any(c not in old.columns for c in PROVENANCE):
            return list(self.config.sets)
        ok = old
        for col, want in prov.items():
            ok = ok[ok[col].astype(str) == str(want)]
        fps = self.eval_fingerprints(family)
        ok = ok[ok["eval_sha256"].astype(str) == ok["eval_lang"].map(fps).astype(str)]
        eval_langs = list(self.corpus(family) or {})
        stale = []
        for nset in self.config.sets:
            need = {(m, nset, d, e, None) for m in self._metric_names(family) for d in self.langs for e in eval_langs}
            if self.config.control != "none":
                need |= {(m, f"random:{nset}", d, e, s) for m in self._metric_names(family) for d in self.langs
                         for e in eval_langs for s in self.config.control_seeds}
            have = {(r.metric, r.neuron_set, r.deactivated_lang, r.eval_lang, None if pd.isna(r.seed) else int(r.seed))
                    for r in ok.itertuples()}
            if not need <= have:
                stale.append(nset)
        return stale

    def _read_old(self) -> Any:
        import pandas as pd

        if not self.run.ablation_path.exists():
            return None
        try:
            return pd.read_parquet(self.run.ablation_path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise LangNeuronsError(f"{self.run.ablation_path} cannot be read ({type(exc).__name__}); delete it to "
                                   "recompute the matrix") from None

    # -- run -------------------------------------------------------------------------------------
    def run_stage(self, loaded: Any = None, *, echo: Echo = _quiet) -> Any:
        """Compute the stale parts (loading the model only if something is stale), merge, write."""
        import pandas as pd

        old = None if self.config.force else self._read_old()
        want_fp = (self.run.read_manifest().get("model") or {}).get("model_fingerprint")
        if loaded is None and self.config.model.model:  # another model: its fingerprint decides freshness
            loaded = self.config.model.load(self.run.read_manifest())
        fp = getattr(loaded, "fingerprint", None) or want_fp
        families = [f for f in self.FAMILIES if self.corpus(f)]
        stale = {f: self.stale_sets(old, f, fp) for f in families}
        if not any(stale.values()):
            echo("[ablate] up to date, skipped")
            return self._read_old()
        if loaded is None:
            loaded = self.config.model.load(self.run.read_manifest())
            fp = getattr(loaded, "fingerprint", None) or want_fp
        nfp = (self.nmap.meta.get("model_fingerprint"))
        if nfp and fp and nfp != fp and not self.config.force:
            raise NeuronMapError(f"the neuron map was made for another model (fingerprint {nfp}, this model {fp}); "
                                 "give the run's model, or --force to use the map anyway")
        echo("[ablate] ...")
        t0 = time.perf_counter()
        frames, info = [], {}
        for family in families:
            if not stale[family]:
                continue
            df, st = self._compute(loaded, family, stale[family], echo)
            for col, value in self.provenance(family, fp).items():
                df[col] = value
            df["eval_sha256"] = df["eval_lang"].map(self.eval_fingerprints(family))
            frames.append(df)
            match = st.pop("control_match", None) or []
            if match:  # one entry per set x language x seed: keep the shortfalls only
                st["control_shortfalls"] = [m for m in match if m.get("shortfall")]
                st["control_draws"] = len(match)
            info[family] = {**st, "sets": stale[family]}
        new = pd.concat(frames, ignore_index=True)
        merged = merge_rows(old, new, self.neurons_sha256)
        atomic_write(self.run.ablation_path, lambda p: merged.to_parquet(p, index=False))
        from .report.ablation import heatmaps

        figures = heatmaps(merged, self.run.figures_dir)
        seconds = time.perf_counter() - t0
        self._commit(merged, info, figures, seconds)
        echo(f"[ablate] done in {seconds:.1f} s")
        return merged

    def activity(self) -> Any:
        """[L, N] firing rate of every neuron in its busiest language (the matched control's
        strata), from the run's stats of the map's languages."""
        if self.config.control != "matched":
            return None
        if self._activity is None:
            from .intervene import activity_from_probs
            from .stats import ActivationStats

            try:
                stats = ActivationStats.load(self.run.path, list(self.nmap.languages), buckets=False)
            except LangNeuronsError as exc:
                raise LangNeuronsError(f"the matched control needs the run's stats ({exc}); or use --control layer") \
                    from None
            from .moe import is_moe_stats, neuron_probs

            # MoE: firing rates over the tokens routed to each neuron's expert (0 where unobserved)
            self._activity = activity_from_probs(neuron_probs(stats)[0] if is_moe_stats(stats) else stats.probs())
        return self._activity

    def _compute(self, loaded: Any, family: str, sets: list[str], echo: Echo) -> tuple[Any, dict[str, Any]]:
        from .evaluate import ablation_matrix, accuracy_matrix, write_generations

        cfg, st = self.config, {}
        common = dict(neuron_sets=sets, control=cfg.control_or_none, control_seeds=cfg.control_seeds,
                      batch_size=cfg.batch_size, progress=cfg.progress, langs=self.langs, act_path=cfg.model.act_path,
                      stats=st, activity=self.activity(), control_bins=cfg.control_bins)
        if family == "ppl":
            docs: list[dict] = []
            self._say_cost(loaded, sets, echo)
            df = ablation_matrix(loaded.model, loaded.tokenizer, self.nmap, self.texts, metrics=cfg.ppl_metrics,
                                 scope=cfg.scope, max_length=cfg.max_length, bootstrap=cfg.bootstrap,
                                 documents=docs, echo=echo, ppl_style=cfg.ppl_style, **common)
            self._write_documents(docs, sets)
            return df, st
        if family == "choice":
            from .choice import choice_accuracy_matrix

            df = choice_accuracy_matrix(loaded.model, loaded.tokenizer, self.nmap, self.choices,  # type: ignore[arg-type]
                                        bootstrap=cfg.bootstrap, max_length=cfg.max_length, **common)
            return df, st
        generations: list[dict] = []
        df = accuracy_matrix(loaded.model, loaded.tokenizer, self.nmap, self.problems, max_new_tokens=cfg.max_new_tokens,
                             generations=generations, chat=cfg.chat, positions=cfg.positions,
                             prompt_template=cfg.prompt_template, **common)
        write_generations(self.run.generations_path, generations)
        return df, st

    def _say_cost(self, loaded: Any, sets: list[str], echo: Echo) -> None:
        """Before the matrix starts: passes x tokens per pass and the time they will take at the
        speed measured while recording (the matrix re-estimates after its baseline pass)."""
        from .evaluate import ablation_cost, eval_cost_factor, plan_passes, select_eval_docs

        cfg = self.config
        passes = plan_passes(self.nmap, langs=self.langs, neuron_sets=sets, control=cfg.control_or_none,
                             control_seeds=cfg.control_seeds, activity=self.activity(), control_bins=cfg.control_bins)
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            tokens = select_eval_docs(loaded.tokenizer, self.texts or {}, 1 << 40, scope=cfg.scope, min_docs=0)
        speed = self.run.stage_result("record").get("tokens_per_second")
        docs = ", ".join(f"{k} {len(v)}" for k, v in (self.texts or {}).items())
        if speed:
            ablation_cost(passes, tokens.tokens_per_pass, float(speed), factor=eval_cost_factor(loaded.model),
                          echo=lambda line: echo(f"[ablate] {line} (documents per language: {docs})"))
        else:
            echo(f"[ablate] {passes} passes x {tokens.tokens_per_pass:,} tokens (documents per language: {docs}); "
                 "the time is estimated after the baseline pass")

    def _write_documents(self, rows: list[dict], sets: list[str]) -> None:
        """Per-document scores (the intervals' input, ablation_docs.parquet), merged like the rows:
        only documents of the current evaluation texts and neuron map are kept; the recomputed sets
        (and the baseline) replace their old rows."""
        import pandas as pd

        from .intervals import DOCS_FILE, documents_frame

        new = documents_frame(rows)
        new["neurons_sha256"] = self.neurons_sha256
        fps = self.eval_fingerprints("ppl")
        new["eval_sha256"] = new["eval_lang"].map(fps)
        path = self.run.path / DOCS_FILE
        old = None
        if path.exists() and not self.config.force:
            try:
                old = pd.read_parquet(path)
            except Exception:  # noqa: BLE001 - a damaged per-document file is recomputed, never read
                old = None
        if old is not None and {"neurons_sha256", "eval_sha256"} <= set(old.columns):
            # documents of this map whose language's texts are unchanged (or were not evaluated now)
            changed = old["eval_lang"].isin(list(fps)) & (old["eval_sha256"] != old["eval_lang"].map(fps))
            same = (old["neurons_sha256"] == self.neurons_sha256) & ~changed
            doc_key = ["neuron_set", "deactivated_lang", "seed", "eval_lang", "doc"]

            def keys(df: Any) -> Any:
                return _joined(df, doc_key)

            keep = old[same]
            keep = keep[~keys(keep).isin(set(keys(new)))] if len(keep) else keep
            new = pd.concat([keep, new], ignore_index=True)
        atomic_write(path, lambda p: new.to_parquet(p, index=False))
        self._documents_path = path

    def _commit(self, df: Any, info: dict[str, Any], figures: list[Path], seconds: float) -> None:
        cfg = self.config
        parts = df[[c for c in ("metric", *PROVENANCE) if c in df.columns]].drop_duplicates()
        section = {"rows": int(len(df)), "metrics": sorted(set(map(str, df["metric"]))),
                   "neuron_sets": sorted(set(str(s) for s in df["neuron_set"] if not str(s).startswith("random:"))),
                   "control": cfg.control, "control_seeds": list(cfg.control_seeds) if cfg.control != "none" else [],
                   "control_bins": cfg.control_bins if cfg.control == "matched" else None,
                   "languages": self.langs, "batch_size": cfg.batch_size, "mode": "zero",
                   # what the perplexity rows in the table were computed with (not this call's settings,
                   # which may have computed only accuracy)
                   **_table_settings(df),
                   "eval_corpus": None if cfg.eval_corpus is None else str(cfg.eval_corpus),
                   "math_corpus": None if cfg.math_corpus is None else str(cfg.math_corpus),
                   "choice_corpus": cfg.choice_corpus,
                   "passes": sum(int(s.get("passes", s.get("generation_cells", 0))) for s in info.values()),
                   "seconds": round(seconds, 3), "computed": info,
                   "figures": [str(p.relative_to(self.run.path)) for p in figures]}
        inputs = {"neurons_sha256": self.neurons_sha256,
                  "parts": json.loads(parts.astype(str).to_json(orient="records"))}
        outputs = [self.run.ablation_path]
        from .intervals import DOCS_FILE

        if (self.run.path / DOCS_FILE).exists():
            outputs.append(self.run.path / DOCS_FILE)
        commit_stage(self.run, self.name, inputs, outputs, section, seconds, by=self.by)


def _joined(df: Any, cols: list[str]) -> Any:
    """One string per row of the given columns (a hashable key; missing values as "<NA>")."""
    import pandas as pd

    if not len(df):
        return pd.Series([], dtype=object, index=df.index)
    return df[cols].apply(lambda row: "|".join("<NA>" if pd.isna(v) else str(v) for v in row), axis=1)


def _table_settings(df: Any) -> dict[str, Any]:
    """scope / bootstrap / ppl_style of the table's perplexity rows (one value each after a merge)."""
    ppl = df[df["metric"].isin(PPL_METRICS)] if "metric" in df.columns else df.iloc[0:0]
    out: dict[str, Any] = {}
    for col, cast in (("scope", str), ("bootstrap", int), ("ppl_style", str)):
        values = sorted(set(ppl[col].dropna())) if col in ppl.columns else []
        out[col] = cast(values[0]) if len(values) == 1 else (None if not values else [cast(v) for v in values])
    return out


def merge_rows(old: Any, new: Any, neurons_sha256: str) -> Any:
    """``old`` rows that are still valid, plus ``new``. An old row goes when a new row has its
    `ROW_KEY`, when it was made with another neuron map, or when it belongs to a metric family that
    was just recomputed (perplexity metrics / task-accuracy metrics) with other `PROVENANCE`
    (another evaluation text, model, dtype, style ...): one table never mixes two evaluations of a
    family. Rows of other languages, sets and seeds with the same provenance are kept."""
    import pandas as pd

    if old is None or not len(old):
        return new.reset_index(drop=True)
    if not {"neurons_sha256", *ROW_KEY} <= set(old.columns):
        return new.reset_index(drop=True)  # rows without provenance cannot be trusted to match this map
    keep = old[old["neurons_sha256"].astype(str) == neurons_sha256]

    def keys(df: Any) -> Any:
        return _joined(df, list(ROW_KEY))

    keep = keep[~keys(keep).isin(set(keys(new)))]
    prov_cols = [c for c in PROVENANCE if c in new.columns and c in keep.columns and c != "eval_sha256"]
    for family in (PPL_METRICS, ACCURACY_METRICS, CHOICE_METRICS):
        fresh = new[new["metric"].isin(family)]
        if not len(fresh) or not prov_cols:
            continue
        current = set(_joined(fresh, prov_cols))
        in_family = keep["metric"].isin(family)
        same = _joined(keep, prov_cols).isin(current) if len(keep) else in_family
        keep = keep[~in_family | same]
        if "eval_sha256" in fresh.columns and "eval_sha256" in keep.columns and len(keep):
            # an evaluated language whose texts changed: its old rows of this family go
            now = dict(zip(fresh["eval_lang"], fresh["eval_sha256"]))
            other_text = keep["eval_lang"].isin(list(now)) & (keep["eval_sha256"] != keep["eval_lang"].map(now))
            keep = keep[~(keep["metric"].isin(family) & other_text)]
    if not len(keep):
        return new.reset_index(drop=True)
    return pd.concat([keep, new], ignore_index=True)


# -- logit lens --------------------------------------------------------------------------------
def lens_texts(by_lang: Mapping[str, Sequence[Example]], max_docs: int | None) -> dict[str, list[str]]:
    """The lens reads plain text: a pair is read as prompt + response."""
    return {lang: [e.text or (e.prompt or "") + (e.response or "") for e in exs][:max_docs]
            for lang, exs in by_lang.items()}


class LensStage(Stage[Any]):
    """lens.parquet: the logit lens per layer and language (lens.py) on parallel texts."""

    name = "lens"

    def __init__(self, run: RunDir | str | Path, loaded: Any, texts: Mapping[str, Sequence[str]], config: Any = None,
                 *, by: str = ""):
        from .lens import LensConfig

        super().__init__(run, by=by)
        self.loaded, self.texts, self.config = loaded, dict(texts), config or LensConfig()

    def inputs(self) -> dict[str, Any]:
        return {"model_fingerprint": getattr(self.loaded, "fingerprint", None),
                "texts": input_key(self.texts), "config": asdict(self.config)}

    def compute(self) -> Any:
        from .lens import lens_metrics

        return lens_metrics(self.loaded.model, self.loaded.tokenizer, self.texts, self.config)

    def load(self) -> Any:
        import pandas as pd

        return pd.read_parquet(self.run.path / "lens.parquet")

    def write(self, df: Any) -> tuple[list[Path], dict[str, Any]]:
        from .lens import LENS_FILE, lens_summary

        path = self.run.path / LENS_FILE
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
        return [path], {"file": path.name, "documents": {k: len(v) for k, v in self.texts.items()},
                        "summary": lens_summary(df, self.config.english)}


# -- steering ------------------------------------------------------------------------------------
class SteerStage(Stage[Any]):
    """steer.parquet: forcing success, fidelity and fluency cost of steering the output language
    with language neurons, activity-matched random neurons and a DiffMean residual vector
    (steer.py). Rows are merged into the file by their key, so a strength sweep on a few pairs
    and a later grid at the best strength add up in one table; rows made with another neuron
    map, stats, model or prompts are dropped."""

    name = "steer"

    def __init__(self, run: RunDir | str | Path, config: Any, *, loaded: Any = None, nmap: Any = None, stats: Any = None,
                 prompt_docs: Mapping[str, Sequence[Any]] | None = None,
                 resid_docs: Mapping[str, Sequence[Any]] | None = None, by: str = ""):
        from .neurons import NeuronMap
        from .steer import read_steer

        super().__init__(run, by=by)
        self.config = config.validate()
        self._loaded = loaded
        self.nmap = nmap if nmap is not None else NeuronMap.load(self.run.neurons_path)
        self._stats = stats
        self.langs = list(self.nmap.languages)
        cfg = self.config
        for what, given in (("--from", cfg.sources), ("--to", cfg.targets)):
            bad = [x for x in given or [] if x not in self.langs]
            if bad:
                raise LangNeuronsError(f"{what} {','.join(bad)} not in the neuron map ({','.join(self.langs)})")
        self.sources = list(cfg.sources or self.langs)
        self.targets = list(cfg.targets or self.langs)
        from .steer import iter_pairs

        if any(m in cfg.methods for m in ("experts", "random-experts")):  # before any model is loaded
            from .moe import experts_map

            try:
                experts_map(self.nmap)
            except NeuronMapError as exc:
                raise NeuronMapError(f"--methods experts needs a mixture-of-experts run: {exc}") from None
        self.pairs = list(iter_pairs(self.sources, self.targets, cfg.diagonal))
        if not self.pairs:
            raise LangNeuronsError("no (from, to) pair to steer: --from and --to name the same single language "
                                   "(pass --diagonal to steer a language to itself)")
        self.prompt_docs = dict(prompt_docs) if prompt_docs is not None else self._eval_docs()
        missing = [x for x in dict.fromkeys(self.sources + self.targets) if not self.prompt_docs.get(x)]
        if missing:
            raise LangNeuronsError(f"no held-out documents for {','.join(missing)}: the prompts and references come "
                                   "from the run's eval_corpus.jsonl (pass prompt documents from Python otherwise)")
        self._resid_docs = dict(resid_docs) if resid_docs is not None else None
        self.old = None if cfg.force else read_steer(self.run.path)
        self._echo: Echo = _quiet
        self.generations: list[dict[str, Any]] = []

    # -- inputs ----------------------------------------------------------------------------------
    def _eval_docs(self) -> dict[str, list[Any]]:
        from .corpus import load_corpus

        if not self.run.eval_corpus_path.is_file():
            raise LangNeuronsError(f"{self.run.eval_corpus_path} is missing: steering prompts come from the run's "
                                   "held-out documents (made by langneurons run)")
        return load_corpus(self.run.eval_corpus_path, kind="auto").by_lang

    def resid_docs(self) -> dict[str, list[Any]]:
        """The run's identification documents (the recorded part of its corpus) for the mean
        residuals of DiffMean: never the held-out documents the prompts and references come from."""
        if self._resid_docs is None:
            from .corpus import load_corpus

            split = self.run.stage_result("split")
            source, holdout = split.get("source"), split.get("holdout")
            if not source or not holdout or not Path(source).exists():
                raise LangNeuronsError("the run names no corpus for the DiffMean residuals (its split stage has no "
                                       "source); pass --methods neurons,random or give resid_docs from Python")
            if split.get("kind") not in ("text", "qa", "auto", None):
                raise LangNeuronsError(f"steering reads parallel texts, but this run's corpus is a {split.get('kind')} "
                                       "(run --task); steer a run made from a parallel corpus (--corpus)")
            corpus = load_corpus(source, sorted(set(self.sources) | set(self.targets)), kind=split.get("kind") or "text")
            self._resid_docs = corpus.split(float(holdout))[0].by_lang
        need = set(self.sources) | set(self.targets)
        return {k: list(v)[: self.config.diffmean_docs] for k, v in self._resid_docs.items() if k in need}

    @property
    def stats(self) -> Any:
        if self._stats is None:
            from .stats import ActivationStats

            self._stats = ActivationStats.load(self.run.path, self.langs, buckets=False)
        return self._stats

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            self._loaded = self.config.model.load(self.run.read_manifest())
        return self._loaded

    def prompts(self) -> dict[str, list[dict[str, Any]]]:
        from .steer import steer_prompts

        need = list(dict.fromkeys(self.sources + self.targets))
        return steer_prompts({k: self.prompt_docs[k] for k in need}, self.config.prompts, self.config.prompt_fraction)

    def num_layers(self) -> int:
        return self.nmap.num_layers

    def diffmean_layers(self) -> list[int]:
        from .arch import locate_unembedding

        if self.config.diffmean_layers:
            return list(self.config.diffmean_layers)
        blocks = len(locate_unembedding(self.loaded.model).layers) if self._loaded is not None else self.num_layers()
        return [blocks // 2]

    def strengths(self) -> dict[str, list[tuple[float, str]]]:
        """Per method the (strength, layers) to run; 'best' takes the best of steer.parquet."""
        from .steer import best_settings, layer_ranges

        cfg, out = self.config, {}
        ranges = [name for name, _ in layer_ranges(list(cfg.layers), self.num_layers())]
        for method in ("neurons", "random", "diffmean", "experts", "random-experts"):
            if method not in cfg.methods:
                continue
            given = cfg.diffmean_strengths if method == "diffmean" else cfg.strengths
            layers = [str(x) for x in self.diffmean_layers()] if method == "diffmean" else ranges
            if given == "best":
                experts = method in ("experts", "random-experts")
                match = {} if method == "diffmean" else {"mode": "force" if experts else cfg.mode,
                                                         "classes": cfg.classes, "neurons": cfg.neurons}
                of = {"random": "neurons", "random-experts": "experts"}.get(method, method)
                best = best_settings(self.old, of, positions=cfg.positions, setting=self.setting(), **match)
                if best is None:
                    raise LangNeuronsError(f"--strength best: steer.parquet has no {method} rows of these settings to "
                                           "choose from; run a sweep with explicit strengths first")
                out[method] = [best]
            else:
                out[method] = [(float(s), name) for s in given for name in layers]
        return out

    def setting(self) -> str:
        """What every row depends on beyond its key: neuron map, stats, model, the prompt documents
        and their cut (of every language, so that runs over other pairs share it), lengths."""
        from .steer import steer_prompts

        cfg = self.config
        return input_key({"neurons": self.nmap.fingerprint(), "stats": self.stats.fingerprint(),
                          "model": (self.run.read_manifest().get("model") or {}).get("model_fingerprint")
                          if cfg.model.model is None else cfg.model.model,
                          "dtype": cfg.model.dtype, "max_new_tokens": cfg.max_new_tokens,
                          # every document's prompt (not only the first --prompts): a sweep on 8 prompts and a
                          # grid on 2 share their setting; each row says how many prompts it rests on
                          "prompts": input_key(steer_prompts(self.prompt_docs, 1 << 30, cfg.prompt_fraction)),
                          "chat": cfg.chat, "diffmean_docs": cfg.diffmean_docs, "max_length": cfg.max_length,
                          "control_bins": cfg.control_bins})[:16]

    def inputs(self) -> dict[str, Any]:
        from .steer import config_json

        return {"setting": self.setting(), "config": config_json(self.config), "pairs": self.pairs,
                "strengths": self.strengths()}

    # -- compute and write -----------------------------------------------------------------------
    def compute(self) -> Any:
        from .evaluate import DEFAULT_DETECT_LANGUAGES
        from .intervene import activity_from_probs
        from .moe import is_moe_stats, neuron_probs
        from .steer import doc_text, residual_means, steer_grid

        cfg, loaded = self.config, self.loaded
        nfp = self.nmap.meta.get("model_fingerprint")
        if nfp and loaded.fingerprint and nfp != loaded.fingerprint and not cfg.force:
            raise NeuronMapError(f"the neuron map was made for another model (fingerprint {nfp}, this model "
                                 f"{loaded.fingerprint}); give the run's model, or --force")
        stats = self.stats
        means = stats.means()
        strengths = self.strengths()
        resid, layers = None, self.diffmean_layers()
        if "diffmean" in strengths:
            texts = {k: [doc_text(e) for e in v] for k, v in self.resid_docs().items()}
            resid = residual_means(loaded.model, loaded.tokenizer, texts, layers, max_length=cfg.max_length,
                                   batch_size=cfg.batch_size)
        self.generations = []
        detect = list(dict.fromkeys([*DEFAULT_DETECT_LANGUAGES, *self.langs]))
        df = steer_grid(loaded.model, loaded.tokenizer, self.nmap, means, stats.languages, self.prompts(), cfg,
                        activity=activity_from_probs(neuron_probs(stats)[0] if is_moe_stats(stats) else stats.probs())
                        if "random" in strengths else None,
                        resid_means=resid, resid_layers=layers, pairs=self.pairs, strengths=strengths,
                        detect_langs=detect, generations=self.generations, echo=self._echo)
        df["setting"] = self.setting()
        return df

    def run_stage(self, *, force: bool = False, echo: Echo | None = None) -> Any:  # type: ignore[override]
        """Compute (unless current) and return the whole merged table of steer.parquet."""
        self._echo = echo or _quiet
        super().run_stage(force=force or self.config.force, echo=echo)
        return self.load()

    def load(self) -> Any:
        from .steer import read_steer

        return read_steer(self.run.path)

    def write(self, df: Any) -> tuple[list[Path], dict[str, Any]]:
        from .evaluate import write_generations
        from .report.steer import steer_figures
        from .steer import STEER_FILE, STEER_GENERATIONS, merge_steer_rows, summary_table

        merged = merge_steer_rows(self.old, df)
        path = self.run.path / STEER_FILE
        atomic_write(path, lambda tmp: merged.to_parquet(tmp, index=False))
        gen_path = self.run.path / STEER_GENERATIONS
        old_gens = []
        if gen_path.is_file() and self.old is not None and len(merged) > len(df):
            keys = {(r["method"], r["layers"], float(r["strength"]), r["src"], r["tgt"]) for r in self.generations}
            for line in gen_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if (rec.get("method"), rec.get("layers"), float(rec.get("strength") or 0), rec.get("src"),
                        rec.get("tgt")) not in keys:
                    old_gens.append(rec)
        write_generations(gen_path, old_gens + self.generations)
        figures = steer_figures(merged, self.run.figures_dir)
        table = summary_table(df)
        section = {"file": path.name, "rows": int(len(merged)), "new_rows": int(len(df)), "pairs": len(self.pairs),
                   "setting": self.setting(), "strengths": self.strengths(),
                   "summary": json.loads(table.to_json(orient="records")),
                   "figures": [str(p.relative_to(self.run.path)) for p in figures]}
        return [path, gen_path], section
