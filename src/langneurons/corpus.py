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

Errors name the file and line (non-UTF-8 bytes, UTF-16 without or with a byte-order mark, NUL
characters, bad JSON, unknown column, empty language, a language name that is not a code).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

from .errors import CorpusError, LangNeuronsError

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
    """The file's lines, split on ``\n`` only (CRLF tolerated, a UTF-8 BOM dropped).

    ``str.splitlines`` would also split on U+2028, U+0085, form feeds etc., which may occur
    inside a document or a JSON string: it would cut documents apart and make line numbers
    in error messages disagree with every editor's.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
    utf16 = _utf16_guess(data)
    if utf16:
        raise CorpusError(f"{path}:1: {utf16}, not UTF-8; re-encode the file as UTF-8 "
                          f"(e.g. iconv -f {utf16.split()[0]} -t UTF-8)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                          "re-encode the file as UTF-8") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        nul = text.count("\x00")
        raise CorpusError(f"{path}:{line}: holds NUL characters ({nul:,} of {len(text):,} characters, "
                          f"{nul / len(text):.1%}); a text file never does: is it binary or in another encoding? "
                          "Remove them or re-encode the file as UTF-8")
    return split_lines(text)


def _utf16_guess(data: bytes) -> str | None:
    """'UTF-16LE with a byte-order mark' / 'UTF-16BE without ...' when ``data`` looks like UTF-16.

    UTF-16 text of Latin-script languages is valid UTF-8 byte for byte (every other byte is
    NUL), so decoding alone would count "H\0e\0l\0l\0o\0" as text. A BOM settles it; without
    one, an even length and at least two NUL bytes, all at odd (LE) or all at even (BE) positions,
    do: CJK text has few NULs (U+732B is 2B 73) but every line end and ASCII character has one.
    NULs at both parities (a binary file) are left to the NUL check.
    """
    if data.startswith(b"\xff\xfe"):
        return "UTF-16LE with a byte-order mark"
    if data.startswith(b"\xfe\xff"):
        return "UTF-16BE with a byte-order mark"
    sample = data[:65536 * 2]
    if len(data) % 2 or sample.count(0) < 2:
        return None
    z_even, z_odd = sample[0::2].count(0), sample[1::2].count(0)
    if z_even == 0:  # NULs only at odd positions: "H\0i\0\n\0" (and 猫 "\n\0" line ends)
        return "UTF-16LE without a byte-order mark"
    if z_odd == 0:
        return "UTF-16BE without a byte-order mark"
    return None
    even, odd = sample[0::2], sample[1::2]
    z_even, z_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    lines = sample.count(b"\n")
    # CJK text in UTF-16 has few NUL bytes (U+732B is 2B 73), but every newline is 0A 00 (LE) / 00 0A (BE)
    if z_even <= 0.02 and (z_odd >= 0.3 or lines and even.count(b"\n") == 0 and sample.count(b"\n\x00") == lines):
        return "UTF-16LE without a byte-order mark"
    if z_odd <= 0.02 and (z_even >= 0.3 or lines and odd.count(b"\n") == 0 and sample.count(b"\x00\n") == lines):
        return "UTF-16BE without a byte-order mark"
    return None


def split_lines(text: str) -> list[str]:
    """Lines split on ``\n`` only (CRLF tolerated, a leading BOM dropped); see `_read_lines`."""
    text = text.removeprefix("\ufeff")
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


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


#: what a language label must look like: a code such as en, zh-Hans, pt_BR or eng_Latn. It
#: names the stats file of the language (``stats/<lang>.safetensors``), so it must never hold a
#: path separator, a dot, a space or another script; a value with spaces or another script is
#: almost always a text column mapped onto the language column by mistake. ASCII only on
#: purpose: ``[A-Za-z]`` does not match ``日`` (``str.isalpha`` would).
LANG_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,34}")


def is_lang_code(lang: object) -> bool:
    """True when ``lang`` can safely name a language (and its files)."""
    return isinstance(lang, str) and LANG_CODE.fullmatch(lang) is not None


def check_language_name(lang: object, where: str, *, what: str = "language name",
                        hint: str = "", error: type[LangNeuronsError] = CorpusError) -> str:
    """THE validator of every language name that becomes a file name: corpus columns and file
    names, stats metadata (``merge``, ``import``), anything `RunDir.stats_path` is called with.
    Returns ``lang``; raises ``error`` (one line naming ``where``) otherwise."""
    if is_lang_code(lang):
        return lang  # type: ignore[return-value]
    text = str(lang)
    shown = text if len(text) <= 24 else text[:24] + "..."
    raise error(f"{where}: {what} {shown!r} is not a language code (like en, zh-Hans or eng_Latn: ASCII "
                f"letters, digits, '_' and '-', starting with a letter){hint}")


def check_lang_code(lang: str, where: str, column: str = "lang") -> str:
    """A corpus column's language value (see `check_language_name`)."""
    return check_language_name(lang, where, what=f"{column!r} value",
                               hint="; are the columns mixed up? map them with --lang-column/--text-column")


