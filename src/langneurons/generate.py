"""The model answers a task's questions in every language; the answers' tokens are then counted.

This is the published experiment (arXiv:2505.21505): activation probabilities are measured on
the model's OWN answers to math questions (MGSM / MSVAMP), on the response tokens only. The
authors generate, then run every text twice (prompt + response, and prompt alone) and subtract
the counts. Here:

* `GenerateStage` -- every question of every language is answered with `lm.generate` (batched,
  KV cache, greedy by default, stop on EOS / end-of-turn). The user message is the question
  (``{question}``) for a model with a chat template, which renders it; a model without one reads
  `PLAIN_TEMPLATE`. Each language's answers go to ``responses/<lang>.jsonl`` (rendered prompt,
  its token ids, the response text AND its token ids, number of tokens, why it stopped), written
  atomically; a language whose inputs (model, decoding settings, template, questions) are
  unchanged is skipped, so an interrupted stage resumes per language.
* `record_responses` -- the record stage on those answers, from the generated token ids (no
  re-tokenisation): the model reads ``prompt_ids + token_ids`` in ONE pass and exactly the
  generated tokens are counted ("pass"), or the counts made while generating are taken
  ("during": `record.GenerationCounter`, no extra model work). docs/generate.md has the
  measured agreement of the two.

Everything the stage decided is in its manifest record (model fingerprint, decoding settings,
template, per-language tokens and stop reasons).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import require
from .errors import CorpusError, LangNeuronsError
from .lm import GenerateConfig
from .runs import RunDir
from .stage import commit_stage, input_key

__all__ = ["PLAIN_TEMPLATE", "CHAT_TEMPLATE", "COUNTING", "GenerateStageConfig", "Response", "GenerateStage",
           "read_responses", "responses_dir", "group_questions", "record_responses"]

#: the user message of a model without a chat template: a plain question/answer frame that a
#: base model continues with an answer (the question stays in its own language)
PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
#: the user message of a chat model: the question alone (the chat template frames it)
CHAT_TEMPLATE = "{question}"
#: how the response tokens are counted: a separate pass over the generated ids, or while generating
COUNTING = ("pass", "during")
RESPONSES_DIR = "responses"

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class GenerateStageConfig:
    """What `GenerateStage` does: which task, which questions, how to decode and prompt."""

    task: Path | None = None  # the task file or directory (provenance; the questions are given to the stage)
    langs: list[str] | None = None
    max_questions: int | None = None  # per language: the first N questions
    decoding: GenerateConfig = field(default_factory=lambda: GenerateConfig(max_new_tokens=256, chat=None))
    template: str | None = None  # user message with {question}; None: CHAT_TEMPLATE or PLAIN_TEMPLATE
    counting: str = "pass"  # "during": count the response tokens while generating them
    progress: bool = True

    def validate(self) -> "GenerateStageConfig":
        self.decoding.validate()
        require(self.decoding.num_return_sequences == 1, "the generate stage keeps one answer per question "
                "(num_return_sequences must be 1)")
        require(self.max_questions is None or self.max_questions >= 1,
                f"--max-questions must be >= 1, got {self.max_questions}")
        require(self.counting in COUNTING, f"--counting must be one of {', '.join(COUNTING)}, got {self.counting!r}")
        require(self.langs is None or len(self.langs) >= 1, "--langs names no language")
        if self.template is not None:
            check_template(self.template)
        return self

    def user_template(self, chat: bool) -> str:
        return self.template if self.template is not None else (CHAT_TEMPLATE if chat else PLAIN_TEMPLATE)


def check_template(template: str) -> str:
    """A user-message template must hold ``{question}`` and no other field."""
    try:
        filled = template.format(question="\0")
    except (KeyError, IndexError, ValueError) as exc:
        raise LangNeuronsError(f"--template {template!r} must contain {{question}} and no other field "
                               f"({type(exc).__name__}: {exc}); write literal braces as {{{{ }}}}") from None
    require("\0" in filled, f"--template {template!r} must contain {{question}}")
    return template


@dataclass(frozen=True)
class Response:
    """One answer, as written to responses/<lang>.jsonl."""

    id: str
    lang: str
    question: str
    answer: str | None  # the reference (a canonical number, or text), for accuracy
    prompt: str  # as the model read it (chat template applied)
    prompt_ids: list[int]
    response: str  # decoded new tokens (special tokens skipped)
    token_ids: list[int]  # the generated tokens, without the stop token
    stop: str  # "eos" | "length"
    stop_token_id: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "lang": self.lang, "question": self.question, "answer": self.answer,
                "prompt": self.prompt, "prompt_ids": self.prompt_ids, "response": self.response,
                "token_ids": self.token_ids, "num_tokens": self.num_tokens, "stop": self.stop,
                "stop_token_id": self.stop_token_id}


def responses_dir(run: RunDir) -> Path:
    return run.path / RESPONSES_DIR


def responses_path(run: RunDir, lang: str) -> Path:
    from .corpus import check_language_name

    return responses_dir(run) / f"{check_language_name(lang, 'responses')}.jsonl"


def counts_path(run: RunDir, lang: str) -> Path:
    return responses_dir(run) / f"{lang}.counts.safetensors"


def _ids(value: Any, where: str, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise CorpusError(f"{where}: {name!r} must be a list of token ids (non-negative integers)")
    return value


def read_responses(run: RunDir | str | Path, lang: str) -> list[Response]:
    """One language's answers (one clear line for a missing or damaged file)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    path = responses_path(run, lang)
    if not path.is_file():
        raise CorpusError(f"{path} does not exist; run `langneurons generate {run.path} --task PATH` first")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: invalid JSON ({exc.msg}); generate this language again") from None
        if not isinstance(rec, dict) or rec.get("lang") != lang or not isinstance(rec.get("response"), str) \
                or rec.get("stop") not in ("eos", "length"):
            raise CorpusError(f"{where}: not a response record of {lang} (lang, response, stop ...); "
                              "generate this language again")
        out.append(Response(id=str(rec.get("id")), lang=lang, question=str(rec.get("question", "")),
                            answer=rec.get("answer"), prompt=str(rec.get("prompt", "")),
                            prompt_ids=_ids(rec.get("prompt_ids"), where, "prompt_ids"), response=rec["response"],
                            token_ids=_ids(rec.get("token_ids"), where, "token_ids"), stop=rec["stop"],
                            stop_token_id=rec.get("stop_token_id")))
    return out


