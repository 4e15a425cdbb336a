"""Multiple-choice accuracy (Belebele and tasks of its shape) as a metric of the ablation matrix.

Why a scorer here as well as `langneurons eval` (lm-evaluation-harness): the ablation matrix
evaluates every language under every neuron set, control seed and deactivated language, with the
masks, controls and row provenance of the perplexity matrix, so accuracy rows merge into
ablation.parquet and sit next to the perplexity rows in the report. lm-eval would re-load the
task and re-tokenise everything once per cell. The scoring is lm-eval's multiple-choice ``acc``,
and tests/test_choice.py checks it against lm-eval on the same questions:

* the prompt is Belebele's (`BELEBELE_TEMPLATE`): passage, question, the options lettered
  ``A: ...``, then ``Answer:``; the choices are the letters, each continued after one space;
* a choice's score is the summed log-probability of its continuation tokens, where context and
  continuation are split as lm-eval does for causal models (trailing spaces of the context move to
  the continuation; context+continuation is tokenised whole and cut after the context's tokens,
  so a merge across the boundary is not re-tokenised apart);
* the predicted choice is the first with the highest score; accuracy is the share right.

Intervals: each question is right or wrong with and without the intervention, on the same
questions, so a paired bootstrap over questions gives the interval of the change
(``bootstrap`` resamples). Accuracy over a few hundred questions moves in steps of 1/n: read a
change smaller than a few steps with its interval.

Readers (`read_choice_questions`): JSONL/JSON files (one file with a language field, or a
directory of ``<lang>.jsonl``), or ``hf:belebele`` / ``hf:REPO[:CONFIG][@SPLIT]`` through the
datasets library. Fields, first found wins:

==========  ==========================================================================
passage     flores_passage, passage, context (may be absent)
question    question
choices     choices / options (a list), else mc_answer1, mc_answer2, ... (Belebele)
answer      correct_answer_num (1-based, Belebele), answer / label (0-based index, a
            letter A-Z, or the text of a choice)
language    lang, language, dialect (any code form), else the file name (de.jsonl,
            deu_Latn.jsonl) or the requested language of a templated hf: config
id          id, question_number (with link), else the position
==========  ==========================================================================
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import CorpusError, LangNeuronsError

#: Belebele's zero-shot prompt (as in lm-eval's belebele tasks); {options} is "A: ...\nB: ..."
BELEBELE_TEMPLATE = "P: {passage}\nQ: {question}\n{options}\nAnswer:"
#: the same without a passage, for tasks that have none
NO_PASSAGE_TEMPLATE = "Q: {question}\n{options}\nAnswer:"
CHOICE_METRIC = "choice_accuracy"
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question; ``answer`` is the 0-based index of the right choice."""

    lang: str
    question: str
    choices: tuple[str, ...]
    answer: int
    passage: str = ""
    id: str = ""
    source: str = ""

    def prompt(self) -> str:
        options = "\n".join(f"{LETTERS[i]}: {c}" for i, c in enumerate(self.choices))
        template = BELEBELE_TEMPLATE if self.passage else NO_PASSAGE_TEMPLATE
        return template.format(passage=self.passage, question=self.question.strip(), options=options)

    @property
    def labels(self) -> list[str]:
        return list(LETTERS[:len(self.choices)])


# -- reading ---------------------------------------------------------------------------------------
_PASSAGE = ("flores_passage", "passage", "context")
_LANG = ("lang", "language", "dialect")


