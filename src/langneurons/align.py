"""Multilingual alignment as preference optimisation (MAPO-style), so users can make the aligned
checkpoints that `langneurons run` / `compare` study.

MAPO (She et al., "MAPO: Advancing Multilingual Reasoning through Multilingual Alignment-as-
Preference Optimization", arXiv:2401.06838) rewards answers in a non-pivot language for agreeing
with the model's own answer in the pivot language (English), and trains on the resulting
preference pairs with DPO.  Four steps, each a public function and each resumable:

1. `sample_answers`: for every question id, ONE greedy answer to the pivot-language question and
   ``n_samples`` sampled answers to the same question in each target language (batched, left
   padding, seeded);
2. `score_samples`: each target answer gets a consistency score with the pivot answer from a
   `Scorer` -- `SelfTranslationScorer` (default: the LM itself, prompted to translate; score =
   mean log P(pivot answer | "Translate to English: <answer>\\nEnglish:")) or
   `Seq2SeqTranslationScorer` (a local NLLB / M2M-100 / Marian / mBART checkpoint; score = mean
   log P(pivot answer | target answer)).  Both use forced decoding of the pivot answer's tokens,
   which are the same for every candidate of one question, so scores of candidates compare
   directly;
3. `build_pairs`: per (question, language) the highest-scored answer is "chosen", the lowest
   "rejected", kept only when the margin is > 0 and >= ``min_margin``;
4. `train_dpo`: TRL's `DPOTrainer` with a PEFT LoRA adapter (paper defaults: r=64, alpha=128,
   dropout 0.05, lr 1e-6, beta 0.1); checkpoints every ``save_every`` steps, then the adapter is
   merged into the weights (``merge_and_unload``) and saved as a plain model directory that
   `load_model` / ``langneurons run --model`` read like any other.

`align` runs the four steps into one output directory::

    OUT/manifest.json        model, config, questions (+ sha256), counts, versions, per-step keys,
                             align: {trained_langs, pivot, ...}
    OUT/samples.jsonl        every generated answer (pivot answers have kind "pivot")
    OUT/scores.jsonl         score of each target-language answer
    OUT/pairs.jsonl          chosen / rejected pairs
    OUT/train_log.jsonl      the trainer's log (loss, rewards/margins, ... per step)
    OUT/trainer/checkpoint-N LoRA adapter + optimizer state (what resuming uses)
    OUT/checkpoints/step-N/  merged full model at step N (loads with `load_model`)
    OUT/merged/              the final merged model; ``langneurons_align.json`` inside names the
                             trained languages so a run of this model can record them

A step is skipped when its output exists and was made from the same inputs (a key of every
setting that affects it, kept in the manifest, plus the output's sha256); otherwise it is
recomputed and every later step with it.  ``trl`` and ``peft`` are only imported by `train_dpo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from .errors import CorpusError, LangNeuronsError
from .lm import GenerateConfig, generate, input_device, render_prompt, use_chat
from .corpus import split_lines
from .io import atomic_write_json, atomic_write_text, sha256_file, sha256_text
from .runs import RunDir
from .tasks import LANGUAGE_NAMES, read_task

if TYPE_CHECKING:  # torch / transformers cost seconds to import; only the model steps need them
    import torch
    from torch import nn

    from .models import LoadedModel

__all__ = [
    "ALIGN_INFO_FILE",
    "AlignConfig",
    "AlignError",
    "AlignResult",
    "Pair",
    "Question",
    "Sample",
    "ScoreItem",
    "Scorer",
    "SelfTranslationScorer",
    "Seq2SeqTranslationScorer",
    "TrainResult",
    "align",
    "build_pairs",
    "check_scorer",
    "default_questions_path",
    "language_name",
    "lora_target_modules",
    "make_scorer",
    "merge_lora_checkpoint",
    "read_align_info",
    "read_questions",
    "register_scorer",
    "sample_answers",
    "score_samples",
    "scorer_names",
    "select_questions",
    "train_dpo",
]

logger = logging.getLogger(__name__)

ALIGN_INFO_FILE = "langneurons_align.json"
"""Written into every merged model directory: trained languages, pivot, base model, step."""



class AlignError(LangNeuronsError, ValueError):
    """Bad alignment input or settings; the message is one line saying what to do."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class AlignConfig:
    """Every setting of an alignment run (all recorded in OUT/manifest.json).

    Values from the MAPO paper (as the issue lists them): LoRA r=64, alpha=128, dropout 0.05,
    lr 1e-6, beta 0.1.  The others are ours: 4 samples per question, temperature 0.7, top-p 0.95,
    1 epoch, batch 4.  With LoRA, lr 1e-6 moves a small model very little: raise ``lr`` (e.g.
    1e-5..1e-4) for a visible effect in a short run, and say so when reporting.
    """

    pivot: str = "en"
    langs: list[str] | None = None  # None: every non-pivot language of the question set
    # 1. sampling
    n_samples: int = 4
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    gen_batch_size: int = 8  # prompts per generate() call (x n_samples sequences)
    max_questions: int | None = None  # first N question ids (in file order); None: all
    chat: bool | None = None  # use the tokenizer's chat template; None: when it has one
    prompt_template: str | None = None  # None: "{question}" with chat, "Q: {question}\nA:" without
    # 2. scoring
    scorer: str = "self"  # "self", a registered scorer name, or a local translation model dir
    score_batch_size: int = 8
    max_score_tokens: int = 512  # truncate each side of a scored pair to this many tokens
    # 3. pairs
    min_margin: float = 0.0  # in mean log-prob per pivot token; pairs also need margin > 0
    # 4. training
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: attention + MLP projections of the family
    lr: float = 1e-6
    beta: float = 0.1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024  # prompt + answer tokens per training sequence
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    save_every: int = 100  # checkpoint every N optimizer steps (and at the end)
    merge_checkpoints: bool = True  # also write OUT/checkpoints/step-N as full models
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on CUDA with bf16 support

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise AlignError(msg)

        need(bool(self.pivot), "the pivot language must be given (e.g. --pivot en)")
        if self.langs is not None:
            need(len(self.langs) > 0, "--langs is empty; give languages to align, e.g. --langs zh,de")
            need(self.pivot not in self.langs, f"--langs must not contain the pivot language {self.pivot!r}: "
                 "the pivot answers are the reference, not a training target")
            need(len(set(self.langs)) == len(self.langs), f"--langs lists a language twice: {','.join(self.langs)}")
        need(self.n_samples >= 2, f"--n-samples must be >= 2 (a pair needs two answers), got {self.n_samples}")
        need(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        need(self.temperature > 0, f"--temperature must be > 0 (sampling), got {self.temperature}")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        need(self.gen_batch_size >= 1 and self.score_batch_size >= 1 and self.batch_size >= 1
             and self.grad_accum >= 1, "batch sizes and --grad-accum must be >= 1")
        need(self.max_questions is None or self.max_questions >= 1, "--max-questions must be >= 1")
        need(self.max_score_tokens >= 8, "max_score_tokens must be >= 8")
        need(math.isfinite(self.min_margin) and self.min_margin >= 0, "--min-margin must be a number >= 0")
        need(self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r must be >= 1 and --lora-alpha > 0")
        need(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        need(self.lr > 0 and self.beta > 0, "--lr and --beta must be > 0")
        need(self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1")
        need(self.max_steps is not None or self.epochs > 0, "--epochs must be > 0")
        need(self.save_every >= 1, "--save-every must be >= 1")
        need(self.max_length >= 16, "max_length must be >= 16")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        if self.prompt_template is not None:
            need("{question}" in self.prompt_template, "the prompt template must contain {question}")
            try:
                self.prompt_template.format(question="")
            except (KeyError, IndexError, ValueError):
                raise AlignError("the prompt template may only use the field {question} (write other braces "
                                 "as {{ and }})") from None


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One question in one language; questions with the same ``id`` are translations."""

    id: str
    lang: str
    question: str
    answer: str | None = None
    source: str = ""  # file:line, for messages


def default_questions_path() -> Path:
    """The shipped parallel set: 30 arithmetic word problems in en zh de fr es ru ja bn th sw."""
    return Path(__file__).parent / "data" / "questions" / "questions.jsonl"


def read_questions(path: str | os.PathLike[str], *, langs: Sequence[str] | None = None) -> list[Question]:
    """Read a parallel question set (questions with the same id are translations of each other)
    with `tasks.read_task`: MGSM ``mgsm_<lang>.tsv`` files, MSVAMP-style JSON, JSONL
    ``{"id", "lang", "question", "answer"?}``, or a directory of them (layouts, field mapping
    and ids: `langneurons.tasks`). ``langs`` keeps only those languages. Errors are one line
    naming the file and line."""
    try:
        examples = read_task(path, langs=langs)
    except CorpusError as exc:
        raise AlignError(str(exc)) from None
    return [Question(id=ex.id, lang=ex.lang, question=ex.question, answer=ex.reference, source=ex.source)
            for ex in examples]


def _questions_sha256(questions: Sequence[Question]) -> str:
    rows = [[q.id, q.lang, q.question, q.answer] for q in questions]
    return sha256_text(json.dumps(rows, ensure_ascii=False))


def _path_sha256(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    lines = [f"{f.name}:{sha256_file(f)}" for f in sorted(path.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in (".jsonl", ".json", ".tsv")]
    return sha256_text("\n".join(lines))


def select_questions(questions: Sequence[Question], pivot: str, langs: Sequence[str] | None = None,
                     max_questions: int | None = None) -> tuple[list[Question], list[str]]:
    """The questions an alignment run uses, and its target languages.

    Keeps the ids that have a pivot-language question and at least one target-language question
    (in the order of first appearance), the first ``max_questions`` of them.
    """
    present = list(dict.fromkeys(q.lang for q in questions))
    if pivot not in present:
        raise AlignError(f"the questions have no pivot-language ({pivot!r}) version; languages present: "
                         f"{', '.join(present)}")
    targets = list(langs) if langs is not None else [x for x in present if x != pivot]
    missing = [x for x in targets if x not in present]
    if missing:
        raise AlignError(f"no questions in {', '.join(missing)}; languages present: {', '.join(present)}")
    if not targets:
        raise AlignError(f"the questions have only the pivot language {pivot!r}; add translations to align")
    by_id: dict[str, dict[str, Question]] = {}
    for q in questions:
        by_id.setdefault(q.id, {})[q.lang] = q
    ids = [i for i, per in by_id.items() if pivot in per and any(x in per for x in targets)]
    if not ids:
        raise AlignError(f"no question id has both a {pivot!r} version and one in {', '.join(targets)}; "
                         "questions are matched across languages by id")
    if max_questions is not None:
        ids = ids[:max_questions]
    keep = set(targets) | {pivot}
    selected = [by_id[i][x] for i in ids for x in [pivot, *targets] if x in by_id[i] and x in keep]
    return selected, targets


# --------------------------------------------------------------------------------------------
# Language names (for the self-translation prompt) and translation-model codes
# --------------------------------------------------------------------------------------------

_NLLB_CODES = {
    "en": "eng_Latn", "zh": "zho_Hans", "de": "deu_Latn", "fr": "fra_Latn", "es": "spa_Latn", "ru": "rus_Cyrl",
    "ja": "jpn_Jpan", "bn": "ben_Beng", "th": "tha_Thai", "sw": "swh_Latn", "te": "tel_Telu", "ar": "arb_Arab",
    "hi": "hin_Deva", "ko": "kor_Hang", "it": "ita_Latn", "pt": "por_Latn", "vi": "vie_Latn", "id": "ind_Latn",
    "tr": "tur_Latn", "nl": "nld_Latn", "pl": "pol_Latn", "uk": "ukr_Cyrl", "fa": "pes_Arab", "he": "heb_Hebr",
    "el": "ell_Grek", "cs": "ces_Latn", "sv": "swe_Latn", "fi": "fin_Latn", "hu": "hun_Latn", "ro": "ron_Latn",
    "ta": "tam_Taml", "ur": "urd_Arab", "ms": "zsm_Latn", "tl": "tgl_Latn", "yo": "yor_Latn",
}

_MBART50_CODES = {
    "en": "en_XX", "zh": "zh_CN", "de": "de_DE", "fr": "fr_XX", "es": "es_XX", "ru": "ru_RU", "ja": "ja_XX",
    "bn": "bn_IN", "th": "th_TH", "sw": "sw_KE", "te": "te_IN", "ar": "ar_AR", "hi": "hi_IN", "ko": "ko_KR",
    "it": "it_IT", "pt": "pt_XX", "vi": "vi_VN", "id": "id_ID", "tr": "tr_TR", "nl": "nl_XX", "pl": "pl_PL",
    "uk": "uk_UA", "fa": "fa_IR", "he": "he_IL", "cs": "cs_CZ", "sv": "sv_SE", "fi": "fi_FI", "ro": "ro_RO",
    "ta": "ta_IN", "ur": "ur_PK", "tl": "tl_XX",
}


def language_name(code: str) -> str:
    """English name of a language code (the code itself when unknown)."""
    return LANGUAGE_NAMES.get(code, LANGUAGE_NAMES.get(code.split("-")[0].split("_")[0], code))


# --------------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------------


def _use_chat(tokenizer: Any, chat: bool | None) -> bool:
    try:
        return use_chat(tokenizer, chat)
    except LangNeuronsError as exc:
        raise AlignError(str(exc)) from None


def _template(config: AlignConfig, chat: bool) -> str:
    if config.prompt_template is not None:
        return config.prompt_template
    return "{question}" if chat else "Q: {question}\nA:"


# --------------------------------------------------------------------------------------------
# Step 1: samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated answer.  ``kind`` is "pivot" (the greedy pivot answer, index 0) or "sample"."""

    id: str
    lang: str
    kind: str
    index: int
    prompt: str  # the user message (template applied, chat template not)
    text: str  # the answer as generated (not stripped: it is appended to the prompt for training)
    finished: bool  # ended with EOS within max_new_tokens
    score: float | None = None  # consistency with the pivot answer (step 2); None: not scored

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["score"] is not None and not math.isfinite(d["score"]):
            d["score"] = None
        return d


def sample_answers(model: nn.Module, tokenizer: Any, questions: Sequence[Question], config: AlignConfig,
                   *, progress: bool = False) -> list[Sample]:
    """Step 1: one greedy pivot answer per question id + ``n_samples`` sampled answers per target
    question (temperature / top-p sampling, seeded).  Questions are taken as given: use
    `select_questions` to keep the ids that have a pivot version."""
    config.validate()
    chat = _use_chat(tokenizer, config.chat)
    template = _template(config, chat)
    pivot_qs = [q for q in questions if q.lang == config.pivot]
    pivot_ids = {q.id for q in pivot_qs}
    langs = config.langs if config.langs is not None else sorted({q.lang for q in questions} - {config.pivot})
    target_qs = [q for q in questions if q.lang in set(langs) and q.id in pivot_ids]
    if not pivot_qs or not target_qs:
        raise AlignError(f"nothing to sample: need questions in the pivot {config.pivot!r} and in "
                         f"{','.join(langs)} with the same ids")
    samples: list[Sample] = []
    for kind, qs, n, do_sample in (("pivot", pivot_qs, 1, False), ("sample", target_qs, config.n_samples, True)):
        prompts = [template.format(question=q.question) for q in qs]
        gens = generate(model, tokenizer, prompts, GenerateConfig(
            max_new_tokens=config.max_new_tokens, do_sample=do_sample, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed, batch_size=config.gen_batch_size, num_return_sequences=n,
            chat=chat), progress=progress, desc=f"{kind} answers")
        for g in gens:
            q = qs[g.prompt_index]
            samples.append(Sample(id=q.id, lang=q.lang, kind=kind, index=g.sample, prompt=prompts[g.prompt_index],
                                  text=g.text, finished=g.finished))
    return samples


# --------------------------------------------------------------------------------------------
# Step 2: scorers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreItem:
    """Score how well ``text`` (in ``lang``) agrees with ``pivot_text`` (in ``pivot_lang``)."""

    text: str
    lang: str
    pivot_text: str
    pivot_lang: str


class Scorer(Protocol):
    """Anything with ``name``, ``describe()`` and ``score(items) -> list[float]`` (higher = more
    consistent with the pivot answer; NaN = cannot score)."""

    name: str

    def score(self, items: Sequence[ScoreItem]) -> list[float]: ...

    def describe(self) -> dict[str, Any]: ...


ScorerFactory = Callable[..., Scorer]
_SCORERS: dict[str, ScorerFactory] = {}


def register_scorer(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Register a scorer factory under ``name`` (``--scorer NAME``).  The factory is called as
    ``factory(model=..., tokenizer=..., batch_size=..., chat=..., max_tokens=...)``."""
    def deco(factory: ScorerFactory) -> ScorerFactory:
        _SCORERS[name] = factory
        return factory
    return deco


def scorer_names() -> list[str]:
    return sorted(_SCORERS)


def _mean_forced_logprob(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], batch_size: int,
                         pad_id: int) -> list[float]:
    """Mean log P(continuation tokens | prefix tokens) per row under a causal LM (NaN if empty).

    Right padding (pads after the real tokens never influence them under causal attention);
    log-softmax is taken only at the scored positions, so a big vocabulary costs one logits
    tensor per batch and no copy of it.
    """
    import torch

    scores = [float("nan")] * len(rows)
    todo = [i for i, (_, cont) in enumerate(rows) if cont]
    todo.sort(key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    device = input_device(model)
    model.eval()
    for j in range(0, len(todo), batch_size):
        idx = todo[j:j + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(idx):
            prefix, cont = rows[i]
            start = len(prefix) - 1  # logits at position t predict token t + 1
            sel = logits[r, start:start + len(cont)].float()
            target = torch.tensor(cont, device=sel.device)
            lp = torch.log_softmax(sel, dim=-1).gather(-1, target[:, None])[:, 0]
            scores[i] = float(lp.mean())
    return scores


class SelfTranslationScorer:
    """The LM itself as translator: score = mean log P(pivot answer | "Translate to <Pivot>: <answer>
    \\n<Pivot>:") under forced decoding of the pivot answer's tokens (with a chat template: the user
    message "Translate to <Pivot>: <answer>" and the pivot answer as the assistant's reply).

    Needs no extra model, so it is the default; it is only as good as the model's own translation
    ability (weak for small models and low-resource languages).  Each side is cut to
    ``max_tokens`` tokens.
    """

    name = "self"

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8, chat: bool | None = None,
                 max_tokens: int = 512):
        if model is None or tokenizer is None:
            raise AlignError("the 'self' scorer needs the model and its tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.chat = _use_chat(tokenizer, chat)
        self.max_tokens = max_tokens

    def describe(self) -> dict[str, Any]:
        return {"scorer": "self", "chat": self.chat, "max_tokens": self.max_tokens,
                "prompt": "Translate to {pivot_name}: {answer}\\n{pivot_name}: <pivot answer>"}

    def _cut(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_tokens else self.tokenizer.decode(ids[:self.max_tokens])

    def encode(self, item: ScoreItem) -> tuple[list[int], list[int]]:
        """(prefix ids, pivot-answer ids) of one item: what `score` feeds the model."""
        tok = self.tokenizer
        name = language_name(item.pivot_lang)
        source = self._cut(item.text.strip())
        pivot = item.pivot_text.strip()
        if self.chat:
            prompt, special = render_prompt(tok, f"Translate to {name}: {source}", True)
            cont = pivot
        else:
            prompt, special = f"Translate to {name}: {source}\n{name}:", True
            cont = " " + pivot if pivot else ""
        prefix = tok(prompt, add_special_tokens=special)["input_ids"]
        target = tok(cont, add_special_tokens=False)["input_ids"][:self.max_tokens] if pivot else []
        return list(prefix), list(target)

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return _mean_forced_logprob(self.model, [self.encode(it) for it in items], self.batch_size, pad_id)


class Seq2SeqTranslationScorer:
    """A local encoder-decoder translation model (NLLB, M2M-100, mBART-50, Marian/OPUS-MT):
    score = mean log P(pivot answer | target answer) under forced decoding (the mean over the
    label tokens the tokenizer produces for the pivot answer, language code and EOS included).

    The source/target language codes are set where the tokenizer has them (NLLB ``zho_Hans``,
    M2M-100 ``zh``, mBART-50 ``zh_CN``; ``lang_codes`` overrides); Marian models are one language
    pair each (or many-to-English), so they take no codes.  Nothing is downloaded: ``path`` is a
    local model directory.  Better than the self scorer for small LMs; costs one more model.
    """

    name = "seq2seq"

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int = 8, device: str | None = None,
                 dtype: str = "float32", max_tokens: int = 512, lang_codes: Mapping[str, str] | None = None):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise AlignError(f"translation model {self.path} is not a local model directory (no config.json); "
                             "give a directory saved with save_pretrained (NLLB, M2M-100, mBART-50 or Marian)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(
                str(self.path), local_files_only=True, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
        except Exception as exc:  # noqa: BLE001 - any loading failure is a user-facing one-liner
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise AlignError(f"could not load the translation model in {self.path}: {first}; "
                             "it must be an encoder-decoder (seq2seq) model with its tokenizer") from None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.model.to(device).eval()
        self.batch_size, self.max_tokens = batch_size, max_tokens
        cls = type(self.tokenizer).__name__.lower()
        self.style = ("nllb" if "nllb" in cls else "m2m100" if "m2m100" in cls else
                      "mbart50" if "mbart50" in cls else "none")
        self.lang_codes = dict(lang_codes or {})
        from .models import compute_fingerprint

        self.fingerprint = compute_fingerprint(self.path)

    def describe(self) -> dict[str, Any]:
        return {"scorer": "seq2seq", "path": str(self.path), "fingerprint": self.fingerprint,
                "code_style": self.style, "max_tokens": self.max_tokens}

    def code(self, lang: str) -> str | None:
        """The tokenizer's code for a language (None when the model takes none)."""
        if lang in self.lang_codes:
            return self.lang_codes[lang]
        if self.style == "none":
            return None
        table = {"nllb": _NLLB_CODES, "mbart50": _MBART50_CODES}.get(self.style)
        code = lang if table is None else table.get(lang)
        if code is None:
            raise AlignError(f"no {self.style} language code known for {lang!r}; pass lang_codes={{'{lang}': ...}}")
        return code

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        import torch

        tok, model = self.tokenizer, self.model
        device = model.get_input_embeddings().weight.device
        scores = [float("nan")] * len(items)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, it in enumerate(items):
            if it.text.strip() and it.pivot_text.strip():
                groups.setdefault((it.lang, it.pivot_lang), []).append(i)
        for (lang, pivot_lang), idx_all in groups.items():
            src, tgt = self.code(lang), self.code(pivot_lang)
            if src is not None:
                tok.src_lang = src
            if tgt is not None:
                tok.tgt_lang = tgt
            for j in range(0, len(idx_all), self.batch_size):
                idx = idx_all[j:j + self.batch_size]
                enc = tok([items[i].text.strip() for i in idx], padding=True, truncation=True,
                          max_length=self.max_tokens, return_tensors="pt")
                lab = tok(text_target=[items[i].pivot_text.strip() for i in idx], padding=True, truncation=True,
                          max_length=self.max_tokens, return_tensors="pt")
                labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
                with torch.inference_mode():
                    logits = model(input_ids=enc["input_ids"].to(device),
                                   attention_mask=enc["attention_mask"].to(device),
                                   labels=labels.to(device)).logits.float()
                labels = labels.to(logits.device)
                keep = labels != -100
                lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
                mean = (lp * keep).sum(1) / keep.sum(1).clamp(min=1)
                for r, i in enumerate(idx):
                    scores[i] = float(mean[r])
        return scores


@register_scorer("self")
def _self_factory(*, model: Any = None, tokenizer: Any = None, batch_size: int = 8, chat: bool | None = None,
                  max_tokens: int = 512, **_: Any) -> Scorer:
    return SelfTranslationScorer(model, tokenizer, batch_size=batch_size, chat=chat, max_tokens=max_tokens)


def make_scorer(spec: str, *, model: Any = None, tokenizer: Any = None, batch_size: int = 8,
                chat: bool | None = None, max_tokens: int = 512, device: str | None = None) -> Scorer:
    """``spec``: "self", a name given to `register_scorer`, or a local translation-model directory."""
    if spec in _SCORERS:
        return _SCORERS[spec](model=model, tokenizer=tokenizer, batch_size=batch_size, chat=chat,
                              max_tokens=max_tokens, device=device)
    if Path(spec).expanduser().exists():
        return Seq2SeqTranslationScorer(spec, batch_size=batch_size, device=device, max_tokens=max_tokens)
    raise AlignError(f"unknown scorer {spec!r}: use 'self', a registered scorer ({', '.join(scorer_names())}) "
                     "or the path of a local translation model directory (NLLB, M2M-100, mBART-50, Marian)")


def check_scorer(spec: str) -> None:
    """Fail early (before any model work) on a scorer that `make_scorer` could not build."""
    if spec in _SCORERS:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise AlignError(f"unknown scorer {spec!r}: use 'self', a registered scorer ({', '.join(scorer_names())}) "
                         "or the path of a local translation model directory (NLLB, M2M-100, mBART-50, Marian)")
    if not (path / "config.json").is_file():
        raise AlignError(f"translation model {path} is not a local model directory (no config.json); "
                         "give a directory saved with save_pretrained (NLLB, M2M-100, mBART-50 or Marian)")


def _scorer_identity(spec: str, model_fingerprint: str, chat: bool, max_tokens: int) -> dict[str, Any]:
    """What the scores depend on, known without loading the scorer (for the resume key)."""
    if spec == "self":
        return {"scorer": "self", "model": model_fingerprint, "chat": chat, "max_tokens": max_tokens}
    if spec in _SCORERS:
        return {"scorer": spec, "model": model_fingerprint, "max_tokens": max_tokens}
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        from .models import compute_fingerprint

        return {"scorer": "seq2seq", "fingerprint": compute_fingerprint(path), "max_tokens": max_tokens}
    return {"scorer": spec}


def score_samples(samples: Sequence[Sample], scorer: Scorer) -> list[Sample]:
    """Step 2: the target-language samples with ``score`` set (pivot samples are returned as they
    are).  Empty answers, and all answers to a question whose pivot answer is empty, get NaN."""
    pivots = {s.id: s for s in samples if s.kind == "pivot"}
    targets = [i for i, s in enumerate(samples) if s.kind == "sample"]
    items, where = [], []
    for i in targets:
        s = samples[i]
        pivot = pivots.get(s.id)
        if pivot is None:
            raise AlignError(f"sample {s.id}/{s.lang}#{s.index} has no pivot answer; rerun the sampling step")
        items.append(ScoreItem(text=s.text, lang=s.lang, pivot_text=pivot.text, pivot_lang=pivot.lang))
        where.append(i)
    values = list(scorer.score(items)) if items else []
    if len(values) != len(items):
        raise AlignError(f"scorer {getattr(scorer, 'name', scorer)!r} returned {len(values)} scores for "
                         f"{len(items)} answers")
    out = list(samples)
    for i, it, v in zip(where, items, values):
        v = float(v)
        if not it.text.strip() or not it.pivot_text.strip():
            v = float("nan")
        out[i] = replace(samples[i], score=v)
    return out


# --------------------------------------------------------------------------------------------
# Step 3: pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One DPO preference pair: for question ``id`` in ``lang``, ``chosen`` beat ``rejected``."""

    id: str
    lang: str
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    margin: float
    chosen_index: int
    rejected_index: int


def build_pairs(samples: Sequence[Sample], *, min_margin: float = 0.0) -> list[Pair]:
    """Step 3: per (question id, language), chosen = the highest-scored answer and rejected = the
    lowest, kept when margin = chosen - rejected is > 0 and >= ``min_margin``.

    Answers without a finite score or with empty text do not compete; ties go to the lower
    sample index (deterministic).  A group whose answers all score the same gives no pair.
    """
    if not math.isfinite(min_margin) or min_margin < 0:
        raise AlignError(f"min_margin must be a number >= 0, got {min_margin}")
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        if s.kind == "sample":
            groups.setdefault((s.id, s.lang), []).append(s)
    pairs: list[Pair] = []
    for (qid, lang), group in groups.items():
        valid = [s for s in group if s.score is not None and math.isfinite(s.score) and s.text.strip()]
        if len(valid) < 2:
            continue
        chosen = min(valid, key=lambda s: (-s.score, s.index))  # type: ignore[operator]
        rejected = min(valid, key=lambda s: (s.score, s.index))
        margin = float(chosen.score) - float(rejected.score)  # type: ignore[arg-type]
        if margin <= 0 or margin < min_margin or chosen.text.strip() == rejected.text.strip():
            continue
        pairs.append(Pair(id=qid, lang=lang, prompt=chosen.prompt, chosen=chosen.text, rejected=rejected.text,
                          chosen_score=float(chosen.score), rejected_score=float(rejected.score),  # type: ignore[arg-type]
                          margin=margin, chosen_index=chosen.index, rejected_index=rejected.index))
    return pairs


# --------------------------------------------------------------------------------------------
# Step 4: DPO + LoRA
# --------------------------------------------------------------------------------------------

def lora_target_modules(model: nn.Module) -> list[str] | str:
    """The attention and MLP projections of the model's family (PEFT's "all-linear" otherwise,
    which is every linear layer but the LM head)."""
    from .arch import lora_targets  # arch imports torch; this module stays light

    return lora_targets(model) or "all-linear"


@dataclass
class TrainResult:
    merged_dir: Path
    checkpoints: list[Path]  # merged full models OUT/checkpoints/step-N (when merge_checkpoints)
    adapter_checkpoints: list[Path]  # OUT/trainer/checkpoint-N (LoRA adapter + optimizer state)
    global_step: int
    log_history: list[dict[str, Any]]
    seconds: float


def _require_training_libs() -> None:
    missing = [m for m in ("trl", "peft", "datasets") if _find_spec(m) is None]
    if missing:
        raise AlignError(f"training needs {', '.join(missing)}: pip install 'langneurons[align]' "
                         "(or pip install trl peft)")


def _find_spec(name: str) -> Any:
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("langneurons", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _save_model_dir(model: nn.Module, tokenizer: Any, out: Path, info: Mapping[str, Any]) -> Path:
    """Write a complete model directory atomically: a temporary sibling, then os.replace."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecation chatter
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / ALIGN_INFO_FILE, dict(info))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def read_align_info(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``langneurons_align.json`` of a model directory (None when it has none)."""
    path = Path(model_dir) / ALIGN_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AlignError(f"{path} is not valid JSON ({exc}); restore or delete it") from None
    return info if isinstance(info, dict) else None


def merge_lora_checkpoint(base_path: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                          out_dir: str | os.PathLike[str], *, dtype: str = "float32",
                          info: Mapping[str, Any] | None = None) -> Path:
    """Base model + a saved LoRA adapter (a trainer checkpoint) -> a merged full model directory.

    Loads a fresh copy of the base on the CPU, so it never disturbs a model in use.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    base = AutoModelForCausalLM.from_pretrained(str(base_path), local_files_only=True, dtype=torch_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads a deprecated transformers property
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    return _save_model_dir(merged, tokenizer, Path(out_dir), info or {})


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def _train_key(config: AlignConfig, pairs_sha: str, model_fingerprint: str, chat: bool) -> str:
    fields = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lr", "beta", "epochs", "max_steps",
              "batch_size", "grad_accum", "max_length", "warmup_ratio", "lr_scheduler", "save_every", "seed",
              "gradient_checkpointing", "bf16")
    cfg = {f: getattr(config, f) for f in fields}
    return _key({"step": "train", "pairs": pairs_sha, "model": model_fingerprint, "chat": chat, **cfg})


def train_dpo(model: nn.Module, tokenizer: Any, pairs: Sequence[Pair], config: AlignConfig,
              out_dir: str | os.PathLike[str], *, base_path: str | os.PathLike[str] | None = None,
              info: Mapping[str, Any] | None = None, progress: bool = False) -> TrainResult:
    """Step 4: DPO with a LoRA adapter on ``pairs``; writes OUT/trainer (checkpoints every
    ``save_every`` steps, resumed when present and made by the same settings), OUT/merged and,
    with ``merge_checkpoints`` and a ``base_path`` to reload the base from, OUT/checkpoints/step-N.

    ``model`` is trained IN PLACE: PEFT injects the LoRA layers into it and ``merge_and_unload``
    folds them back, so afterwards it holds the aligned weights (load the base again if you need
    it).  The reference policy is the model with the adapter disabled, i.e. the base.
    """
    import torch

    config.validate()
    _require_training_libs()
    if not pairs:
        raise AlignError("no preference pairs to train on: lower --min-margin, raise --n-samples, "
                         "or give more questions")
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    out = Path(out_dir)
    trainer_dir, ckpt_dir, merged_dir = out / "trainer", out / "checkpoints", out / "merged"
    chat = _use_chat(tokenizer, config.chat)
    rows = [_dpo_row(p, chat) for p in pairs]
    pairs_sha = sha256_text(json.dumps([asdict(p) for p in pairs], ensure_ascii=False))
    fingerprint = str((info or {}).get("base_fingerprint", ""))
    key = _train_key(config, pairs_sha, fingerprint, chat)
    key_file = trainer_dir / "langneurons_train.json"
    resume: str | None = None
    if trainer_dir.exists():
        try:
            old_key = json.loads(key_file.read_text(encoding="utf-8")).get("key")
        except (OSError, json.JSONDecodeError):
            old_key = None
        ckpts = sorted(trainer_dir.glob("checkpoint-*"), key=_checkpoint_step)
        if old_key == key and ckpts:
            resume = str(ckpts[-1])
            logger.info("resuming DPO training from %s", resume)
        else:
            if ckpts:
                logger.warning("%s holds checkpoints of other settings; starting over", trainer_dir)
            shutil.rmtree(trainer_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    atomic_write_json(key_file, {"key": key, "pairs_sha256": pairs_sha})

    on_cuda = input_device(model).type == "cuda"
    bf16 = config.bf16 if config.bf16 is not None else bool(on_cuda and torch.cuda.is_bf16_supported())
    targets = config.lora_target_modules or lora_target_modules(model)
    # transformers 5 takes a float warmup_steps < 1 as a ratio; 4.x has warmup_ratio
    names = {f.name for f in fields(DPOConfig)}
    warmup = {} if config.warmup_ratio <= 0 else (
        {"warmup_ratio": config.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": config.warmup_ratio})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(
            output_dir=str(trainer_dir), per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, beta=config.beta,
            num_train_epochs=config.epochs, max_steps=config.max_steps if config.max_steps is not None else -1,
            lr_scheduler_type=config.lr_scheduler, **warmup,
            save_strategy="steps", save_steps=config.save_every, logging_steps=1, report_to="none",
            bf16=bf16, fp16=False, use_cpu=not on_cuda, gradient_checkpointing=config.gradient_checkpointing,
            seed=config.seed, data_seed=config.seed, max_length=config.max_length, disable_tqdm=not progress,
            dataloader_num_workers=0, save_only_model=False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, peft_config=lora)
            if not progress:  # without tqdm, Trainer prints every log dict to stdout
                from transformers.trainer_callback import PrinterCallback

                trainer.remove_callback(PrinterCallback)
            trainer.train(resume_from_checkpoint=resume)
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()
    seconds = time.perf_counter() - started
    log_history = [dict(h) for h in trainer.state.log_history]
    step = int(trainer.state.global_step)
    merged = trainer.model.merge_and_unload()
    # TRL patches forward() on the model instance with a fused LM head for training; drop it so
    # the (in-place) model behaves like a plain transformers model again.
    merged.__dict__.pop("forward", None)
    merged.eval()
    base_info = {**(info or {}), "step": step, "train_key": key, "pairs_sha256": pairs_sha,
                 "lora_target_modules": targets}
    del trainer
    adapters = sorted(trainer_dir.glob("checkpoint-*"), key=_checkpoint_step)
    _save_model_dir(merged, tokenizer, merged_dir, base_info)
    merged_ckpts: list[Path] = []
    if config.merge_checkpoints and base_path is not None:
        dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
        for adapter in adapters:
            n = _checkpoint_step(adapter)
            if n == step:  # the last checkpoint is OUT/merged
                continue
            target = ckpt_dir / f"step-{n}"
            existing = read_align_info(target) if target.exists() else None
            if existing is None or existing.get("train_key") != key or existing.get("step") != n:
                merge_lora_checkpoint(base_path, adapter, target, dtype=dtype, info={**base_info, "step": n})
            merged_ckpts.append(target)
    elif config.merge_checkpoints:
        logger.warning("no base_path given: intermediate checkpoints stay LoRA adapters in %s", trainer_dir)
    return TrainResult(merged_dir=merged_dir, checkpoints=merged_ckpts, adapter_checkpoints=adapters,
                       global_step=step, log_history=log_history, seconds=seconds)


def _dpo_row(pair: Pair, chat: bool) -> dict[str, Any]:
    """A TRL preference example: conversational with a chat template (TRL renders it the way the
    sampling step did), plain text otherwise (TRL appends EOS to both answers)."""
    if chat:
        return {"prompt": [{"role": "user", "content": pair.prompt}],
                "chosen": [{"role": "assistant", "content": pair.chosen.strip()}],
                "rejected": [{"role": "assistant", "content": pair.rejected.strip()}]}
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    text = "".join(json.dumps(dict(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AlignError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(split_lines(_read_text(path)), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AlignError(f"{path}:{i}: invalid JSON ({exc.msg}); delete it to recompute") from None
    return rows


def _step_done(run: RunDir, name: str, key: str, path: Path) -> bool:
    """An alignment step is current by the stage layer's one rule (`stage.is_fresh`)."""
    from .stage import is_fresh

    return path.is_file() and is_fresh(run, name, {"key": key})


def _record_step(run: RunDir, name: str, key: str, path: Path, count: int, seconds: float) -> None:
    from .stage import commit_stage

    commit_stage(run, name, {"key": key}, [path], {"file": path.name, "count": count}, seconds, by="align")


@dataclass
class AlignResult:
    out_dir: Path
    samples: list[Sample]
    pairs: list[Pair]
    merged_dir: Path
    checkpoints: list[Path]
    trained_langs: list[str]
    manifest: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # steps reused from an earlier run


def align(config: AlignConfig, model: LoadedModel, questions: str | os.PathLike[str] | Sequence[Question] | None,
          out_dir: str | os.PathLike[str], *, progress: bool = False) -> AlignResult:
    """Run sampling, scoring, pair building and DPO training into ``out_dir`` (see module doc).

    ``model`` is a `LoadedModel` (its ``resolved_path`` is reloaded to merge intermediate
    checkpoints).  ``questions``: a path (`read_questions`), a list of `Question`, or None for
    the shipped set.  Steps whose outputs exist and match are skipped.  ``model.model`` is
    trained in place (see `train_dpo`).
    """
    config.validate()
    check_scorer(config.scorer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    lm, tokenizer = model.model, model.tokenizer
    chat = _use_chat(tokenizer, config.chat)

    if questions is None:
        questions = default_questions_path()
    if isinstance(questions, (str, os.PathLike)):
        qpath: Path | None = Path(questions).expanduser()
        all_questions = read_questions(qpath)  # type: ignore[arg-type]
        file_sha: str | None = _path_sha256(qpath)  # type: ignore[arg-type]
    else:
        qpath, all_questions, file_sha = None, list(questions), None
    selected, langs = select_questions(all_questions, config.pivot, config.langs, config.max_questions)
    config = replace(config, langs=list(langs))
    q_sha = _questions_sha256(selected)
    n_ids = len({q.id for q in selected})
    model_type = str(getattr(lm.config, "model_type", ""))
    run.update_manifest({
        "model": {"model": model.source, "model_fingerprint": model.fingerprint, "resolved_path": model.resolved_path,
                  "dtype": model.dtype, "architecture": type(lm).__name__, "family": model_type},
        "config": asdict(config),
        "questions": {"path": str(qpath) if qpath else None, "sha256": file_sha, "content_sha256": q_sha,
                      "n_ids": n_ids, "languages": [config.pivot, *langs],
                      "per_language": {x: sum(q.lang == x for q in selected) for x in [config.pivot, *langs]}},
        "languages": [config.pivot, *langs],
        "versions": _versions(),
    })
    skipped: list[str] = []

    # 1. samples -------------------------------------------------------------------------------
    samples_path = out / "samples.jsonl"
    sample_fields = ("pivot", "langs", "n_samples", "max_new_tokens", "temperature", "top_p", "seed",
                     "gen_batch_size", "prompt_template")
    key1 = _key({"step": "samples", "model": model.fingerprint, "questions": q_sha, "chat": chat,
                 **{f: getattr(config, f) for f in sample_fields}})
    if _step_done(run, "samples", key1, samples_path):
        samples = [Sample(**r) for r in _read_jsonl(samples_path)]
        skipped.append("samples")
    else:
        t0 = time.perf_counter()
        samples = sample_answers(lm, tokenizer, selected, config, progress=progress)
        _write_jsonl(samples_path, (s.to_json() for s in samples))
        _record_step(run, "samples", key1, samples_path, len(samples), time.perf_counter() - t0)

    # 2. scores --------------------------------------------------------------------------------
    scores_path = out / "scores.jsonl"
    key2 = _key({"step": "scores", "samples": sha256_file(samples_path),
                 "scorer": _scorer_identity(config.scorer, model.fingerprint, chat, config.max_score_tokens)})
    if _step_done(run, "scores", key2, scores_path):
        by_key = {(r["id"], r["lang"], r["index"]): r["score"] for r in _read_jsonl(scores_path)}
        samples = [replace(s, score=_nan_if_none(by_key.get((s.id, s.lang, s.index))))
                   if s.kind == "sample" else s for s in samples]
        skipped.append("scores")
        scorer_desc = run.read_manifest().get("scorer", {})
    else:
        t0 = time.perf_counter()
        scorer = make_scorer(config.scorer, model=lm, tokenizer=tokenizer, batch_size=config.score_batch_size,
                             chat=chat, max_tokens=config.max_score_tokens)
        scorer_desc = scorer.describe()
        samples = score_samples(samples, scorer)
        del scorer
        _write_jsonl(scores_path, ({"id": s.id, "lang": s.lang, "index": s.index,
                                    "score": s.score if s.score is not None and math.isfinite(s.score) else None}
                                   for s in samples if s.kind == "sample"))
        _record_step(run, "scores", key2, scores_path, sum(s.kind == "sample" for s in samples),
                     time.perf_counter() - t0)
        run.update_manifest({"scorer": scorer_desc})

    # 3. pairs ---------------------------------------------------------------------------------
    pairs_path = out / "pairs.jsonl"
    key3 = _key({"step": "pairs", "scores": sha256_file(scores_path), "min_margin": config.min_margin})
    if _step_done(run, "pairs", key3, pairs_path):
        pairs = [Pair(**r) for r in _read_jsonl(pairs_path)]
        skipped.append("pairs")
    else:
        t0 = time.perf_counter()
        pairs = build_pairs(samples, min_margin=config.min_margin)
        _write_jsonl(pairs_path, (asdict(p) for p in pairs))
        _record_step(run, "pairs", key3, pairs_path, len(pairs), time.perf_counter() - t0)
    trained = [x for x in langs if any(p.lang == x for p in pairs)]
    counts = {
        "questions": n_ids,
        "pivot_answers": sum(s.kind == "pivot" for s in samples),
        "samples": {x: sum(s.kind == "sample" and s.lang == x for s in samples) for x in langs},
        "unfinished_samples": sum(s.kind == "sample" and not s.finished for s in samples),
        "scored": sum(s.kind == "sample" and s.score is not None and math.isfinite(s.score) for s in samples),
        "pairs": {x: sum(p.lang == x for p in pairs) for x in langs},
        "mean_margin": (sum(p.margin for p in pairs) / len(pairs)) if pairs else None,
    }
    run.update_manifest({"counts": counts})
    if not pairs:
        raise AlignError("no preference pairs: every question's answers scored the same or below --min-margin; "
                         "lower --min-margin, raise --n-samples or --temperature, or give more questions")

    # 4. training ------------------------------------------------------------------------------
    info = {"method": "mapo-dpo", "trained_langs": trained, "pivot": config.pivot, "requested_langs": langs,
            "base_model": model.source, "base_fingerprint": model.fingerprint, "scorer": scorer_desc,
            "align_dir": str(out.resolve())}
    pairs_sha = sha256_text(json.dumps([asdict(p) for p in pairs], ensure_ascii=False))
    train_key = _train_key(config, pairs_sha, model.fingerprint, chat)
    merged_dir = out / "merged"
    existing = read_align_info(merged_dir) if (merged_dir / "config.json").is_file() else None
    if existing is not None and existing.get("train_key") == train_key:
        skipped.append("train")
        checkpoints = sorted((p for p in (out / "checkpoints").glob("step-*") if read_align_info(p)),
                             key=_checkpoint_step)
        step = existing.get("step")
    else:
        result = train_dpo(lm, tokenizer, pairs, config, out, base_path=model.resolved_path, info=info,
                           progress=progress)
        _write_jsonl(out / "train_log.jsonl", result.log_history)
        checkpoints, step = result.checkpoints, result.global_step
        losses = [h["loss"] for h in result.log_history if "loss" in h]
        run.update_manifest({"train": {"global_step": step, "seconds": round(result.seconds, 3),
                                       "first_loss": losses[0] if losses else None,
                                       "last_loss": losses[-1] if losses else None,
                                       "adapter_checkpoints": [str(p.relative_to(out)) for p in
                                                               result.adapter_checkpoints]}})
    manifest = run.update_manifest({"align": {
        "trained_langs": trained, "pivot": config.pivot, "requested_langs": langs, "method": "mapo-dpo",
        "merged": "merged", "step": step, "checkpoints": [str(Path(p).relative_to(out)) for p in checkpoints],
        "scorer": scorer_desc}})
    return AlignResult(out_dir=out, samples=samples, pairs=pairs, merged_dir=merged_dir,
                       checkpoints=[Path(p) for p in checkpoints], trained_langs=trained, manifest=manifest,
                       skipped=skipped)


def _nan_if_none(value: Any) -> float:
    return float("nan") if value is None else float(value)