def _check_unicode(value: str, where: str, column: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON escapes such as "\ud800" decode to lone surrogates
        raise CorpusError(f"{where}: {column!r} holds an unpaired surrogate ({value[exc.start]!r} at character "
                          f"{exc.start}); it is not valid Unicode text, fix the file") from None
    if "\x00" in value:  # "\u0000" in JSON: text never holds NUL, a tokenizer would count it as text
        nul = value.count("\x00")
        raise CorpusError(f"{where}: {column!r} holds NUL characters ({nul} of {len(value)} characters, "
                          f"{nul / len(value):.1%}, first at character {value.index(chr(0))}); remove them")
    return value


def _record_to_example(rec: dict, cols: ColumnMap, default_lang: str | None, where: str,
                       prefer: Literal["text", "pair"] = "pair") -> Example:
    """One JSON record -> Example. With ``prefer="text"`` a record holding the text column is
    read as text even if it also has prompt/response columns (so ``--text-column prompt``
    counts prompts); otherwise prompt/response columns make a pair."""
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    lang = rec.get(cols.lang, default_lang)
    if lang is None or str(lang).strip() == "":
        raise CorpusError(f"{where}: no '{cols.lang}' field (columns present: {sorted(rec)}); "
                          "map the language column with --lang-column")
    lang = check_lang_code(str(lang).strip(), where, cols.lang)
    rid = rec.get(cols.id)
    rid = None if rid is None else str(rid)
    has_pair = cols.prompt in rec or cols.response in rec
    if has_pair and not (prefer == "text" and cols.text in rec):
        prompt, response = rec.get(cols.prompt), rec.get(cols.response)
        for name, value in ((cols.prompt, prompt), (cols.response, response)):
            if value is None:
                other = cols.response if name == cols.prompt else cols.prompt
                raise CorpusError(f"{where}: has '{other}' but no '{name}' (columns present: {sorted(rec)}); "
                                  f"map it with --{'prompt' if name == cols.prompt else 'response'}-column")
            if not isinstance(value, str):
                raise CorpusError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
            _check_unicode(value, where, name)
        return Example(lang, prompt=prompt, response=response, id=rid, source=where)
    text = rec.get(cols.text)
    if not isinstance(text, str):
        got = "" if text is None else f" ('{cols.text}' is a {type(text).__name__})"
        raise CorpusError(f"{where}: no text column '{cols.text}'{got} (columns present: {sorted(rec)}); "
                          "map it with --text-column, or give 'prompt' and 'response'")
    return Example(lang, text=_check_unicode(text, where, cols.text), id=rid, source=where)


def _check_one_kind(examples: Sequence[Example], what: str) -> None:
    """Texts and prompt/response pairs mixed in one language would be counted differently
    (the response scope needs pairs): almost always a column mix-up, so refuse it."""
    kinds = {ex.is_pair for ex in examples}
    if len(kinds) > 1:
        first_text = next(ex for ex in examples if not ex.is_pair)
        first_pair = next(ex for ex in examples if ex.is_pair)
        raise CorpusError(f"{what} mixes plain texts ({first_text.source or 'a record'}) and prompt/response pairs "
                          f"({first_pair.source or 'a record'}); give each language one kind of record")


def read_jsonl(path: Path, cols: ColumnMap = ColumnMap(), default_lang: str | None = None,
               prefer: Literal["text", "pair"] = "pair") -> list[Example]:
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{i}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise CorpusError(f"{path}:{i}: JSON nested too deeply") from None
        out.append(_record_to_example(rec, cols, default_lang, f"{path}:{i}", prefer))
    return out


def read_hf_dataset(path: Path, cols: ColumnMap = ColumnMap(), split: str | None = None,
                    prefer: Literal["text", "pair"] = "pair") -> list[Example]:
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
    as_pairs = (cols.prompt in columns or cols.response in columns) and not (prefer == "text" and cols.text in columns)
    wanted = [cols.lang] + ([cols.prompt, cols.response] if as_pairs else [cols.text])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise CorpusError(f"{path}: unknown column(s) {missing}; the dataset has {sorted(columns)} "
                          "(map them with --lang-column/--text-column/--prompt-column/--response-column)")
    return [_record_to_example(rec, cols, None, f"{path}[{i}]", prefer) for i, rec in enumerate(ds)]


def _group(examples: Iterable[Example]) -> dict[str, list[Example]]:
    by_lang: dict[str, list[Example]] = {}
    for ex in examples:
        by_lang.setdefault(ex.lang, []).append(ex)
    return by_lang


_FLORES_SUFFIXES = (".dev", ".devtest")


def _corpus_files(p: Path) -> list[tuple[Path, str]]:
    """(file, language) pairs of a corpus directory.

    ``<lang>.txt`` / ``<lang>.jsonl``; FLORES-style ``<lang>.dev`` / ``<lang>.devtest`` (e.g.
    ``eng_Latn.devtest``: one sentence per line, parallel across languages); MGSM-style
    ``mgsm_<lang>.tsv`` (question TAB answer, no header).
    """
    out = []
    for f in sorted(p.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if f.suffix in (".txt", ".jsonl") + _FLORES_SUFFIXES:
            out.append((f, f.stem))
        elif f.suffix == ".tsv":
            out.append((f, f.stem[len("mgsm_"):] if f.stem.startswith("mgsm_") else f.stem))
    for f, lang in out:  # the file name is the language: the same rule as a JSONL 'lang' field
        check_language_name(lang, str(f), what="file name's language",
                            hint="; rename the file to <lang>.txt (or .jsonl, .dev, .devtest, mgsm_<lang>.tsv)")
    return out


def read_tsv_pairs(path: Path, lang: str, prefer: Literal["text", "pair"] = "pair") -> list[Example]:
    """MGSM-style TSV: ``question<TAB>answer`` per line, no header. As text (``--scope all``)
    the question is the document; as pairs the answer is the response."""
    out = []
    for i, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise CorpusError(f"{path}:{i}: expected 'question<TAB>answer' (MGSM layout), found no tab")
        question, answer = parts[0].strip(), parts[-1].strip()
        if prefer == "text":
            out.append(Example(lang, text=question, id=str(i), source=f"{path}:{i}"))
        else:
            out.append(Example(lang, prompt=question, response=answer, id=str(i), source=f"{path}:{i}"))
    return out


def load_corpus(path: str | Path | None = None, langs: Sequence[str] | None = None, *,
                kind: Literal["text", "qa", "auto"] = "auto", doc_sep: DocSep = "line",
                columns: ColumnMap = ColumnMap(), split: str | None = None) -> Corpus:
    """Read a corpus and check that every requested language has at least one example."""
    if path is not None and str(path).startswith(HF_PREFIX):
        prefer_hf: Literal["text", "pair"] = "text" if kind == "text" else "pair"
        return _checked(read_hf_corpus(str(path), langs, columns=columns, prefer=prefer_hf), str(path), langs, kind)
    p = Path(path) if path is not None else default_corpus_path()
    if not p.exists():
        raise CorpusError(f"corpus {p} does not exist; give a directory of <lang>.txt/.jsonl files, "
                          "a .jsonl file or a saved Hugging Face dataset")
    if p.is_dir() and (p / "text").is_dir() or p.is_dir() and (p / "qa").is_dir():
        sub = "text" if kind in ("text", "auto") and (p / "text").is_dir() else "qa"
        if kind == "qa" and not (p / "qa").is_dir():
            raise CorpusError(f"{p} has no qa/ directory of prompt/response pairs")
        p = p / sub
    prefer: Literal["text", "pair"] = "text" if kind == "text" else "pair"
    if p.is_file():
        if p.suffix != ".jsonl":
            raise CorpusError(f"{p}: a single corpus file must be .jsonl with a '{columns.lang}' column; "
                              "for plain text use a directory of <lang>.txt files")
        by_lang = _group(read_jsonl(p, columns, prefer=prefer))
    elif (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
        by_lang = _group(read_hf_dataset(p, columns, split, prefer))
    else:
        by_lang = {}
        files = _corpus_files(p)
        if not files:
            raise CorpusError(f"{p} holds no <lang>.txt, <lang>.jsonl, FLORES-style <lang>.dev/.devtest or "
                              "mgsm_<lang>.tsv files")
        available = list(dict.fromkeys(lang for _, lang in files))
        unknown = [x for x in langs or () if x not in available]
        if unknown:  # name every language of the directory, not only the requested ones found
            raise CorpusError(f"languages {','.join(unknown)} are not in the corpus {p} "
                              f"(it has: {','.join(available)})")
        for f, lang in files:
            if langs and lang not in langs:
                continue
            if f.suffix == ".jsonl":
                exs = read_jsonl(f, columns, lang, prefer)
            elif f.suffix == ".tsv":
                exs = read_tsv_pairs(f, lang, prefer)
            else:  # .txt, and FLORES' one-sentence-per-line .dev/.devtest files
                exs = read_text_file(f, lang, doc_sep)
            for ex in exs:
                if ex.lang != lang:
                    raise CorpusError(f"{ex.source}: language {ex.lang!r} inside the file for {lang!r}")
            by_lang.setdefault(lang, []).extend(exs)
    return _checked(by_lang, p, langs, kind)


def _checked(by_lang: dict[str, list[Example]], p: Path | str, langs: Sequence[str] | None, kind: str) -> Corpus:
    """The requested languages of a corpus, each non-empty and of one kind of record."""
    corpus = Corpus(by_lang, str(p))
    corpus = corpus.select(langs) if langs else corpus
    if not corpus.by_lang:
        raise CorpusError(f"corpus {p} is empty: it holds no documents")
    for lang, exs in corpus.by_lang.items():
        if not exs:
            raise CorpusError(f"language {lang!r} has no documents in {p}")
        _check_one_kind(exs, f"language {lang!r} of {p}")
        if kind == "qa" and not exs[0].is_pair:
            raise CorpusError(f"{exs[0].source or p}: the 'response' scope needs prompt/response pairs, but language "
                              f"{lang!r} holds plain texts; map --prompt-column/--response-column or use --scope all")
    return corpus


# -- Hugging Face datasets: hf:REPO[:CONFIG][@SPLIT] ----------------------------------------------
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class HfSpec:
    """Where a corpus lives on the hub (or in the datasets cache, or a local dataset directory).

    ``config`` and ``split`` may be language templates such as ``{iso_639_3}_{iso_15924}``
    (see `langcodes.format_language`): the dataset is then loaded once per requested language.
    ``text`` names the text column when the user kept the default one; ``dedupe`` drops repeated
    texts (Belebele repeats each passage for each of its questions)."""

    repo: str
    config: str | None = None
    split: str | None = None
    text: str | None = None
    dedupe: bool = False
    about: str = ""

    @property
    def templated(self) -> bool:
        return "{" in (self.config or "") or "{" in (self.split or "")


#: ``hf:flores`` / ``hf:belebele``: parallel FLORES-200 sentences (dev split; ``hf:flores@devtest``)
#: and the Belebele passages (themselves FLORES-200 text), one config per language in FLORES form.
HF_PRESETS: dict[str, HfSpec] = {
    "flores": HfSpec("openlanguagedata/flores_plus", "{iso_639_3}_{iso_15924}", "dev", "text",
                     about="FLORES+ (FLORES-200), parallel sentences"),
    "belebele": HfSpec("facebook/belebele", "{iso_639_3}_{iso_15924}", "test", "flores_passage", dedupe=True,
                       about="Belebele passages (accuracy: `ablate --metric choice_accuracy --choice-corpus hf:belebele`)"),
}


def parse_hf_spec(spec: str) -> HfSpec:
    """``hf:REPO[:CONFIG][@SPLIT]`` or a preset (``hf:flores``, ``hf:belebele@test``)."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    body, at, split = body.rpartition("@") if "@" in body else (body, "", "")
    repo, _, config = body.partition(":")
    if not repo.strip():
        raise CorpusError(f"corpus {spec!r}: give hf:REPO[:CONFIG][@SPLIT], e.g. hf:facebook/belebele:deu_Latn@test "
                          f"or a preset ({', '.join('hf:' + k for k in HF_PRESETS)})")
    preset = HF_PRESETS.get(repo)
    if preset is not None:
        return HfSpec(preset.repo, config or preset.config, split or preset.split, preset.text, preset.dedupe,
                      preset.about)
    return HfSpec(repo, config or None, split or None)


def load_hf_split(spec: HfSpec, config: str | None, split: str | None, where: str) -> object:
    """One dataset split: a ``save_to_disk`` directory, else ``datasets.load_dataset`` (the
    datasets cache first; the hub unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError("reading a Hugging Face dataset needs the 'datasets' package: "
                          "pip install 'langneurons[datasets]'") from None
    local = Path(spec.repo).expanduser()
    try:
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(spec.repo, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs one line
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CorpusError(f"{where}: cannot load the dataset ({text}); check the repo, config and split, and that it "
                          "is in the datasets cache when offline (HF_HUB_OFFLINE)") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else names[0]
        if split not in ds:
            raise CorpusError(f"{where}: no split {split!r} (has {names})")
        ds = ds[split]
    return ds


def _hf_examples(ds: object, cols: ColumnMap, lang: str | None, where: str, prefer: Literal["text", "pair"],
                 dedupe: bool) -> list[Example]:
    columns = set(ds.column_names)  # type: ignore[attr-defined]
    as_pairs = (cols.prompt in columns or cols.response in columns) and not (prefer == "text" and cols.text in columns)
    wanted = ([] if lang is not None else [cols.lang]) + ([cols.prompt, cols.response] if as_pairs else [cols.text])
    missing = [c for c in wanted if c not in columns]
    if missing:
        hint = (" or give a language template (hf:REPO:{iso_639_3}_{iso_15924})" if cols.lang in missing else "")
        raise CorpusError(f"{where}: unknown column(s) {missing}; the dataset has {sorted(columns)} (map them with "
                          f"--lang-column/--text-column/--prompt-column/--response-column{hint})")
    keep = [c for c in (cols.lang, cols.text, cols.prompt, cols.response, cols.id) if c in columns]
    out: list[Example] = []
    seen: set[tuple] = set()
    for i, rec in enumerate(ds.select_columns(keep)):  # type: ignore[attr-defined]
        ex = _record_to_example(rec, cols, lang, f"{where}[{i}]", prefer)
        if lang is not None and ex.lang != lang:
            ex = Example(lang, ex.text, ex.prompt, ex.response, ex.id, ex.source)
        if dedupe:
            key = (ex.lang, ex.text, ex.prompt, ex.response)
            if key in seen:
                continue
            seen.add(key)
        out.append(ex)
    return out


def read_hf_corpus(spec: str, langs: Sequence[str] | None = None, *, columns: ColumnMap = ColumnMap(),
                   prefer: Literal["text", "pair"] = "pair") -> dict[str, list[Example]]:
    """Examples per language from ``hf:REPO[:CONFIG][@SPLIT]``.

    Languages come from a language template in CONFIG/SPLIT (one load per requested language,
    labelled as the user wrote it: ``--langs de`` loads ``deu_Latn``), else from the language
    column, whose values are matched to the requested languages in any code form (a ``deu_Latn``
    column value answers ``--langs de``)."""
    from .langcodes import format_language, same_language

    hf = parse_hf_spec(spec)
    cols = columns if columns.text != "text" or hf.text is None else ColumnMap(
        columns.lang, hf.text, columns.prompt, columns.response, columns.id)
    if hf.templated:
        if not langs:
            raise CorpusError(f"corpus {spec}: a language template loads one dataset per language; give --langs "
                              "(e.g. en,de,zh)")
        by_lang: dict[str, list[Example]] = {}
        for lang in langs:
            config = format_language(hf.config, lang) if hf.config else None
            split = format_language(hf.split, lang) if hf.split else None
            where = f"hf:{hf.repo}:{config or ''}@{split or ''}"
            by_lang[lang] = _hf_examples(load_hf_split(hf, config, split, where), cols, lang, where, prefer, hf.dedupe)
        return by_lang
    where = f"hf:{hf.repo}:{hf.config or ''}@{hf.split or ''}"
    ds = load_hf_split(hf, hf.config, hf.split, where)
    single = langs[0] if langs and len(langs) == 1 and cols.lang not in set(ds.column_names) else None  # type: ignore[attr-defined]
    grouped = _group(_hf_examples(ds, cols, single, where, prefer, hf.dedupe))
    if langs:  # a deu_Latn column value answers --langs de (and de answers deu_Latn)
        for want in langs:
            if want not in grouped:
                match = next((have for have in grouped if same_language(have, want)), None)
                if match is not None:
                    grouped[want] = [Example(want, e.text, e.prompt, e.response, e.id, e.source)
                                     for e in grouped.pop(match)]
    return grouped