def group_questions(examples: Sequence[Any], max_questions: int | None = None) -> dict[str, list[Any]]:
    """`tasks.TaskExample` rows by language (file order), the first ``max_questions`` of each."""
    by_lang: dict[str, list[Any]] = {}
    for ex in examples:
        by_lang.setdefault(ex.lang, []).append(ex)
    if max_questions:
        by_lang = {k: v[:max_questions] for k, v in by_lang.items()}
    return by_lang


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
class GenerateStage:
    """responses/<lang>.jsonl for every language (per-language freshness, like recording).

    The manifest's ``generate`` record holds, per language, the key of its inputs (model
    fingerprint, dtype, decoding settings, rendered template, questions, counting mode); it is
    rewritten after every language, so an interrupted stage keeps the finished languages. A
    language is skipped when its key is unchanged and its files still have their checksums."""

    name = "generate"

    def __init__(self, run: RunDir | str | Path, loaded: Any, questions: Mapping[str, Sequence[Any]],
                 config: GenerateStageConfig, *, record_config: Any = None, by: str = "generate"):
        from .lm import use_chat

        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.loaded, self.config, self.by = loaded, config.validate(), by
        self.questions = {k: list(v) for k, v in questions.items()}
        if config.langs:
            missing = [x for x in config.langs if x not in self.questions]
            if missing:
                raise CorpusError(f"the task has no questions for {', '.join(missing)} "
                                  f"(it has {', '.join(self.questions) or 'none'})")
            self.questions = {x: self.questions[x] for x in config.langs}
        if config.max_questions:
            self.questions = {k: v[:config.max_questions] for k, v in self.questions.items()}
        empty = [k for k, v in self.questions.items() if not v]
        if not self.questions or empty:
            raise CorpusError(f"no questions to answer{' for ' + ', '.join(empty) if empty else ''}")
        from .corpus import check_language_name

        for lang in self.questions:
            check_language_name(lang, "the task")
        self.chat = use_chat(loaded.tokenizer, config.decoding.chat)
        self.template = config.user_template(self.chat)
        self.record_config = record_config  # the counter's settings ("during")

    # -- inputs -----------------------------------------------------------------------------------
    def template_info(self) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        chat_template = getattr(tok, "chat_template", None) if self.chat else None
        return {"chat": self.chat, "user_template": self.template,
                "chat_template_sha256": hashlib.sha256(str(chat_template).encode()).hexdigest()[:16]
                if chat_template else None,
                "example": self.render("{question}")}

    def render(self, question: str) -> str:
        from .lm import render_prompt

        return render_prompt(self.loaded.tokenizer, self.template.format(question=question), self.chat)[0]

    def decoding(self) -> dict[str, Any]:
        d = asdict(self.config.decoding)
        d.pop("batch_size")  # decides speed, not the answers (batched greedy = one at a time, tested)
        d["chat"] = self.chat
        return d

    def lang_key(self, lang: str) -> str:
        during = self.config.counting == "during"
        buckets = getattr(self.record_config, "buckets", None) if during else None
        keep_sums = getattr(self.record_config, "keep_sums", None) if during else None
        # counts made while decoding depend on the batch's composition (left padding, float
        # rounding: docs/generate.md), the answers do not: the batch size is an input only then
        batch = self.config.decoding.batch_size if during else None
        return input_key({"model_fingerprint": getattr(self.loaded, "fingerprint", None),
                          "dtype": getattr(self.loaded, "dtype", None), "decoding": self.decoding(),
                          "template": self.template_info(), "counting": self.config.counting,
                          "counts": [buckets, keep_sums, batch],
                          "questions": [[q.id, q.question, q.reference] for q in self.questions[lang]]})

    def outputs(self, lang: str) -> list[Path]:
        paths = [responses_path(self.run, lang)]
        if self.config.counting == "during":
            paths.append(counts_path(self.run, lang))
        return paths

    def done(self, lang: str) -> bool:
        rec = self.run.stage_record(self.name)
        if rec is None or (rec.inputs.get("languages") or {}).get(lang) != self.lang_key(lang):
            return False
        from .io import sha256_file

        for path in self.outputs(lang):
            want = rec.outputs.get(self.run.relative(path)) if path.exists() else None
            if want is None or sha256_file(path) != want:
                return False
        return True

    # -- run ----------------------------------------------------------------------------------------
    def run_stage(self, *, force: bool = False, echo: Echo = _quiet) -> dict[str, list[Response]]:
        """Answer every language that is not current; returns every language's answers."""
        out: dict[str, list[Response]] = {}
        for lang in self.questions:
            if not force and self.done(lang):
                echo(f"[generate] {lang}: up to date, skipped")
                out[lang] = read_responses(self.run, lang)
                continue
            t0 = time.perf_counter()
            responses, counts, info = self.answer(lang)
            self.write(lang, responses, counts)
            info["seconds"] = round(time.perf_counter() - t0, 3)
            self.commit(lang, info)
            echo(f"[generate] {lang}: {len(responses)} answers, {info['tokens']} tokens "
                 f"({info['tokens_per_second']:,.1f} tok/s), stopped: {info['stops']}")
            out[lang] = responses
        return out

    def answer(self, lang: str) -> tuple[list[Response], Any, dict[str, Any]]:
        """Generate one language's answers (and count them with ``counting="during"``)."""
        from .lm import decode_new
        from .lm import generate as lm_generate

        questions = self.questions[lang]
        tok, model = self.loaded.tokenizer, self.loaded.model
        dec = self.config.decoding
        during = self.config.counting == "during"
        counter = None
        if during:
            from .record import GenerationCounter, RecordConfig

            counter = GenerationCounter(model, self.record_config or RecordConfig(scope="response"))
        progress = _GenerationProgress(len(questions), lang, self.config.progress)
        messages = [self.template.format(question=q.question) for q in questions]

        def on_batch(rows: list[int]) -> None:
            progress.on_batch(rows)
            if counter is not None:
                counter.on_batch(rows)

        def on_step(step: int, ids: Any, finished: Any) -> None:
            progress.on_step(step, ids, finished)
            if counter is not None:
                counter.on_step(step, ids, finished)

        # counting during generation: one token more than kept, so that the pass choosing it
        # feeds (and counts) the last kept token of an answer cut by the length limit
        limit = dec.max_new_tokens
        t0 = time.perf_counter()
        try:
            if counter is not None:
                with counter.hooks():
                    gens = lm_generate(model, tok, messages, dec, on_batch=on_batch, on_step=on_step,
                                       max_new_tokens=limit + 1, chat=self.chat)
            else:
                gens = lm_generate(model, tok, messages, dec, on_batch=on_batch, on_step=on_step, chat=self.chat)
        finally:
            progress.close()
        seconds = time.perf_counter() - t0
        responses = []
        for i, (q, g) in enumerate(zip(questions, gens)):
            tokens, stop, stop_id, text = list(g.token_ids), g.stop, g.stop_token_id, g.text
            if len(tokens) > limit or (stop == "eos" and len(tokens) == limit):
                # the extra step chose a token (or the stop token) after the kept ones: as a run
                # with the limit, this answer ended by length
                tokens, stop, stop_id = tokens[:limit], "length", None
                text = decode_new(tok, g.prompt_ids, tokens)
            responses.append(Response(id=q.id, lang=lang, question=q.question, answer=q.reference, prompt=g.prompt,
                                      prompt_ids=list(g.prompt_ids), response=text, token_ids=tokens, stop=stop,
                                      stop_token_id=stop_id))
        counts = None
        if counter is not None:
            got = [counter.row_tokens.get(i, 0) for i in range(len(responses))]
            want = [r.num_tokens for r in responses]
            if got != want:  # the one check that the hooks saw exactly the kept tokens
                bad = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                raise LangNeuronsError(f"{lang}: counting during generation saw {got[bad]} tokens of answer {bad}, "
                                       f"which has {want[bad]}; use --counting pass")
            counts = counter.stats(lang)
        n_tok = sum(r.num_tokens for r in responses)
        stops = {s: sum(1 for r in responses if r.stop == s) for s in ("eos", "length")}
        info = {"questions": len(responses), "tokens": n_tok, "stops": stops,
                "empty": sum(1 for r in responses if not r.token_ids),
                "tokens_per_second": round(n_tok / max(seconds, 1e-9), 1)}
        return responses, counts, info

    def write(self, lang: str, responses: list[Response], counts: Any) -> None:
        from .io import atomic_write_text

        path = responses_path(self.run, lang)
        path.parent.mkdir(parents=True, exist_ok=True)
        if counts is not None:
            counts.meta = {"model_fingerprint": getattr(self.loaded, "fingerprint", None),
                           "dtype": getattr(self.loaded, "dtype", None), "key": self.lang_key(lang),
                           "counting": "during generation"}
            counts.save(counts_path(self.run, lang))
        else:
            counts_path(self.run, lang).unlink(missing_ok=True)
        atomic_write_text(path, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in responses))

    def commit(self, lang: str, info: dict[str, Any]) -> None:
        """Rewrite the stage record with this language added (kept: the other languages of the
        plan that are still current)."""
        rec = self.run.stage_record(self.name)
        old_langs = dict((rec.inputs.get("languages") or {}) if rec else {})
        old_info = dict((rec.result.get("languages") or {}) if rec else {})
        keys, outputs, infos = {}, [], {}
        for other in self.questions:
            if other == lang:
                continue
            if other in old_langs and self.done(other):  # current, and its files still have their checksums
                keys[other] = old_langs[other]
                outputs.extend(self.outputs(other))
                infos[other] = old_info.get(other, {})
        keys[lang] = self.lang_key(lang)
        outputs.extend(self.outputs(lang))
        infos[lang] = info
        section = {"task": None if self.config.task is None else str(self.config.task),
                   "model": getattr(self.loaded, "source", None),
                   "model_fingerprint": getattr(self.loaded, "fingerprint", None),
                   "dtype": getattr(self.loaded, "dtype", None), "decoding": self.decoding(),
                   "batch_size": self.config.decoding.batch_size, "template": self.template_info(),
                   "counting": self.config.counting, "languages": infos, "dir": RESPONSES_DIR}
        commit_stage(self.run, self.name, {"languages": keys}, outputs, section,
                     sum(float(i.get("seconds", 0)) for i in infos.values()), by=self.by)


