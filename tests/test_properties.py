"""Property-based tests (hypothesis): the corpus readers give back exactly what was written and
name the right line in errors; merging stats is exact addition, whatever the order or grouping."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langneurons.corpus import ColumnMap, load_corpus
from langneurons.errors import CorpusError
from langneurons.runs import RunDir
from langneurons.stats import LanguageStats, load_language_stats, merge_language_stats, merge_runs

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any Unicode scalar value except surrogates (not encodable as UTF-8) and the BOM (dropped at the
# start of a file on purpose; tested separately).
# NUL is refused as "not text" (test_corpus.py::test_nul_characters_are_refused_with_line_and_share)
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufeff\x00")
LINE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufeff\n\r\x00")
LANGS = st.sampled_from(["en", "de", "zh-Hans", "pt_BR", "eng_Latn", "sw"])


@pytest.fixture(autouse=True)
def _cleanup_tmpdirs():
    yield
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)


_MADE: list[Path] = []


def tmpdir() -> Path:
    """A fresh directory per hypothesis example (function-scoped fixtures are shared between
    examples); removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="props-"))
    _MADE.append(path)
    return path


# -- corpus readers -------------------------------------------------------------------------


@SETTINGS
@given(lines=st.lists(st.one_of(st.text(LINE_CHARS, max_size=40), st.sampled_from(["", " ", "\t"])), max_size=30),
       crlf=st.booleans(), bom=st.booleans(), final_newline=st.booleans())