def _first(rec: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((rec[k] for k in keys if rec.get(k) not in (None, "")), None)


def question_from_record(rec: Any, lang: str | None, where: str) -> ChoiceQuestion:
    """One record (field mapping: module docstring) -> `ChoiceQuestion`, or a one-line error."""
    if not isinstance(rec, Mapping):
        raise CorpusError(f"{where}: expected a JSON object with question, choices and answer")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise CorpusError(f"{where}: no 'question' text")
    choices = _first(rec, ("choices", "options"))
    if choices is None:
        choices = [rec[f"mc_answer{i}"] for i in range(1, len(LETTERS) + 1) if f"mc_answer{i}" in rec]
    if isinstance(choices, Mapping) and "text" in choices:  # {"text": [...], "label": [...]} (ARC-style)
        choices = choices["text"]
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise CorpusError(f"{where}: needs at least two text choices ('choices' list or mc_answer1, mc_answer2, ...)")
    if len(choices) > len(LETTERS):
        raise CorpusError(f"{where}: {len(choices)} choices; at most {len(LETTERS)} can be lettered")
    answer = _answer_index(rec, list(choices), where)
    rec_lang = _first(rec, _LANG)
    use = lang if lang is not None else rec_lang
    if not isinstance(use, str) or not use.strip():
        raise CorpusError(f"{where}: no language (a 'lang' or 'dialect' field, or a file named <lang>.jsonl)")
    ident = rec.get("id")
    if ident is None and rec.get("question_number") is not None:
        ident = f"{rec.get('link', '')}#{rec['question_number']}"
    return ChoiceQuestion(use.strip(), question, tuple(choices), answer, str(_first(rec, _PASSAGE) or ""),
                          "" if ident is None else str(ident), where)


def _answer_index(rec: Mapping[str, Any], choices: list[str], where: str) -> int:
    n = len(choices)
    if rec.get("correct_answer_num") not in (None, ""):  # Belebele: "1".."4"
        raw = rec["correct_answer_num"]
        try:
            idx = int(str(raw).strip()) - 1
        except ValueError:
            raise CorpusError(f"{where}: correct_answer_num {raw!r} is not a number 1..{n}") from None
    else:
        raw = _first(rec, ("answer", "label"))
        if raw is None:
            raise CorpusError(f"{where}: no answer ('correct_answer_num' 1..{n}, or 'answer' as a 0-based index, "
                              "a letter or the text of a choice)")
        if isinstance(raw, bool):
            raise CorpusError(f"{where}: answer {raw!r} is not an index, a letter or a choice")
        if isinstance(raw, int):
            idx = raw
        elif isinstance(raw, str) and raw.strip() in choices:
            idx = choices.index(raw.strip())
        elif isinstance(raw, str) and raw.strip().isdigit():
            idx = int(raw.strip())
        elif isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().upper() in LETTERS:
            idx = LETTERS.index(raw.strip().upper())
        else:
            raise CorpusError(f"{where}: answer {raw!r} is not an index, a letter or the text of a choice")
    if not 0 <= idx < n:
        raise CorpusError(f"{where}: answer {raw!r} is outside the {n} choices")
    return idx


def _lang_of_file(path: Path) -> str | None:
    from .langcodes import parse_language
    from .tasks import lang_from_filename

    try:
        parse_language(path.stem)
        return path.stem
    except LangNeuronsError:
        return lang_from_filename(path)


def _read_file(path: Path) -> list[ChoiceQuestion]:
    from .tasks import read_utf8, split_lines

    file_lang = _lang_of_file(path)
    text = read_utf8(path)
    out: list[ChoiceQuestion] = []
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(split_lines(text), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{i}: invalid JSON ({exc.msg})") from None
                out.append(question_from_record(rec, None if _first(rec, _LANG) else file_lang, f"{path}:{i}"))
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("questions"))
        if not isinstance(data, list):
            raise CorpusError(f"{path}: expected a JSON list of questions (or {{\"data\": [...]}})")
        out = [question_from_record(rec, None if isinstance(rec, dict) and _first(rec, _LANG) else file_lang,
                                    f"{path}[{i}]") for i, rec in enumerate(data)]
    else:
        raise CorpusError(f"{path}: unknown question file type; use .jsonl or .json")
    return out


def _read_hf(spec: str, langs: Sequence[str] | None) -> list[ChoiceQuestion]:
    from .corpus import load_hf_split, parse_hf_spec
    from .langcodes import format_language

    hf = parse_hf_spec(spec)
    out: list[ChoiceQuestion] = []
    if hf.templated:
        if not langs:
            raise CorpusError(f"{spec}: a language template loads one dataset per language; give the languages "
                              "(--langs, or a neuron map's)")
        for lang in langs:
            config = format_language(hf.config, lang) if hf.config else None
            split = format_language(hf.split, lang) if hf.split else None
            where = f"hf:{hf.repo}:{config or ''}@{split or ''}"
            ds = load_hf_split(hf, config, split, where)
            out += [question_from_record(rec, lang, f"{where}[{i}]") for i, rec in enumerate(ds)]  # type: ignore
        return out
    where = f"hf:{hf.repo}:{hf.config or ''}@{hf.split or ''}"
    ds = load_hf_split(hf, hf.config, hf.split, where)
    return [question_from_record(rec, None, f"{where}[{i}]") for i, rec in enumerate(ds)]  # type: ignore


def read_choice_questions(source: str | Path, langs: Sequence[str] | None = None, *,
                          max_per_lang: int | None = None) -> dict[str, list[ChoiceQuestion]]:
    """Questions per language from a file, a directory or ``hf:...`` (module docstring).

    ``langs``: the languages wanted, in the codes the caller uses (a neuron map's ``de`` takes
    the records of ``deu_Latn``); each must have questions. Without it, every language found."""
    text = str(source)
    if text.startswith("hf:"):
        questions = _read_hf(text, langs)
    else:
        p = Path(text).expanduser()
        if not p.exists():
            raise CorpusError(f"multiple-choice questions {p} do not exist; give a .jsonl/.json file, a directory "
                              "of <lang>.jsonl files or hf:belebele")
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                                                and f.suffix.lower() in (".jsonl", ".json"))
        if not files:
            raise CorpusError(f"{p} holds no .jsonl or .json question files")
        questions = [q for f in files for q in _read_file(f)]
    by_lang: dict[str, list[ChoiceQuestion]] = {}
    for q in questions:
        by_lang.setdefault(q.lang, []).append(q)
    if not by_lang:
        raise CorpusError(f"{source}: no multiple-choice questions")
    return select_languages(by_lang, langs, source, max_per_lang=max_per_lang)