class _GenerationProgress:
    """A bar over questions with the generation speed (tokens/s) as its postfix."""

    def __init__(self, total: int, lang: str, enabled: bool):
        from tqdm.auto import tqdm

        interactive = getattr(sys.stderr, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=f"generate {lang}", unit="q", disable=not enabled, leave=False,
                        dynamic_ncols=True, file=sys.stderr, mininterval=0.1 if interactive else 30.0)
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.batch = 0
        self.done = 0

    def on_batch(self, rows: list[int]) -> None:
        self.bar.update(self.batch - self.done)  # rows of the last batch that ended by length
        self.batch, self.done = len(rows), 0
        self.live = len(rows)

    def on_step(self, step: int, ids: Any, finished: Any) -> None:
        self.tokens += self.live  # every row live before this step chose a token
        n_done = int(finished.sum())
        self.bar.update(n_done - self.done)
        self.done = n_done
        self.live = len(finished) - n_done
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):,.0f} tok/s",
                                 refresh=False)

    def close(self) -> None:
        self.bar.update(self.batch - self.done)
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# recording the answers
# ---------------------------------------------------------------------------------------------
def responses_corpus(run: RunDir | str | Path, langs: Sequence[str]) -> Any:
    """The answers as a `record.ResponseCorpus` of `record.TokenExample` (ids as generated)."""
    from .record import ResponseCorpus, TokenExample

    run = run if isinstance(run, RunDir) else RunDir(run)
    by_lang = {}
    for lang in langs:
        path = responses_path(run, lang)
        by_lang[lang] = [TokenExample(lang, prompt=r.prompt, response=r.response, id=r.id, source=f"{path}:{i}",
                                      prompt_ids=tuple(r.prompt_ids), token_ids=tuple(r.token_ids))
                         for i, r in enumerate(read_responses(run, lang), 1)]
    return ResponseCorpus(by_lang, str(responses_dir(run)))


