"""The main job: record -> identify (auto λ) -> anatomy -> ablation matrix -> report.

With ``--task PATH`` (`run_task_pipeline`) it is the published experiment: the model answers
the task's questions in every language (generate), the response tokens of its own answers are
recorded (from the generated token ids), then identify -> anatomy -> ablation (task accuracy in
the requested language + perplexity of the held-out questions) -> report. The questions are
split like a corpus: every round(1/holdout)-th question (the same ids in every language) is held
out for the ablation, the others are answered and recorded.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .config import DEFAULT_SETS, AblationConfig, IdentifyConfig, ModelConfig, require
from .corpus import load_corpus
from .runs import RunDir

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Everything `langneurons run` needs; the defaults are the full analysis (the demo's
    smaller settings are DEMO_ARGS in the Makefile)."""

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
    control: str = "matched"
    control_seeds: tuple[int, ...] = (0, 1, 2)
    control_bins: int = 20
    ablation_langs: list[str] | None = None  # rows and columns of the matrix (default: all languages)
    eval_tokens_per_lang: int | None = 2000  # held-out tokens per language for the ablation (None: all)
    metrics: tuple[str, ...] = ("nll", "ppl", "bpb")
    choice_corpus: str | None = None  # multiple-choice questions (hf:belebele, JSONL): adds choice_accuracy rows
    batch_size: int = 8
    max_tokens_per_lang: int | None = None
    max_eval_docs: int | None = None  # cap held-out documents per language
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    max_memory: str | dict | None = None
    mlp_act_path: str | None = None
    revision: str | None = None  # hub branch/tag/commit of --model
    trust_remote_code: bool = False
    offline: bool | None = None  # None: HF_HUB_OFFLINE decides
    pivot: str = "en"
    bootstrap: int = 1000  # resamples of evaluation documents for ΔNLL intervals (0: none)
    stability: int = 0  # bootstrap resamples of the identification (0: skip; `langneurons stability`)
    lens_docs: int = 16  # held-out documents per language for the logit lens (0: skip the lens)
    lens_max_length: int = 128
    skip_ablation: bool = False
    force: bool = False
    progress: bool = True
    # pairs and perplexity
    separator: str = "\n"  # between prompt and response of plain (non-chat) pairs (the authors use none: "")
    chat: bool | None = None  # chat template for pairs and task prompts (None: when the tokenizer has one)
    ppl_style: str = "token"  # token | paper (mean over documents of document means)
    # --task: the model answers a task's questions (generate -> record (response) -> ...)
    task: Path | None = None
    max_questions: int | None = None  # per language
    max_new_tokens: int = 256
    sample: bool = False  # greedy (default) or sampling
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    gen_seed: int = 0
    template: str | None = None  # user message with {question} (default: generate.CHAT_TEMPLATE / PLAIN_TEMPLATE)
    counting: str = "pass"  # pass: one pass over the generated ids | during: counted while generating

    def identify_config(self) -> IdentifyConfig:
        return IdentifyConfig(method=self.method, top_rate=self.top_rate, bar=self.bar, lam=self.lam)

    def model_config(self) -> ModelConfig:
        return ModelConfig(model=self.model, dtype=self.dtype, device=self.device, device_map=self.device_map,
                           max_memory=self.max_memory, act_path=self.mlp_act_path, revision=self.revision,
                           trust_remote_code=self.trust_remote_code, offline=self.offline)

    def ablation_config(self) -> AblationConfig:
        return AblationConfig(sets=self.neuron_sets, control=self.control, control_seeds=self.control_seeds,
                              control_bins=self.control_bins, langs=self.ablation_langs,
                              metrics=tuple(self.metrics) + (("choice_accuracy",) if self.choice_corpus else ()),
                              choice_corpus=self.choice_corpus, batch_size=self.batch_size, scope=self.scope,
                              bootstrap=self.bootstrap, progress=self.progress, force=self.force,
                              model=self.model_config(), ppl_style=self.ppl_style, chat=self.chat,
                              max_new_tokens=self.max_new_tokens)

    def generate_config(self) -> Any:
        from .generate import GenerateStageConfig
        from .lm import GenerateConfig

        return GenerateStageConfig(
            task=self.task, langs=self.langs, max_questions=self.max_questions, template=self.template,
            counting=self.counting, progress=self.progress,
            decoding=GenerateConfig(max_new_tokens=self.max_new_tokens, do_sample=self.sample,
                                    temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                    seed=self.gen_seed, batch_size=self.batch_size, chat=self.chat))

    def validate(self) -> "RunConfig":
        """Every option is checked before the model loads: a bad value must not cost a recording."""
        self.out = Path(self.out)
        require(self.scope in ("all", "response"), f"--scope must be 'all' or 'response', got {self.scope!r}")
        require(0 < self.holdout <= 0.5, f"--holdout must be in (0, 0.5], got {self.holdout}")
        require(self.max_tokens_per_lang is None or self.max_tokens_per_lang >= 1,
                f"--max-tokens-per-lang must be >= 1, got {self.max_tokens_per_lang}")
        require(self.max_eval_docs is None or self.max_eval_docs >= 1,
                f"--max-eval-docs must be >= 1, got {self.max_eval_docs}")
        require(self.stability >= 0, f"--stability must be >= 0 (0: skip), got {self.stability}")
        require(self.lens_docs >= 0, f"--lens-docs must be >= 0 (0: no logit lens), got {self.lens_docs}")
        require(self.lens_max_length >= 2, f"--lens-max-length must be >= 2, got {self.lens_max_length}")
        require(self.langs is None or len(self.langs) >= 2, f"--langs needs at least 2 languages, got {self.langs}")
        require(self.ablation_langs is None or len(self.ablation_langs) >= 1,
                f"--ablation-langs needs at least 1 language, got {self.ablation_langs}")
        require(self.ablation_langs is None or self.langs is None or set(self.ablation_langs) <= set(self.langs),
                f"--ablation-langs {self.ablation_langs} must be among --langs {self.langs}")
        require(self.eval_tokens_per_lang is None or self.eval_tokens_per_lang >= 1,
                f"--eval-tokens-per-lang must be >= 1, got {self.eval_tokens_per_lang}")
        ident = self.identify_config().validate()
        self.lam = ident.lam
        if self.task is not None:
            require(self.corpus is None, "give either --task (the model answers its questions) or --corpus, not both")
            require(self.scope == "all", "--scope applies to --corpus runs; a --task run records the response "
                    "tokens of the model's answers and scores perplexity on the held-out questions")
            self.task = Path(self.task)
            self.generate_config().validate()
        abl = self.ablation_config().validate()
        self.neuron_sets, self.control, self.control_seeds = abl.sets, abl.control, abl.control_seeds
        self.max_memory = abl.model.max_memory
        return self