def select_languages(by_lang: Mapping[str, Sequence[ChoiceQuestion]], langs: Sequence[str] | None, source: Any,
                     *, max_per_lang: int | None = None) -> dict[str, list[ChoiceQuestion]]:
    """The questions of ``langs`` (all when None), relabelled with the requested codes (``de``
    takes the questions of ``deu_Latn``), the first ``max_per_lang`` of each."""
    from .langcodes import same_language

    chosen: dict[str, list[ChoiceQuestion]] = {}
    for want in langs or list(by_lang):
        have = want if want in by_lang else next((h for h in by_lang if same_language(h, want)), None)
        if have is None:
            raise CorpusError(f"{source}: no multiple-choice questions for {want} (it has "
                              f"{', '.join(by_lang) or 'none'})")
        chosen[want] = [ChoiceQuestion(want, q.question, q.choices, q.answer, q.passage, q.id, q.source)
                        for q in by_lang[have]][:max_per_lang or None]
    return chosen


def questions_fingerprint(by_lang: Mapping[str, Sequence[ChoiceQuestion]]) -> dict[str, str]:
    """Per language, a fingerprint of its questions (the rows' ``eval_sha256``)."""
    from .stage import input_key

    return {lang: input_key([[q.prompt(), list(q.choices), q.answer] for q in qs])[:16]
            for lang, qs in by_lang.items()}


# -- scoring ---------------------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split as lm-eval splits them for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer(context + continuation).input_ids)
    ctx = list(tokenizer(context).input_ids)
    return whole[:len(ctx)], whole[len(ctx):]


@dataclass
class _Plan:
    """How the choices of ``questions`` are scored. A question whose choices are single tokens
    after one shared context (Belebele's letters, nearly always) costs ONE forward of that context:
    the log-probabilities of its candidate tokens at the last position, the same numbers lm-eval
    gets from one sequence per choice. Any other question gets one scored document per choice."""

    questions: list[ChoiceQuestion]
    contexts: list[list[int]]  # the shared-context questions: context ids ...
    candidates: list[list[int]]  # ... and the one token of each choice
    docs: list[Any]  # evaluate.ScoredDoc per choice of the other questions
    where: list[tuple[bool, int]]  # per question: (shared, index into contexts | first of its docs)


def _plan(tokenizer: Any, questions: Sequence[ChoiceQuestion], limit: int) -> _Plan:
    """A context too long for the model loses its start (as in lm-eval)."""
    from .evaluate import ScoredDoc

    plan = _Plan(list(questions), [], [], [], [])
    for q in questions:
        pairs = [encode_pair(tokenizer, q.prompt(), " " + label) for label in q.labels]
        empty = [label for label, (_, cont) in zip(q.labels, pairs) if not cont]
        if empty:
            raise LangNeuronsError(f"{q.source}: choice {empty[0]!r} tokenizes to nothing after its context")
        if all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs) and pairs[0][0]:
            plan.where.append((True, len(plan.contexts)))
            plan.contexts.append(pairs[0][0][-limit:])
            plan.candidates.append([cont[0] for _, cont in pairs])
            continue
        plan.where.append((False, len(plan.docs)))
        for ctx, cont in pairs:
            ids = (ctx + cont)[-limit:]
            n_ctx = len(ids) - len(cont)
            if n_ctx < 1:
                raise LangNeuronsError(f"{q.source}: the choice alone is longer than the model's context")
            plan.docs.append(ScoredDoc(ids, [False] * n_ctx + [True] * len(cont), 0))
    return plan