def record_responses(run: RunDir | str | Path, loaded: Any, langs: Sequence[str], config: Any = None, *,
                     counting: str = "pass", force: bool = False, progress: bool = True, by: str = "record") -> Any:
    """The record stage on the generated answers (response scope, from their token ids).

    counting="pass": one forward pass over ``prompt_ids + token_ids`` per answer, counting
    exactly the generated tokens; "during": the counts `GenerateStage` made while generating
    (responses/<lang>.counts.safetensors; they must have been made by this model)."""
    from .record import RecordConfig, record
    from .stats import LanguageStats

    run = run if isinstance(run, RunDir) else RunDir(run)
    require(counting in COUNTING, f"--counting must be one of {', '.join(COUNTING)}, got {counting!r}")
    cfg = config or RecordConfig(scope="response")
    require(cfg.scope == "response", "answers are recorded in the response scope")
    corpus = responses_corpus(run, langs)
    counted = None
    if counting == "during":
        counted = {}
        for lang in langs:
            path = counts_path(run, lang)
            if not path.is_file():
                raise LangNeuronsError(f"{path} does not exist: the answers were generated without counting; "
                                       "generate them with --counting during, or record with --counting pass")
            stats = LanguageStats.load(path)
            fp = stats.meta.get("model_fingerprint")
            if fp and getattr(loaded, "fingerprint", None) and fp != loaded.fingerprint:
                raise LangNeuronsError(f"{path} was counted with another model ({fp}); generate again")
            want = sum(len(e.token_ids) for e in corpus.by_lang[lang])
            if stats.tokens != want:
                raise LangNeuronsError(f"{path} counts {stats.tokens} tokens but the answers have {want}; "
                                       "generate this language again")
            counted[lang] = stats
    return record(loaded.model, loaded.tokenizer, corpus, run.path, cfg, model_id=getattr(loaded, "source", ""),
                  model_fingerprint=getattr(loaded, "fingerprint", None), force=force, progress=progress,
                  redo_stale=True, by=by, counted=counted)
