"""tasks.py: one reader for MGSM / MSVAMP / JSONL question sets and one answer parser."""

from __future__ import annotations

import json

import pytest

from langneurons.align import read_questions
from langneurons.errors import CorpusError
from langneurons.evaluate import read_mgsm
from langneurons.tasks import answer_number, extract_final_number, lang_from_filename, read_task, same_number


def one_line(exc) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_mgsm_tsv_in_the_published_shape(tmp_path):
    # google-research/url-nlp MGSM: mgsm_<lang>.tsv, question<TAB>answer, no header
    (tmp_path / "mgsm_en.tsv").write_text(
        "Janet’s ducks lay 16 eggs per day. She eats three for breakfast. How much does she make?\t18\n"
        "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?\t3\n", encoding="utf-8")
    (tmp_path / "mgsm_bn.tsv").write_text("জ্যানেটের হাঁসগুলি প্রতিদিন ১৬টি করে ডিম পাড়ে।\t18\n"
                                          "একটি পোশাক তৈরি করতে 2টি নীল ফাইবার লাগে।\t3\n", encoding="utf-8")
    exs = read_task(tmp_path)
    assert [(e.lang, e.id, e.answer) for e in exs] == [("bn", "1", "18"), ("bn", "2", "3"), ("en", "1", "18"),
                                                      ("en", "2", "3")]
    assert [e.lang for e in read_task(tmp_path, "en")] == ["en", "en"]
    with pytest.raises(CorpusError) as exc:
        read_task(tmp_path, langs=["en", "de"])
    assert "no questions for de" in one_line(exc) and "languages present: bn, en" in one_line(exc)


def test_hf_mgsm_rows_jsonl(tmp_path):
    # juletxara/mgsm rows: question, answer (worked solution in train, null in test), answer_number, equation_solution
    rows = [{"question": "Roger has 5 tennis balls. He buys 2 more cans of 3. How many now?",
             "answer": "Step-by-step answer: 5 + 2*3 = 11. The answer is 11.", "answer_number": 11,
             "equation_solution": "5 + 6 = 11."},
            {"question": "Janet has 1,200 eggs.", "answer": None, "answer_number": 1200, "equation_solution": None}]
    f = tmp_path / "mgsm_de.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    a, b = read_task(f)
    assert (a.lang, a.id, a.answer) == ("de", "1", "11") and a.answer_text.startswith("Step-by-step")
    assert (b.answer, b.answer_text, b.reference) == ("1200", None, "1200")
    [m1, m2] = read_mgsm(f)
    assert m1.answer == "11" and m1.prompt == rows[0]["question"] and m2.answer == "1200"


@pytest.mark.parametrize("qkey,akey", [("m_query", "response"), ("input", "output")])
def test_msvamp_json(tmp_path, qkey, akey):
    # MathOctopus MSVAMP test_<Language>.json: a list of {m_query, response} (or input/output)
    data = [{qkey: "সীতার 3টি আপেল ছিল, সে আরও 5টি কিনল। মোট কতগুলি?", akey: 8.0},
            {qkey: "রামের 10টি বই ছিল।\u2028সে 4টি ধার দিল। কতগুলি রইল?", akey: "6"}]
    f = tmp_path / "test_Bengali.json"
    f.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    exs = read_task(f)
    assert [(e.lang, e.id, e.answer) for e in exs] == [("bn", "1", "8"), ("bn", "2", "6")]
    assert "\u2028" in exs[1].question  # never a line break inside a question


def test_jsonl_with_ids_and_u2028_and_parallel_checks(tmp_path):
    f = tmp_path / "questions.jsonl"
    f.write_text(json.dumps({"lang": "en", "id": "q1", "question": "One\u2028two? 3", "answer": "3"}) + "\n"
                 + json.dumps({"lang": "zh", "id": "q1", "question": "一二？３", "answer": 3}) + "\n", encoding="utf-8")
    exs = read_task(f)
    assert [(e.lang, e.id, e.answer) for e in exs] == [("en", "q1", "3"), ("zh", "q1", "3")]
    assert [q.answer for q in read_questions(f)] == ["3", "3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"lang": "en", "text": "x", "solution": 1}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError) as exc:
        read_task(bad)
    assert "bad.jsonl:1: no question field" in one_line(exc) and "the fields are lang, solution, text" in one_line(exc)


def test_lang_from_filename():
    from pathlib import Path

    got = {n: lang_from_filename(Path(n)) for n in ["mgsm_de.tsv", "test_zh.json", "fr.jsonl", "test_Bengali.json",
                                                    "questions.jsonl", "dev.jsonl", "mgsm_zh-CN.tsv"]}
    assert got == {"mgsm_de.tsv": "de", "test_zh.json": "zh", "fr.jsonl": "fr", "test_Bengali.json": "bn",
                   "questions.jsonl": None, "dev.jsonl": None, "mgsm_zh-CN.tsv": "zh-CN"}


@pytest.mark.parametrize("a,b,want", [("1,000", 1000, True), (8.0, "8", True), ("The answer is 12.", 12, True),
                                      ("3", "4", False), ("three", 3, None), (None, 3, None)])
def test_same_number(a, b, want):
    assert same_number(a, b) is want


def test_answer_number():
    from decimal import Decimal

    cases = {"1,234": "1234", "1.234": "1234", "0.125": "0.125", "-5": "-5", "২৫": "25", "１２": "12", "2,5": "2.5",
             "Step 1: 3+4=7. The answer is 7.": "7"}
    for raw, want in cases.items():
        assert answer_number(raw) == Decimal(want) and extract_final_number(raw) == want
    assert answer_number(8.0) == 8 and answer_number(float("nan")) is None and answer_number(True) is None