@torch.inference_mode()
def _next_token_logprobs(model: nn.Module, contexts: Sequence[list[int]], candidates: Sequence[list[int]], *,
                         pad: int, batch_size: int) -> list[list[float]]:
    """log p(candidate | context) for every context: left padded with position ids from the
    attention mask (as `lm.generate` decodes), so every context ends in the last column and only
    that column needs logits (``logits_to_keep=1``: the head over the whole vocabulary is most of a
    small model's forward)."""
    import inspect

    from .lm import input_device

    device = input_device(model)
    params = inspect.signature(model.forward).parameters
    out: list[list[float]] = [[] for _ in contexts]
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        width = max(len(contexts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(contexts[i]):] = torch.tensor(contexts[i])
            att[r, width - len(contexts[i]):] = 1
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device), "use_cache": False}
        if "position_ids" in params:
            kwargs["position_ids"] = (att.cumsum(-1) - 1).clamp(min=0).to(device)
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        logp = torch.log_softmax(model(**kwargs).logits[:, -1].float(), -1).cpu()
        for r, i in enumerate(idx):
            out[i] = logp[r, candidates[i]].double().tolist()
    return out


def _score_plan(model: nn.Module, plan: _Plan, *, pad: int, batch_size: int) -> ChoiceScores:
    from .evaluate import score_docs

    shared = _next_token_logprobs(model, plan.contexts, plan.candidates, pad=pad, batch_size=batch_size) \
        if plan.contexts else []
    doc_nll = score_docs(model, plan.docs, pad_id=pad, batch_size=batch_size, scope="all").doc_nll \
        if plan.docs else []
    scores = ChoiceScores([], [], [])
    for q, (is_shared, at) in zip(plan.questions, plan.where):
        ll = shared[at] if is_shared else [-float(x) for x in doc_nll[at:at + len(q.choices)]]
        best = max(range(len(ll)), key=lambda i: (ll[i], -i))  # the first of equal scores
        scores.loglik.append(ll)
        scores.predicted.append(best)
        scores.correct.append(best == q.answer)
    return scores


@dataclass
class ChoiceScores:
    """Per question: the log-likelihood of every choice and whether the best one is right."""

    loglik: list[list[float]]
    predicted: list[int]
    correct: list[bool]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(len(self.correct), 1)

    def part(self, a: int, b: int) -> "ChoiceScores":
        return ChoiceScores(self.loglik[a:b], self.predicted[a:b], self.correct[a:b])


def score_choices(model: nn.Module, tokenizer: Any, questions: Sequence[ChoiceQuestion], *, batch_size: int = 8,
                  max_length: int | None = None) -> ChoiceScores:
    """Log-likelihood of every choice and the accuracy of ``questions`` (no intervention: wrap the
    call in `intervene.deactivate` for one)."""
    from .evaluate import model_max_length
    from .lm import pad_id

    plan = _plan(tokenizer, questions, model_max_length(model, max_length))
    return _score_plan(model.eval(), plan, pad=pad_id(tokenizer), batch_size=batch_size)