def test_txt_line_mode_reads_back_every_document_with_its_line(lines, crlf, bom, final_newline):
    expected = [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
    root = tmpdir()
    nl = "\r\n" if crlf else "\n"
    body = nl.join(lines) + (nl if final_newline and lines else "")
    (root / "en.txt").write_bytes((("\ufeff" if bom else "") + body).encode("utf-8"))
    if not expected:
        with pytest.raises(CorpusError, match="has no documents"):
            load_corpus(root)
        return
    got = load_corpus(root).by_lang["en"]
    assert [(int(ex.id), ex.text) for ex in got] == expected
    assert all(ex.source == f"{root / 'en.txt'}:{ex.id}" for ex in got)


@SETTINGS
@given(paragraphs=st.lists(st.lists(st.text(LINE_CHARS, min_size=1, max_size=20).filter(lambda s: s.strip()),
                                    min_size=1, max_size=4), min_size=1, max_size=8),
       gaps=st.integers(1, 3))
def test_txt_blank_mode_reads_back_paragraphs(paragraphs, gaps):
    root = tmpdir()
    text = ("\n" * (gaps + 1)).join("\n".join(p) for p in paragraphs) + "\n"
    (root / "fr.txt").write_text(text, encoding="utf-8")
    got = load_corpus(root, doc_sep="blank").by_lang["fr"]
    assert [ex.text for ex in got] == ["\n".join(line.strip() for line in p) for p in paragraphs]


records = st.lists(st.tuples(LANGS, st.one_of(st.text(CHARS, max_size=40),
                                               st.tuples(st.text(CHARS, max_size=20), st.text(CHARS, max_size=20)))),
                   min_size=1, max_size=25)


@SETTINGS
@given(recs=records, ascii_only=st.booleans())
def test_jsonl_reads_back_any_unicode(recs, ascii_only):
    # one kind of record per language (mixing is refused, tested elsewhere): the first wins
    kind = {}
    recs = [(lang, v) for lang, v in recs if kind.setdefault(lang, isinstance(v, tuple)) == isinstance(v, tuple)]
    root = tmpdir()
    path = root / "all.jsonl"
    lines = []
    for lang, v in recs:
        rec = {"lang": lang, "prompt": v[0], "response": v[1]} if isinstance(v, tuple) else {"lang": lang, "text": v}
        lines.append(json.dumps(rec, ensure_ascii=ascii_only))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_corpus(path)
    expected: dict[str, list] = {}
    for lang, v in recs:
        expected.setdefault(lang, []).append(v)
    assert list(corpus.by_lang) == list(expected)
    for lang, exs in corpus.by_lang.items():
        assert [(ex.prompt, ex.response) if ex.is_pair else ex.text for ex in exs] == expected[lang]
    line_of = [int(ex.source.rsplit(":", 1)[1]) for exs in corpus.by_lang.values() for ex in exs]
    assert sorted(line_of) == list(range(1, len(recs) + 1))


BAD_LINES = {
    "json": (b'{"lang": "en", "text": ', "invalid JSON"),
    "utf8": (b'{"lang": "en", "text": "caf\xe9"}', "not valid UTF-8"),
    "object": (b"[1, 2]", "expected a JSON object"),
    "column": (b'{"lang": "en", "body": "x"}', "no text column 'text'"),
    "lang": (b'{"lang": "hello world", "text": "x"}', "is not a language code"),
}


@SETTINGS
@given(good=st.lists(st.text(CHARS, max_size=30), min_size=0, max_size=15), data=st.data(),
       bad=st.sampled_from(sorted(BAD_LINES)), ascii_only=st.booleans())
def test_errors_name_the_right_line(good, data, bad, ascii_only):
    """Even when documents hold U+2028, U+0085, form feeds or CRs (str.splitlines would split
    there), the line in the error is the file's line as every editor counts it."""
    at = data.draw(st.integers(0, len(good)))
    lines = [json.dumps({"lang": "en", "text": t}, ensure_ascii=ascii_only).encode("utf-8") for t in good]
    payload, message = BAD_LINES[bad]
    lines.insert(at, payload)
    root = tmpdir()
    (root / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CorpusError) as exc:
        load_corpus(root / "c.jsonl")
    assert str(exc.value).startswith(f"{root / 'c.jsonl'}:{at + 1}: ")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bom_and_crlf_are_not_part_of_documents():
    root = tmpdir()
    (root / "en.txt").write_bytes("\ufeffHello\r\nWorld\r\n".encode("utf-8"))
    assert [ex.text for ex in load_corpus(root).by_lang["en"]] == ["Hello", "World"]
    (root / "en.txt").unlink()
    (root / "en.jsonl").write_bytes('\ufeff{"text": "a\\u2028b"}\r\n'.encode("utf-8"))
    assert [ex.text for ex in load_corpus(root, columns=ColumnMap()).by_lang["en"]] == ["a\u2028b"]


# -- stats merge ----------------------------------------------------------------------------

L, N = 2, 5


@st.composite
def activation_parts(draw, min_parts=1, max_parts=5):
    """Raw per-token activations (multiples of 1/4, so float64 sums are exact in any order)."""
    n = draw(st.integers(min_parts, max_parts))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    sizes = [draw(st.integers(0, 12)) for _ in range(n)]
    return [torch.randint(-6, 7, (t, L, N), generator=g).to(torch.float64) / 4 for t in sizes]


def count(acts: torch.Tensor, meta: dict | None = None) -> LanguageStats:
    """The independent computation: count positives of raw activations directly."""
    return LanguageStats("en", (acts > 0).sum(0).to(torch.int64), int(acts.shape[0]), acts.sum(0), dict(meta or {}))


def same(a: LanguageStats, b: LanguageStats) -> bool:
    return torch.equal(a.positive, b.positive) and a.tokens == b.tokens and torch.equal(a.sums, b.sums)


@SETTINGS
@given(acts=activation_parts(), data=st.data())
def test_merge_equals_one_combined_count_in_any_order_and_grouping(acts, data):
    parts = [count(a) for a in acts]
    combined = count(torch.cat(acts) if acts else torch.zeros(0, L, N, dtype=torch.float64))
    total = merge_language_stats(parts)
    assert same(total, combined)
    total.validate()
    order = data.draw(st.permutations(range(len(parts))))
    assert same(merge_language_stats([parts[i] for i in order]), combined)  # order-independent
    if len(parts) >= 2:
        a, b = parts[0], parts[1]
        assert same(a + b, b + a)  # commutative
    if len(parts) >= 3:
        a, b, c = parts[:3]
        assert same((a + b) + c, a + (b + c))  # associative
    # any grouping: merge groups, then merge the group results
    cut = sorted(data.draw(st.sets(st.integers(1, max(len(parts) - 1, 1)), max_size=3)))
    groups = [parts[i:j] for i, j in zip([0] + cut, cut + [len(parts)]) if parts[i:j]]
    assert same(merge_language_stats([merge_language_stats(g) for g in groups]), combined)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(acts=activation_parts(min_parts=2, max_parts=4), data=st.data())
def test_merge_runs_of_shards_is_order_and_grouping_independent(acts, data):
    """On disk, with shard bookkeeping: shards i/n of one corpus merged in any order, or first in
    two groups whose results are merged again, give the combined count and a complete merge."""
    n = len(acts)
    root = tmpdir()
    meta = {"scope": "all", "model_fingerprint": "m", "dtype": "float32", "corpus_fingerprint": "c"}
    for i, a in enumerate(acts):
        part = count(a, dict(meta, shard=f"{i}/{n}"))
        RunDir(root / f"s{i}").write_language_stats(part)
        RunDir(root / f"s{i}").update_manifest({"languages": ["en"]})
    combined = count(torch.cat(acts))
    order = data.draw(st.permutations(range(n)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete: no warning
        merge_runs([root / f"s{i}" for i in order], root / "all")
    (got,) = load_language_stats(root / "all")
    assert same(got, combined) and got.meta["shards"] == list(range(n)) and got.meta["shards_missing"] == []
    k = data.draw(st.integers(1, n - 1))
    first, second = order[:k], order[k:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the two halves are incomplete on their own
        merge_runs([root / f"s{i}" for i in first], root / "g1")
        merge_runs([root / f"s{i}" for i in second], root / "g2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_runs([root / "g2", root / "g1"], root / "again")
    (again,) = load_language_stats(root / "again")
    assert same(again, combined)
