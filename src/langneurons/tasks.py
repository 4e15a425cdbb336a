"""One reader for question/answer tasks (MGSM, MSVAMP, parallel question sets) and one number
parser for their answers, used by evaluation (task accuracy) and alignment (question sets).

Layouts (`read_task`)
    * MGSM per-language TSV: ``mgsm_<lang>.tsv``, ``question<TAB>answer`` per line, no header
      (the question may itself hold tabs: the LAST tab separates the answer);
    * JSONL: one object per line, e.g. ``{"lang", "id", "question", "answer"}`` or the Hugging
      Face MGSM rows ``{"question", "answer", "answer_number", "equation_solution"}``;
    * JSON: a list of objects (or ``{"data" | "examples" | "questions": [...]}``), e.g. MSVAMP's
      ``test_<lang>.json`` with ``{"m_query", "response"}``;
    * a directory of such files (hidden files and other suffixes are ignored).

Field mapping (first field present wins)
    question: ``question, m_query, query, instruction, problem, input, prompt``
    answer:   ``answer_number, answer, response, output, final_answer, label, target``
              (``answer_number`` first: in the HF MGSM layout ``answer`` is a worked solution or
              null); the answer is kept as a canonical number (`extract_final_number` of a text,
              ``8.0`` -> ``"8"``) and, when the answer field is text, as that text too
    language: a ``lang`` / ``language`` field, else the file name: ``mgsm_de.tsv``,
              ``test_zh.json``, ``fr.jsonl``, ``test_Bengali.json`` (an English language name),
              else the ``lang`` argument
    id:       an ``id`` field, else the ordinal of the question within its language (1, 2, ...):
              MGSM and MSVAMP files are line-parallel across languages, so ordinals match

Lines are split with `corpus.split_lines` (only ``\\n``; never on U+2028 or other Unicode line
breaks, which occur inside questions). Every error is one line naming the file (and line).
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping, Sequence

from .corpus import split_lines
from .errors import CorpusError

__all__ = [
    "TaskExample", "read_task", "QUESTION_FIELDS", "ANSWER_FIELDS", "LANGUAGE_NAMES", "TASK_SUFFIXES",
    "extract_final_number", "answer_number", "canonical_number", "same_number", "lang_from_filename",
]

QUESTION_FIELDS = ("question", "m_query", "query", "instruction", "problem", "input", "prompt")
ANSWER_FIELDS = ("answer_number", "answer", "response", "output", "final_answer", "label", "target")
TASK_SUFFIXES = (".tsv", ".jsonl", ".json")

#: English names of language codes (prompts, and file names such as test_Bengali.json)
LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian",
    "ja": "Japanese", "bn": "Bengali", "th": "Thai", "sw": "Swahili", "te": "Telugu", "ar": "Arabic",
    "hi": "Hindi", "ko": "Korean", "it": "Italian", "pt": "Portuguese", "vi": "Vietnamese",
    "id": "Indonesian", "tr": "Turkish", "nl": "Dutch", "pl": "Polish", "uk": "Ukrainian", "fa": "Persian",
    "he": "Hebrew", "el": "Greek", "cs": "Czech", "sv": "Swedish", "fi": "Finnish", "hu": "Hungarian",
    "ro": "Romanian", "ta": "Tamil", "ur": "Urdu", "ms": "Malay", "tl": "Tagalog", "yo": "Yoruba",
}
_CODE_OF_NAME = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}
_LANG_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z]{2,4})?$")


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
_PUNCT = {"\uff0c": ",", "\uff0e": ".", "\u066b": ".", "\u066c": ",", "\u2212": "-", "\uff0d": "-",
          "\u00a0": " ", "\u202f": " ", "\u2009": " ", "\u2007": " ", "\u2019": "'"}
_NUMBER = re.compile(r"""
    (?<![0-9A-Za-z_.,'])                   # not the tail of a word or of a number
    (?P<sign>-)?
    (?P<body>
        \d{1,3}(?P<sep>[,.' ])\d{3}(?:(?P=sep)\d{3})*(?:(?!(?P=sep))[.,]\d+)?   # grouped thousands
      | \d+(?:[.,]\d+)?                                                        # plain or decimal
    )
    (?!\d)
""", re.X)


def _normalise_digits(text: str) -> str:
    # Any decimal digit (full-width, Arabic-Indic, Bengali, Thai, Devanagari...) -> ASCII. Only
    # category Nd: superscripts like the ² of "m²" are not numbers of the answer.
    out = []
    for ch in text:
        if ch in _PUNCT:
            out.append(_PUNCT[ch])
        elif not ch.isascii() and unicodedata.category(ch) == "Nd":
            out.append(str(unicodedata.digit(ch)))
        else:
            out.append(ch)
    return "".join(out)


def _parse_number(sign: str | None, body: str, sep: str | None) -> Decimal | None:
    if sep:
        head, _, _ = body.partition(sep)
        if head == "0" and sep in ".,":  # "0.500" / "0,5" are decimals, not thousands
            body = body.replace(sep, ".", 1)
        else:
            body = body.replace(sep, "")
        body = body.replace(",", ".")
    else:
        body = body.replace(",", ".")
    try:
        value = Decimal(body)
    except InvalidOperation:
        return None
    return -value if sign else value


def canonical_number(value: Decimal) -> str:
    """"1234", "-5", "1.5" (no exponent, no trailing zeros, no negative zero)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def extract_final_number(text: str) -> str | None:
    """The LAST number in ``text`` as a canonical string ("1234", "-5", "1.5"), or None.

    Thousands separators "1,234" "1.234" "1 234" "1'234" (a separator followed by exactly three
    digits is a thousands separator, except after a lone 0: "0.125"); decimal comma "2,5";
    negative numbers; any Unicode decimal digits (full-width, Arabic-Indic, Bengali, Thai,
    Devanagari); a trailing period is punctuation. Not handled: number words and CJK numerals.
    """
    if not text:
        return None
    last = None
    for m in _NUMBER.finditer(_normalise_digits(text)):
        value = _parse_number(m.group("sign"), m.group("body"), m.group("sep"))
        if value is not None:
            last = value
    return None if last is None else canonical_number(last)


def answer_number(answer: Any) -> Decimal | None:
    """The numeric value of a reference answer: a JSON number as it is, a text by its last
    number (`extract_final_number`); None for None, booleans, non-finite numbers and texts
    without a number."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return Decimal(str(answer)) if math.isfinite(answer) else None
    parsed = extract_final_number(str(answer))
    return None if parsed is None else Decimal(parsed)


def same_number(a: Any, b: Any) -> bool | None:
    """True/False when both answers have a number (1,000 == 1000 == 1000.0), None otherwise."""
    va, vb = answer_number(a), answer_number(b)
    if va is None or vb is None:
        return None
    return va == vb


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskExample:
    """One question in one language; questions with the same ``id`` are translations."""

    lang: str
    id: str
    question: str
    answer: str | None = None  # canonical number (see `extract_final_number`), or None
    answer_text: str | None = None  # the answer field when it is text (a worked solution, a word...)
    source: str = ""  # file:line, for messages

    @property
    def reference(self) -> str | None:
        """The answer as a reference: the number when there is one, else the text."""
        return self.answer if self.answer is not None else self.answer_text


def lang_from_filename(path: Path) -> str | None:
    """mgsm_de.tsv -> de, test_zh.json -> zh, fr.jsonl -> fr, test_Bengali.json -> bn;
    questions.jsonl, dev.jsonl -> None. A whole stem counts only when it is two letters or a
    known code, so that names such as ``dev`` or ``all`` are not taken for languages."""
    stem = path.stem
    part = stem.rsplit("_", 1)[-1] if "_" in stem else stem
    if part.lower() in _CODE_OF_NAME:
        return _CODE_OF_NAME[part.lower()]
    if "_" in stem:
        return part if _LANG_CODE.match(part) else None
    return stem if re.fullmatch(r"[a-z]{2}", stem) or stem in LANGUAGE_NAMES else None


def _pick(rec: Mapping[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in rec and rec[k] is not None:
            return k, rec[k]
    return None, None


def _example(rec: Any, file_lang: str | None, ordinal: int, where: str) -> TaskExample:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: expected a JSON object with a question, got {type(rec).__name__}")
    qkey, text = _pick(rec, QUESTION_FIELDS)
    if qkey is None:
        raise CorpusError(f"{where}: no question field (one of {', '.join(QUESTION_FIELDS)}); "
                          f"the fields are {', '.join(sorted(map(str, rec))) or 'none'}")
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f"{where}: the {qkey!r} field must be non-empty text")
    lang = rec.get("lang", rec.get("language", file_lang))  # an explicit field wins over the file name
    if not isinstance(lang, str) or not lang.strip():
        raise CorpusError(f"{where}: no language: add a \"lang\" field or name the file <name>_<lang>.json(l) "
                          "(e.g. mgsm_de.jsonl)")
    qid = rec.get("id", ordinal)
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid).strip() == "":
        raise CorpusError(f"{where}: the id must be text or an integer, got {qid!r}")
    akey, raw = _pick(rec, ANSWER_FIELDS)
    if isinstance(raw, bool) or (raw is not None and not isinstance(raw, (int, float, str))):
        raise CorpusError(f"{where}: the {akey!r} answer must be a number or text, got {raw!r}")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise CorpusError(f"{where}: the answer {raw!r} is not a finite number")
    value = answer_number(raw)
    text_answer = next((rec[k].strip() for k in ANSWER_FIELDS if isinstance(rec.get(k), str) and rec[k].strip()),
                       None)
    return TaskExample(lang=lang.strip(), id=str(qid).strip(), question=text.strip(),
                       answer=None if value is None else canonical_number(value), answer_text=text_answer,
                       source=where)


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _read_file(path: Path, default_lang: str | None) -> list[TaskExample]:
    file_lang = lang_from_filename(path) or default_lang
    suffix = path.suffix.lower()
    out: list[TaskExample] = []
    ordinals: dict[Any, int] = {}

    def ordinal(rec: Any) -> int:
        key = rec.get("lang", rec.get("language", file_lang)) if isinstance(rec, dict) else None
        ordinals[key] = ordinals.get(key, 0) + 1
        return ordinals[key]

    if suffix == ".tsv":
        if file_lang is None:
            raise CorpusError(f"cannot tell the language of {path}: name MGSM files mgsm_<lang>.tsv")
        for i, line in enumerate(split_lines(read_utf8(path)), 1):
            if not line.strip():
                continue
            question, sep, answer = line.rpartition("\t")
            if not sep or not question.strip():
                raise CorpusError(f"{path}:{i}: expected 'question<TAB>answer' (MGSM layout, no header)")
            rec = {"question": question, "answer": answer.strip() or None}
            out.append(_example(rec, file_lang, ordinal(rec), f"{path}:{i}"))
    elif suffix == ".jsonl":
        for i, line in enumerate(split_lines(read_utf8(path)), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{i}: invalid JSON ({exc.msg})") from None
            out.append(_example(rec, file_lang, ordinal(rec), f"{path}:{i}"))
    elif suffix == ".json":
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("examples", data.get("questions")))
        if not isinstance(data, list):
            raise CorpusError(f"{path}: expected a JSON list of questions (or {{\"data\": [...]}})")
        for i, rec in enumerate(data):
            out.append(_example(rec, file_lang, ordinal(rec), f"{path}[{i}]"))
    else:
        raise CorpusError(f"{path}: unknown question file type; use .jsonl, .json or mgsm_<lang>.tsv")
    return out


def task_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files `read_task` reads for ``path`` (the file, or a directory's task files)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"question file {p} does not exist; give a .jsonl/.json file, mgsm_<lang>.tsv files "
                          "or a directory of them")
    if not p.is_dir():
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in TASK_SUFFIXES)
    if not files:
        raise CorpusError(f"{p} holds no .jsonl, .json or .tsv question files")
    return files


def read_task(path: str | os.PathLike[str], lang: str | None = None, *,
              langs: Sequence[str] | None = None, parallel: bool = True) -> list[TaskExample]:
    """Read a question/answer task (layouts and field mapping: module docstring).

    lang: keep this language only (it also names a file whose name and records name none).
    langs: keep these languages; each must have questions.
    parallel: questions with one id must be translations: ids are unique per language and
        their numeric answers agree (an error names both places otherwise).
    """
    root = Path(path).expanduser()
    files = task_files(root)
    examples: list[TaskExample] = []
    for f in files:
        file_lang = lang_from_filename(f)
        if root.is_dir() and lang and file_lang and file_lang != lang:
            continue
        examples.extend(_read_file(f, lang))
    seen: dict[tuple[str, str], TaskExample] = {}
    answers: dict[str, TaskExample] = {}
    for ex in examples:
        key = (ex.id, ex.lang)
        if key in seen:
            raise CorpusError(f"{ex.source}: question id {ex.id!r} appears twice for language {ex.lang!r} "
                              f"(first at {seen[key].source}); ids must be unique per language")
        seen[key] = ex
        if parallel and ex.answer is not None:
            first = answers.setdefault(ex.id, ex)
            if first.answer != ex.answer:
                raise CorpusError(f"{ex.source}: answer {ex.answer!r} of question {ex.id!r} differs from "
                                  f"{first.answer!r} at {first.source}; questions with one id must be translations "
                                  "of each other")
    wanted = [lang] if lang else (list(langs) if langs is not None else None)
    if wanted is not None:
        present = list(dict.fromkeys(ex.lang for ex in examples))
        missing = [x for x in wanted if x not in present]
        if missing:
            raise CorpusError(f"no questions for {', '.join(missing)} in {root}; languages present: "
                              f"{', '.join(present) or 'none'}")
        keep = set(wanted)
        examples = [ex for ex in examples if ex.lang in keep]
    if not examples:
        raise CorpusError(f"no questions in {root}")
    return examples