def paired_interval(base: Sequence[bool], ablated: Sequence[bool], resamples: int, seed: int = 0
                    ) -> tuple[float, float]:
    """95% percentile interval of mean(ablated) - mean(base), resampling questions in pairs."""
    if resamples <= 0 or not base:
        return float("nan"), float("nan")
    diff = torch.tensor([float(a) - float(b) for a, b in zip(ablated, base)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (resamples, len(diff)), generator=gen)
    means = diff[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def choice_accuracy_matrix(model: nn.Module, tokenizer: Any, nmap: Any,
                           questions: Mapping[str, Sequence[ChoiceQuestion]], *, neuron_sets: Sequence[str],
                           control: str | None = "matched", control_seeds: Sequence[int] = (0, 1, 2),
                           batch_size: int = 8, progress: bool = True, langs: Sequence[str] | None = None,
                           act_path: str | None = None, stats: dict[str, Any] | None = None,
                           activity: torch.Tensor | None = None, control_bins: int = 20, bootstrap: int = 0,
                           max_length: int | None = None, predictions: list[dict] | None = None) -> Any:
    """Multiple-choice accuracy of every language j with language k's neurons (or experts) of a
    set zeroed at all positions: rows of metric ``choice_accuracy`` like `evaluate.ablation_matrix`'s
    (base, ablated, delta, n_neurons, the control rows ``random:<set>`` per seed; ``n_tokens`` and
    ``n_docs`` hold the number of questions; ``ci_low``/``ci_high`` a paired bootstrap over
    questions when ``bootstrap`` > 0). All languages are scored in one pooled pass per mask.
    ``predictions`` (a list) receives one dict per (mask, question): the chosen letter and
    whether it is right."""
    from .arch import locate_activations
    from .evaluate import ablation_frame, check_control, distinct_masks, model_max_length, plan_jobs, score_each_mask
    from .lm import pad_id

    sites = locate_activations(model, act_path)
    nmap.check_fits(sites.num_layers, sites.num_neurons)
    control = check_control(control, activity, (sites.num_layers, sites.num_neurons))
    langs = list(langs) if langs else list(nmap.languages)
    if not questions or not all(questions.values()):
        raise CorpusError("the multiple-choice questions are empty for " +
                          (", ".join(k for k, v in questions.items() if not v) or "every language"))
    model = model.eval()
    spans: dict[str, tuple[int, int]] = {}
    at = 0
    for j, qs in questions.items():  # all languages pooled into one plan: full batches
        spans[j] = (at, at + len(qs))
        at += len(qs)
    plan = _plan(tokenizer, [q for qs in questions.values() for q in qs], model_max_length(model, max_length))
    match_info: list[dict] = []
    jobs = plan_jobs(nmap, langs, neuron_sets, control, control_seeds, activity, control_bins, match_info)
    unique = distinct_masks(jobs)

    def score_all() -> dict[str, ChoiceScores]:
        res = _score_plan(model, plan, pad=pad_id(tokenizer), batch_size=batch_size)
        return {j: res.part(a, b) for j, (a, b) in spans.items()}

    t0 = time.perf_counter()
    results: dict[bytes | None, dict[str, ChoiceScores]] = score_each_mask(
        model, unique, score_all, sites=sites, desc="choice accuracy", progress=progress)

    rows = []
    for job in jobs:
        n_neurons = int(job.mask.sum())
        key = job.key if n_neurons else None
        for j in questions:
            base, abl = results[None][j], results[key][j]
            lo, hi = paired_interval(base.correct, abl.correct, bootstrap if n_neurons else 0)
            rows.append({"deactivated_lang": job.lang, "eval_lang": j, "neuron_set": job.neuron_set,
                         "metric": CHOICE_METRIC, "base": base.accuracy, "ablated": abl.accuracy,
                         "delta": abl.accuracy - base.accuracy, "n_tokens": len(base.correct), "seed": job.seed,
                         "n_neurons": n_neurons, "ci_low": lo, "ci_high": hi, "n_docs": len(base.correct),
                         "n_resamples": int(bootstrap) if n_neurons else 0, "control": job.control})
    if predictions is not None:
        def add(scores: ChoiceScores, j: str, job: Any) -> None:
            for q, p, ok in zip(questions[j], scores.predicted, scores.correct):
                predictions.append({"neuron_set": "none" if job is None else job.neuron_set,
                                    "deactivated_lang": None if job is None else job.lang,
                                    "seed": None if job is None else job.seed, "eval_lang": j, "id": q.id,
                                    "predicted": LETTERS[p], "answer": LETTERS[q.answer], "correct": ok})
        for j in questions:
            add(results[None][j], j, None)
        for job in jobs:
            if job.mask.any():
                for j in questions:
                    add(results[job.key][j], j, job)
    if stats is not None:
        stats.update(passes=1 + len(unique), reused=len(jobs) - len(unique),
                     seconds=round(time.perf_counter() - t0, 3), control=control or "none",
                     questions={j: len(v) for j, v in questions.items()})
        if control == "matched":
            stats["control_match"] = match_info
    return ablation_frame(rows)
