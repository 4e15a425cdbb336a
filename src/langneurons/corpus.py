"""Corpora: texts (or prompt/response pairs) grouped by language.

Accepted inputs (`load_corpus`):

* a directory of ``<lang>.txt`` files: one document per line (default) or, with
  ``doc_sep="blank"``, documents separated by blank lines; empty lines are skipped;
* a directory of ``<lang>.jsonl`` files, or one ``.jsonl`` file, with records
  ``{"lang", "text"}`` or ``{"lang", "prompt", "response"}`` (column names can be mapped; in a
  per-language file ``lang`` may be omitted);
* a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (column mapping as above);
* a directory holding ``text/`` and/or ``qa/`` subdirectories of the above (the embedded
  default corpus), chosen with ``kind``.

Errors name the file and line (non-UTF-8 bytes, bad JSON, unknown column, empty language).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from .errors import CorpusError

DocSep = Literal["line", "blank"]


@dataclass(frozen=True)
class Example:
    """One text (``prompt is None``) or one prompt/response pair."""

    lang: str
    text: str = ""
    prompt: str | None = None
    response: str | None = None
    id: str | None = None
    source: str = ""  # file:line, for error messages

    @property
    def is_pair(self) -> bool:
        return self.prompt is not None


@dataclass(frozen=True)
class ColumnMap:
    lang: str = "lang"
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    id: str = "id"


@dataclass
class Corpus:
    by_lang: dict[str, list[Example]]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return list(self.by_lang)

    def select(self, langs: Sequence[str] | None) -> "Corpus":
        if not langs:
            return self
        missing = [x for x in langs if x not in self.by_lang]
        if missing:
            raise CorpusError(f"languages {','.join(missing)} are not in the corpus {self.source} "
                              f"(it has: {','.join(self.by_lang) or 'none'})")
        return Corpus({x: self.by_lang[x] for x in langs}, self.source, dict(self.meta))

    def fingerprint(self, lang: str) -> str:
        h = hashlib.sha256()
        for ex in self.by_lang[lang]:
            h.update(json.dumps([ex.text, ex.prompt, ex.response], ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    def split(self, holdout: float, seed: int = 0) -> tuple["Corpus", "Corpus"]:
        """Deterministic split of every language's examples (by position, same for all
        languages, so parallel corpora stay parallel): every round(1/holdout)-th held out."""
        if not 0 < holdout < 1:
            raise CorpusError(f"holdout fraction must be in (0, 1), got {holdout}")
        step = max(int(round(1 / holdout)), 2)
        a: dict[str, list[Example]] = {}
        b: dict[str, list[Example]] = {}
        for lang, exs in self.by_lang.items():
            b[lang] = [e for i, e in enumerate(exs) if (i + seed) % step == 0]
            a[lang] = [e for i, e in enumerate(exs) if (i + seed) % step != 0]
        return Corpus(a, self.source, dict(self.meta)), Corpus(b, self.source, dict(self.meta))


def default_corpus_path() -> Path:
    return Path(__file__).parent / "data" / "corpus"


def _read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                          "re-encode the file as UTF-8") from None


def read_text_file(path: Path, lang: str, doc_sep: DocSep = "line") -> list[Example]:
    lines = _read_lines(path)
    out: list[Example] = []
    if doc_sep == "line":
        for i, line in enumerate(lines, 1):
            if line.strip():
                out.append(Example(lang, text=line.strip(), id=str(i), source=f"{path}:{i}"))
    else:
        buf: list[str] = []
        start = 1
        for i, line in enumerate(lines + [""], 1):
            if line.strip():
                if not buf:
                    start = i
                buf.append(line.strip())
            elif buf:
                out.append(Example(lang, text="\n".join(buf), id=str(start), source=f"{path}:{start}"))
                buf = []
    return out


def _record_to_example(rec: dict, cols: ColumnMap, default_lang: str | None, where: str) -> Example:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    lang = rec.get(cols.lang, default_lang)
    if lang is None or str(lang).strip() == "":
        raise CorpusError(f"{where}: no '{cols.lang}' field (columns present: {sorted(rec)}); "
                          "map the language column with --lang-column")
    rid = rec.get(cols.id)
    rid = None if rid is None else str(rid)
    if cols.prompt in rec or cols.response in rec:
        prompt, response = rec.get(cols.prompt), rec.get(cols.response)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise CorpusError(f"{where}: '{cols.prompt}' and '{cols.response}' must both be strings")
        return Example(str(lang), prompt=prompt, response=response, id=rid, source=where)
    text = rec.get(cols.text)
    if not isinstance(text, str):
        raise CorpusError(f"{where}: no text column '{cols.text}' (columns present: {sorted(rec)}); "
                          "map it with --text-column, or give 'prompt' and 'response'")
    return Example(str(lang), text=text, id=rid, source=where)


def read_jsonl(path: Path, cols: ColumnMap = ColumnMap(), default_lang: str | None = None) -> list[Example]:
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{i}: invalid JSON ({exc.msg})") from None
        out.append(_record_to_example(rec, cols, default_lang, f"{path}:{i}"))
    return out


def read_hf_dataset(path: Path, cols: ColumnMap = ColumnMap(), split: str | None = None) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("reading a Hugging Face dataset needs the 'datasets' package: "
                          "pip install 'langneurons[datasets]'") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        split = split or ("train" if "train" in ds else names[0])
        if split not in ds:
            raise CorpusError(f"{path}: no split {split!r} (has {names})")
        ds = ds[split]
    columns = set(ds.column_names)
    wanted = [cols.lang] + ([cols.prompt, cols.response] if cols.prompt in columns else [cols.text])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise CorpusError(f"{path}: unknown column(s) {missing}; the dataset has {sorted(columns)} "
                          "(map them with --lang-column/--text-column/--prompt-column/--response-column)")
    return [_record_to_example(rec, cols, None, f"{path}[{i}]") for i, rec in enumerate(ds)]


def _group(examples: Iterable[Example]) -> dict[str, list[Example]]:
    by_lang: dict[str, list[Example]] = {}
    for ex in examples:
        by_lang.setdefault(ex.lang, []).append(ex)
    return by_lang


def load_corpus(path: str | Path | None = None, langs: Sequence[str] | None = None, *,
                kind: Literal["text", "qa", "auto"] = "auto", doc_sep: DocSep = "line",
                columns: ColumnMap = ColumnMap(), split: str | None = None) -> Corpus:
    """Read a corpus and check that every requested language has at least one example."""
    p = Path(path) if path is not None else default_corpus_path()
    if not p.exists():
        raise CorpusError(f"corpus {p} does not exist; give a directory of <lang>.txt/.jsonl files, "
                          "a .jsonl file or a saved Hugging Face dataset")
    if p.is_dir() and (p / "text").is_dir() or p.is_dir() and (p / "qa").is_dir():
        sub = "text" if kind in ("text", "auto") and (p / "text").is_dir() else "qa"
        if kind == "qa" and not (p / "qa").is_dir():
            raise CorpusError(f"{p} has no qa/ directory of prompt/response pairs")
        p = p / sub
    if p.is_file():
        if p.suffix != ".jsonl":
            raise CorpusError(f"{p}: a single corpus file must be .jsonl with a '{columns.lang}' column; "
                              "for plain text use a directory of <lang>.txt files")
        by_lang = _group(read_jsonl(p, columns))
    elif (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
        by_lang = _group(read_hf_dataset(p, columns, split))
    else:
        by_lang = {}
        files = sorted(x for x in p.iterdir() if x.suffix in (".txt", ".jsonl") and not x.name.startswith("."))
        if not files:
            raise CorpusError(f"{p} holds no <lang>.txt or <lang>.jsonl files")
        for f in files:
            if langs and f.stem not in langs:
                continue
            exs = read_text_file(f, f.stem, doc_sep) if f.suffix == ".txt" else read_jsonl(f, columns, f.stem)
            for ex in exs:
                if ex.lang != f.stem:
                    raise CorpusError(f"{ex.source}: language {ex.lang!r} inside the file for {f.stem!r}")
            by_lang.setdefault(f.stem, []).extend(exs)
    corpus = Corpus(by_lang, str(p))
    corpus = corpus.select(langs) if langs else corpus
    for lang, exs in corpus.by_lang.items():
        if not exs:
            raise CorpusError(f"language {lang!r} has no documents in {p}")
    if not corpus.by_lang:
        raise CorpusError(f"corpus {p} is empty")
    return corpus