@dataclass
class StageTimer:
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any], echo: Callable[[str], None]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 1)
        return out


def run_config_from_options(options: dict[str, Any], *, config_file: Path | None = None,
                            given: set[str] | frozenset[str] = frozenset()) -> RunConfig:
    """The validated `RunConfig` of `langneurons run`'s options (textual lists parsed); with
    ``config_file`` (YAML, as ``--dump-config`` writes it) the file's values, overridden by the
    options ``given`` on the command line."""
    from .config import parse_class_sets, split_list

    opts = dict(options)
    opts["neuron_sets"] = parse_class_sets(opts.pop("sets", None))
    for key in ("langs", "ablation_langs"):
        opts[key] = split_list(opts.get(key), what=f"--{key.replace('_', '-')}")
    if "offline" in opts:
        opts["offline"] = opts["offline"] or None
    cfg = RunConfig(**opts)
    if config_file is not None:
        from .config import run_config_from_yaml

        fields = {("neuron_sets" if n == "sets" else n) for n in given if n not in ("config", "dump_config")}
        cfg = run_config_from_yaml(config_file, {n: getattr(cfg, n) for n in fields if hasattr(cfg, n)})
    return cfg.validate()


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] = print) -> Path:
    """split -> record -> identify -> anatomy -> [stability] -> ablation -> report, each a stage
    that is skipped when it is current (stage.Stage's one rule)."""
    from .align import read_align_info
    from .record import RecordConfig, record
    from .stages import AblationStage, SplitStage

    cfg.validate()
    if cfg.task is not None:
        return run_task_pipeline(cfg, echo)
    run = RunDir(cfg.out)
    timer = StageTimer()
    kind = "qa" if cfg.scope == "response" else "text"
    corpus = load_corpus(cfg.corpus, cfg.langs, kind=kind)  # type: ignore[arg-type]
    loaded = timer.run("load model", lambda: cfg.model_config().validate().load(), echo)
    echo(f"model {loaded.source}: {type(loaded.model).__name__}, {loaded.dtype}")
    split = SplitStage(run, corpus, cfg.holdout, kind=kind, max_eval_docs=cfg.max_eval_docs,
                       eval_langs=cfg.ablation_langs, eval_tokens_per_lang=cfg.eval_tokens_per_lang,
                       tokenizer=loaded.tokenizer, by="run")
    id_corpus, eval_corpus = split.run_stage(force=cfg.force)
    align_info = read_align_info(loaded.resolved_path)  # an aligned checkpoint says which languages it saw
    if align_info:
        run.update_manifest({"align": {k: align_info.get(k) for k in (
            "trained_langs", "pivot", "requested_langs", "base_model", "base_fingerprint", "step", "method")}})

    rec_cfg = RecordConfig(scope=cfg.scope, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                           max_tokens_per_lang=cfg.max_tokens_per_lang, act_path=cfg.mlp_act_path,
                           separator=cfg.separator, chat=cfg.chat).validate()
    echo("[record] ...")
    stats = timer.run("record", lambda: record(loaded.model, loaded.tokenizer, id_corpus, run.path, rec_cfg,
                                               model_id=loaded.source, model_fingerprint=loaded.fingerprint,
                                               force=cfg.force, progress=cfg.progress, redo_stale=True, by="run"),
                      echo)
    echo(f"[record] done in {timer.times['record']:.1f} s")

    nmap = _identify_and_anatomy(cfg, run, stats, timer, echo)
    if cfg.lens_docs:
        from .lens import LensConfig
        from .stages import LensStage, lens_texts

        lens_cfg = LensConfig(batch_size=cfg.batch_size, max_length=cfg.lens_max_length, max_docs=cfg.lens_docs,
                              english=cfg.pivot)
        stage = LensStage(run, loaded, lens_texts(eval_corpus.by_lang, cfg.lens_docs), lens_cfg, by="run")
        timer.run("lens", lambda: stage.run_stage(force=cfg.force, echo=echo), echo)

    if cfg.stability:
        from .confidence import run_stability

        timer.run("stability", lambda: run_stability(run.path, resamples=cfg.stability, progress=cfg.progress,
                                                          skip_if_fresh=not cfg.force), echo)

    if not cfg.skip_ablation:
        stage = AblationStage(run, cfg.ablation_config(), nmap=nmap, eval_corpus=eval_corpus.by_lang, by="run")
        timer.run("ablate", lambda: stage.run_stage(loaded, echo=echo), echo)

    return _report(cfg, run, timer, echo)


