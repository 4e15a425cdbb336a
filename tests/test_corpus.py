import json

import pytest

from ci import require_module

from langneurons.corpus import ColumnMap, Example, load_corpus
from langneurons.errors import CorpusError


def test_txt_directory_line_and_blank(tmp_path):
    (tmp_path / "en.txt").write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    (tmp_path / "de.txt").write_text("erstes\nzweites\n", encoding="utf-8")
    c = load_corpus(tmp_path)
    assert c.languages == ["de", "en"]
    assert [e.text for e in c.by_lang["en"]] == ["first doc", "second doc"]
    (tmp_path / "fr.txt").write_text("un\ndeux\n\ntrois\n", encoding="utf-8")
    c = load_corpus(tmp_path, ["fr"], doc_sep="blank")
    assert [e.text for e in c.by_lang["fr"]] == ["un\ndeux", "trois"]


def test_non_utf8_names_line(tmp_path):
    (tmp_path / "en.txt").write_bytes(b"ok line\nsecond\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"en.txt:3: not valid UTF-8"):
        load_corpus(tmp_path)


def test_jsonl_text_and_pairs_and_columns(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"lang": "en", "text": "hi"}, {"lang": "zh", "prompt": "问", "response": "答"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    c = load_corpus(f)
    assert c.by_lang["en"][0].text == "hi"
    assert c.by_lang["zh"][0].is_pair and c.by_lang["zh"][0].response == "答"
    g = tmp_path / "d.jsonl"
    g.write_text(json.dumps({"language": "en", "sentence": "hello"}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no 'lang' field"):
        load_corpus(g)
    c = load_corpus(g, columns=ColumnMap(lang="language", text="sentence"))
    assert c.by_lang["en"][0].text == "hello"
    with pytest.raises(CorpusError, match="no text column 'text'"):
        load_corpus(g, columns=ColumnMap(lang="language"))


def test_bad_json_line_and_missing_language(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"lang": "en", "text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c.jsonl:2: invalid JSON"):
        load_corpus(f)
    f.write_text('{"lang": "en", "text": "a"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="not in the corpus"):
        load_corpus(f, ["en", "sw"])


def test_empty_language_file(tmp_path):
    (tmp_path / "en.txt").write_text("x\n", encoding="utf-8")
    (tmp_path / "sw.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="'sw' has no documents"):
        load_corpus(tmp_path)
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope")


def test_hf_dataset_on_disk(tmp_path):
    datasets = require_module("datasets")
    ds = datasets.Dataset.from_dict({"language": ["en", "de", "en"], "content": ["a b", "c d", "e f"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    c = load_corpus(tmp_path / "ds", columns=ColumnMap(lang="language", text="content"))
    assert [e.text for e in c.by_lang["en"]] == ["a b", "e f"]
    with pytest.raises(CorpusError, match="unknown column"):
        load_corpus(tmp_path / "ds")


def test_split_is_parallel_and_deterministic():
    from langneurons.corpus import Corpus

    c = Corpus({x: [Example(x, text=f"{x}{i}") for i in range(10)] for x in ("en", "de")})
    a, b = c.split(0.2)
    assert [e.text[2:] for e in b.by_lang["en"]] == [e.text[2:] for e in b.by_lang["de"]] == ["0", "5"]
    assert len(a.by_lang["en"]) == 8


def test_flores_style_directory(tmp_path):
    (tmp_path / "eng_Latn.devtest").write_text("One sentence.\nTwo sentences.\n", encoding="utf-8")
    (tmp_path / "zho_Hans.devtest").write_text("一句话。\n两句话。\n", encoding="utf-8")
    c = load_corpus(tmp_path, ["eng_Latn", "zho_Hans"])
    assert c.languages == ["eng_Latn", "zho_Hans"]
    assert [e.text for e in c.by_lang["zho_Hans"]] == ["一句话。", "两句话。"]


def test_mgsm_tsv_directory(tmp_path):
    (tmp_path / "mgsm_en.tsv").write_text("Tom has 3 apples and buys 2. How many?\t5\n", encoding="utf-8")
    (tmp_path / "mgsm_de.tsv").write_text("Tom hat 3 Äpfel und kauft 2. Wie viele?\t5\n", encoding="utf-8")
    qa = load_corpus(tmp_path, kind="qa")
    assert qa.languages == ["de", "en"] and qa.by_lang["en"][0].prompt.startswith("Tom has") and qa.by_lang["en"][0].response == "5"
    text = load_corpus(tmp_path, kind="text")
    assert text.by_lang["de"][0].text.startswith("Tom hat") and not text.by_lang["de"][0].is_pair
    (tmp_path / "mgsm_fr.tsv").write_text("pas de tabulation\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"mgsm_fr.tsv:1: expected 'question<TAB>answer'"):
        load_corpus(tmp_path, kind="qa")


# -- UTF-16 and NUL characters are not text (issue 19, item 6) ---------------------------------
@pytest.mark.parametrize("encoding,bom,expected", [
    ("utf-16-le", b"", "UTF-16LE without a byte-order mark"),
    ("utf-16-be", b"", "UTF-16BE without a byte-order mark"),
    ("utf-16-le", b"\xff\xfe", "UTF-16LE with a byte-order mark"),
    ("utf-16-be", b"\xfe\xff", "UTF-16BE with a byte-order mark"),
])
@pytest.mark.parametrize("text", ["The cat sat.\nA dog ran.\n", "猫坐在垫子上。\n我们去了市场。\n"])
def test_utf16_files_are_refused_naming_the_encoding(tmp_path, encoding, bom, expected, text):
    (tmp_path / "en.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "de.txt").write_bytes(bom + text.encode(encoding))
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / 'de.txt'}:1: {expected}, not UTF-8")


def test_nul_characters_are_refused_with_line_and_share(tmp_path):
    (tmp_path / "en.txt").write_bytes(b"one\ntwo\nth\x00r\x00e\n")
    with pytest.raises(CorpusError) as exc:
        load_corpus(tmp_path)
    # 2 NULs among 15 characters (odd length: not UTF-16), the first on line 3
    assert str(exc.value).startswith(f"{tmp_path / 'en.txt'}:3: holds NUL characters (2 of 15 characters, 13.3%)")
    (tmp_path / "en.txt").write_bytes(b'{"text": "a\\u0000b"}\n')
    (tmp_path / "en.txt").rename(tmp_path / "en.jsonl")
    with pytest.raises(CorpusError, match=r"en.jsonl:1: 'text' holds NUL characters \(1 of 3 characters"):
        load_corpus(tmp_path)