def _identify_and_anatomy(cfg: RunConfig, run: RunDir, stats: Any, timer: StageTimer,
                          echo: Callable[[str], None]) -> Any:
    from .stages import AnatomyStage, IdentifyStage

    nmap = timer.run("identify", lambda: IdentifyStage(run, cfg.identify_config(), stats, by="run").run_stage(
        force=cfg.force, echo=echo), echo)
    summary = nmap.summary()
    echo(f"selected {summary['selected']} neurons: {summary['totals']}; tau={nmap.meta.get('tau')}, "
         f"lambda={nmap.meta.get('lambda')}")
    timer.run("anatomy", lambda: AnatomyStage(run, cfg.pivot, by="run").run_stage(force=cfg.force, echo=echo), echo)
    return nmap


def _report(cfg: RunConfig, run: RunDir, timer: StageTimer, echo: Callable[[str], None]) -> Path:
    from .report import build_report

    echo("[report] ...")
    report = timer.run("report", lambda: build_report(run.path), echo)
    echo(f"[report] done in {timer.times['report']:.1f} s")
    run.update_manifest({"run": {"config": json.loads(json.dumps(
        {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}, default=str)),
        "stage_seconds": timer.times}})
    echo("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timer.times.items()))
    return Path(report)


#: the held-out questions (with their answers) that the ablation's accuracy family reads
EVAL_QUESTIONS = "eval_questions.jsonl"


def run_task_pipeline(cfg: RunConfig, echo: Callable[[str], None] = print) -> Path:
    """split questions -> generate -> record (response, from the generated ids) -> identify ->
    anatomy -> [lens] -> ablation (accuracy in the requested language + perplexity of the
    held-out questions) -> report; every stage skipped when it is current."""
    from .corpus import Corpus, Example
    from .generate import GenerateStage, group_questions, record_responses
    from .io import atomic_write_text
    from .record import RecordConfig
    from .stages import AblationStage, SplitStage
    from .tasks import read_task

    cfg.validate()
    run = RunDir(cfg.out)
    timer = StageTimer()
    gen_cfg = cfg.generate_config().validate()
    questions = group_questions(read_task(cfg.task, langs=cfg.langs), cfg.max_questions)  # type: ignore[arg-type]
    if len(questions) < 2:
        from .errors import CorpusError

        raise CorpusError(f"{cfg.task} has questions in {len(questions)} language(s); identification needs at least 2")
    loaded = timer.run("load model", lambda: cfg.model_config().validate().load(), echo)
    echo(f"model {loaded.source}: {type(loaded.model).__name__}, {loaded.dtype}")
    # the questions as texts, split like a corpus (same positions in every language: parallel ids)
    corpus = Corpus({lang: [Example(lang, text=q.question, id=q.id, source=q.source) for q in qs]
                     for lang, qs in questions.items()}, str(cfg.task))
    split = SplitStage(run, corpus, cfg.holdout, kind="task", max_eval_docs=cfg.max_eval_docs,
                       eval_langs=cfg.ablation_langs, eval_tokens_per_lang=cfg.eval_tokens_per_lang,
                       tokenizer=loaded.tokenizer, by="run")
    id_corpus, eval_corpus = split.run_stage(force=cfg.force)
    answered = {lang: [q for q in qs if q.id in {e.id for e in id_corpus.by_lang[lang]}]
                for lang, qs in questions.items()}
    rec_cfg = RecordConfig(scope="response", batch_size=cfg.batch_size, act_path=cfg.mlp_act_path).validate()
    stage = GenerateStage(run, loaded, answered, gen_cfg, record_config=rec_cfg, by="run")
    timer.run("generate", lambda: stage.run_stage(force=cfg.force, echo=echo), echo)
    echo("[record] ...")
    stats = timer.run("record", lambda: record_responses(run, loaded, list(answered), rec_cfg, counting=cfg.counting,
                                                         force=cfg.force, progress=cfg.progress, by="run"), echo)
    echo(f"[record] done in {timer.times['record']:.1f} s ({cfg.counting}: "
         f"{', '.join(f'{k} {int(n)}' for k, n in zip(stats.languages, stats.tokens.tolist()))} response tokens)")
    nmap = _identify_and_anatomy(cfg, run, stats, timer, echo)

    if cfg.lens_docs:
        from .lens import LensConfig
        from .stages import LensStage, lens_texts

        lens_cfg = LensConfig(batch_size=cfg.batch_size, max_length=cfg.lens_max_length, max_docs=cfg.lens_docs,
                              english=cfg.pivot)
        lens = LensStage(run, loaded, lens_texts(eval_corpus.by_lang, cfg.lens_docs), lens_cfg, by="run")
        timer.run("lens", lambda: lens.run_stage(force=cfg.force, echo=echo), echo)

    if not cfg.skip_ablation:
        held = {(e.lang, e.id) for exs in eval_corpus.by_lang.values() for e in exs}
        rows = [{"lang": q.lang, "id": q.id, "question": q.question, "answer": q.answer}
                for qs in questions.values() for q in qs if (q.lang, q.id) in held and q.answer is not None]
        path = run.path / EVAL_QUESTIONS
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        base = cfg.ablation_config().metrics
        metrics = tuple(dict.fromkeys((*base, "accuracy"))) if rows else base
        if not rows:
            echo("[ablate] the held-out questions have no numeric answers: perplexity only, no accuracy")
        abl = replace(cfg.ablation_config(), metrics=metrics, math_corpus=path if rows else None, scope="all",
                      prompt_template=stage.template).validate()
        ablation = AblationStage(run, abl, nmap=nmap, eval_corpus=eval_corpus.by_lang, by="run")
        timer.run("ablate", lambda: ablation.run_stage(loaded, echo=echo), echo)
    return _report(cfg, run, timer, echo)
