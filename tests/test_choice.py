"""Multiple-choice accuracy (Belebele-style) as an ablation metric: the reader's field mapping,
the scorer against a naive per-choice forward and against lm-eval on the same questions, the
matrix against separate deactivated passes, and the stage/CLI/report path."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ci import require_module
import torch

from helpers import cli_error, write_sample_corpus
from langneurons.choice import (ChoiceQuestion, choice_accuracy_matrix, encode_pair, paired_interval,
                                read_choice_questions, score_choices)
from langneurons.cli import main
from langneurons.errors import CorpusError
from langneurons.intervene import deactivate
from langneurons.models import load_model
from test_export import planted_map
from tiny import save_tiny

#: Belebele's fields (flores_passage, mc_answer1..4, correct_answer_num as a 1-based string, dialect)
BELEBELE = {
    "eng_Latn": [("The cat sat on the warm mat.", "Where did the cat sit?", ["on the mat", "in the market", "in the rain",
                                                                             "on a tree"], "1"),
                 ("We walked to the market in the morning.", "When did we walk?", ["at night", "in the morning",
                                                                                   "never", "at noon"], "2"),
                 ("It rained all day in the city.", "What happened?", ["sun", "snow", "rain", "wind"], "3")],
    "deu_Latn": [("Die Katze saß auf der warmen Matte.", "Wo saß die Katze?", ["auf der Matte", "im Markt", "im Regen",
                                                                              "am Baum"], "1"),
                 ("Wir gingen am Morgen zum Markt.", "Wann?", ["nachts", "am Morgen", "nie", "mittags"], "2")],
    "zho_Hans": [("猫坐在温暖的垫子上。", "猫坐在哪里？", ["垫子上", "市场", "雨中", "树上"], "1"),
                 ("城市里下了一整天的雨。", "发生了什么？", ["晴天", "下雪", "下雨", "刮风"], "3")],
}


def belebele_rows() -> list[dict]:
    rows = []
    for dialect, items in BELEBELE.items():
        for i, (passage, question, answers, num) in enumerate(items, 1):
            rows.append({"link": f"https://x/{i}", "question_number": i, "flores_passage": passage,
                         "question": question, **{f"mc_answer{k + 1}": a for k, a in enumerate(answers)},
                         "correct_answer_num": num, "dialect": dialect, "ds": "2023-05-03"})
    return rows


def write_belebele(path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in belebele_rows()), encoding="utf-8")
    return path


#: a tokenizer that makes " A" .. " D" one token each: the letters are scored after ONE shared
#: context (the path real tokenizers take); the default tiny tokenizer splits them (one document
#: per choice). Every scoring test runs on both.
LETTER_TEXTS = ("Answer: A B C D",) * 30


@pytest.fixture(scope="module", params=["per-choice", "shared-context"])
def tiny(tmp_path_factory, request):
    from langneurons.choice import _plan

    root = tmp_path_factory.mktemp("choice")
    model_dir = save_tiny(root / "model", extra_texts=LETTER_TEXTS if request.param == "shared-context" else ())
    loaded = load_model(model_dir, device="cpu")
    data = write_belebele(root / "belebele.jsonl")
    questions = read_choice_questions(data, ["en", "de", "zh"])
    plan = _plan(loaded.tokenizer, [q for v in questions.values() for q in v], 1 << 20)
    shared = request.param == "shared-context"
    assert (len(plan.contexts), len(plan.docs) == 0) == ((7, True) if shared else (0, False))
    return {"root": root, "model_dir": model_dir, "model": loaded.model, "tok": loaded.tokenizer, "data": data,
            "questions": questions, "nmap": planted_map(2, 48, langs=("en", "de", "zh"), seed=1)}


# -- reading ----------------------------------------------------------------------------------------
def test_belebele_fields_and_language_codes(tiny):
    qs = tiny["questions"]
    assert list(qs) == ["en", "de", "zh"]  # deu_Latn answers the map's "de"
    q = qs["de"][1]
    assert q.answer == 1 and q.choices == ("nachts", "am Morgen", "nie", "mittags") and q.lang == "de"
    assert q.prompt() == ("P: Wir gingen am Morgen zum Markt.\nQ: Wann?\nA: nachts\nB: am Morgen\nC: nie\n"
                          "D: mittags\nAnswer:")
    assert q.id == "https://x/2#2"
    assert set(read_choice_questions(tiny["data"])) == {"eng_Latn", "deu_Latn", "zho_Hans"}
    assert [len(v) for v in read_choice_questions(tiny["data"], ["en", "zh"], max_per_lang=1).values()] == [1, 1]


@pytest.mark.parametrize("answer,expected", [(2, 2), ("C", 2), ("c", 2), ("rain", 2), ("0", 0)])
def test_generic_fields_and_answer_forms(tmp_path, answer, expected):
    d = tmp_path / "mc"
    d.mkdir()
    (d / "fr.jsonl").write_text(json.dumps({"question": "Quoi ?", "choices": ["sun", "snow", "rain"],
                                            "answer": answer}) + "\n", encoding="utf-8")
    (d / "deu_Latn.jsonl").write_text(json.dumps({"question": "Was?", "options": ["a", "b"], "label": 1}) + "\n",
                                      encoding="utf-8")
    qs = read_choice_questions(d)
    assert qs["fr"][0].answer == expected and qs["fr"][0].prompt().startswith("Q: Quoi ?\nA: sun\n")
    assert qs["deu_Latn"][0].answer == 1


@pytest.mark.parametrize("rec,message", [
    ({"question": "q", "choices": ["a", "b"], "lang": "en"}, "no answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5, "lang": "en"}, "outside the 2 choices"),
    ({"question": "q", "choices": ["a"], "answer": 0, "lang": "en"}, "at least two text choices"),
    ({"choices": ["a", "b"], "answer": 0, "lang": "en"}, "no 'question'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 0}, "no language"),
    ({"question": "q", "choices": ["a", "b"], "correct_answer_num": "x", "lang": "en"}, "not a number"),
])
def test_bad_records_are_one_line(tmp_path, rec, message):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=message) as err:
        read_choice_questions(p)
    assert "\n" not in str(err.value) and "q.jsonl:1" in str(err.value)


def test_missing_language_is_named(tiny):
    with pytest.raises(CorpusError, match="no multiple-choice questions for ru"):
        read_choice_questions(tiny["data"], ["en", "ru"])


def test_hf_dataset_directory(tiny, tmp_path):
    datasets = require_module("datasets")
    ds = datasets.Dataset.from_list(belebele_rows())
    ds.save_to_disk(str(tmp_path / "bb"))
    qs = read_choice_questions(f"hf:{tmp_path / 'bb'}", ["zh", "en"])
    assert [len(qs["zh"]), len(qs["en"])] == [2, 3]
    assert qs["en"][0] == tiny["questions"]["en"][0].__class__(**{**tiny["questions"]["en"][0].__dict__,
                                                                  "source": qs["en"][0].source})


# -- scoring ---------------------------------------------------------------------------------------
def naive_loglik(model, tok, q: ChoiceQuestion) -> list[float]:
    """One unbatched, unpadded forward per choice; log-probabilities summed in float64."""
    out = []
    for label in q.labels:
        ctx, cont = encode_pair(tok, q.prompt(), " " + label)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        out.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
    return out


def test_scores_equal_a_naive_forward_per_choice(tiny):
    qs = [q for v in tiny["questions"].values() for q in v]
    got = score_choices(tiny["model"], tiny["tok"], qs, batch_size=3)
    for q, ll, pred in zip(qs, got.loglik, got.predicted):
        ref = naive_loglik(tiny["model"], tiny["tok"], q)
        assert ll == pytest.approx(ref, abs=2e-4)
        assert pred == max(range(len(ref)), key=lambda i: ref[i])
    assert got.accuracy == sum(p == q.answer for p, q in zip(got.predicted, qs)) / len(qs)


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole(tiny):
    tok = tiny["tok"]
    ctx, cont = encode_pair(tok, "Answer: ", "B")
    assert ctx + cont == list(tok("Answer: B").input_ids)
    assert ctx == list(tok("Answer:").input_ids)[:len(ctx)]


def test_same_log_likelihoods_as_lm_eval_with_and_without_deactivation(tiny, tmp_path):
    lm_eval = require_module("lm_eval")
    import datasets
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    datasets.config.HF_DATASETS_CACHE = tmp_path / "ds-cache"
    en = tmp_path / "en.jsonl"
    en.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in belebele_rows()
                          if r["dialect"] == "eng_Latn"), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # the layout of lm-eval's belebele tasks, on local data
    (tasks / "bb.yaml").write_text(
        f"task: ln_bb_en\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {en}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"P: {{flores_passage}}\\nQ: {{question.strip()}}\\nA: {{mc_answer1}}\\nB: {{mc_answer2}}"
        "\\nC: {{mc_answer3}}\\nD: {{mc_answer4}}\\nAnswer:\"\n"
        "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\n"
        "doc_to_target: \"{{['1', '2', '3', '4'].index(correct_answer_num)}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n",
        encoding="utf-8")
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    hf = HFLM(pretrained=str(tiny["model_dir"]), device="cpu", batch_size=2)
    mask = tiny["nmap"].language_mask("en", ("specific", "related"))
    assert mask.any()
    qs = tiny["questions"]["en"]
    for intervene in (False, True):
        if intervene:
            with deactivate(hf.model, mask):
                out = lm_eval.simple_evaluate(model=hf, tasks=["ln_bb_en"], task_manager=tm, log_samples=True,
                                              bootstrap_iters=0)
            with deactivate(tiny["model"], mask):
                ours = score_choices(tiny["model"], tiny["tok"], qs)
        else:
            out = lm_eval.simple_evaluate(model=hf, tasks=["ln_bb_en"], task_manager=tm, log_samples=True,
                                          bootstrap_iters=0)
            ours = score_choices(tiny["model"], tiny["tok"], qs)
        samples = sorted(out["samples"]["ln_bb_en"], key=lambda s: s["doc_id"])
        theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        for a, b in zip(ours.loglik, theirs):
            assert a == pytest.approx(b, abs=2e-4)
        assert ours.correct == [bool(s["acc"]) for s in samples]
        assert ours.accuracy == pytest.approx(out["results"]["ln_bb_en"]["acc,none"])


# -- the matrix ------------------------------------------------------------------------------------
def test_matrix_equals_separate_deactivated_passes(tiny):
    qs, nmap = tiny["questions"], tiny["nmap"]
    preds: list[dict] = []
    df = choice_accuracy_matrix(tiny["model"], tiny["tok"], nmap, qs, neuron_sets=["specific,related"],
                                control="layer", control_seeds=[0, 1], progress=False, batch_size=4,
                                predictions=preds, bootstrap=200)
    base = {j: score_choices(tiny["model"], tiny["tok"], v).correct for j, v in qs.items()}
    for k in nmap.languages:
        with deactivate(tiny["model"], nmap.language_mask(k, ("specific", "related"))):
            abl = {j: score_choices(tiny["model"], tiny["tok"], v).correct for j, v in qs.items()}
        for j in qs:
            row = df[(df.neuron_set == "specific,related") & (df.deactivated_lang == k) & (df.eval_lang == j)].iloc[0]
            assert row.metric == "choice_accuracy" and row.n_docs == len(qs[j])
            assert row.base == pytest.approx(sum(base[j]) / len(base[j]))
            assert row.ablated == pytest.approx(sum(abl[j]) / len(abl[j]))
            assert row.ci_low - 1e-12 <= row.delta <= row.ci_high + 1e-12 or row.ci_low == row.ci_high
    controls = df[df.neuron_set == "random:specific,related"]
    assert sorted(set(controls.seed)) == [0, 1] and set(controls.control) == {"layer"}
    none = [p for p in preds if p["neuron_set"] == "none"]
    assert len(none) == sum(len(v) for v in qs.values())
    assert [p["correct"] for p in none if p["eval_lang"] == "en"] == base["en"]


def test_paired_interval_against_a_naive_bootstrap():
    base = [True, False, True, True, False, False, True, False]
    abl = [False, False, True, False, False, True, False, False]
    lo, hi = paired_interval(base, abl, 500, seed=3)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(len(base), (500, len(base)), generator=g)
    means = sorted(sum(float(abl[i]) - float(base[i]) for i in row) / len(base) for row in idx.tolist())
    ref_lo = torch.quantile(torch.tensor(means, dtype=torch.float64), 0.025).item()
    assert lo == pytest.approx(ref_lo) and lo <= -0.25 <= hi
    assert paired_interval([True] * 5, [False] * 5, 100) == (-1.0, -1.0)


# -- the stage, the CLI and the report --------------------------------------------------------------
def test_ablate_choice_accuracy_merges_with_perplexity_rows(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    corpus = write_sample_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    main(["run", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--control", "none",
          "--bootstrap", "0", "--top-rate", "0.1", "--no-progress", "--sets", "specific"])
    before = pd.read_parquet(out / "ablation.parquet")
    data = write_belebele(tmp_path / "bb.jsonl")
    args = ["ablate", str(out), "--classes", "specific", "--metric", "choice_accuracy", "--choice-corpus", str(data),
            "--control", "layer", "--control-seeds", "0", "--bootstrap", "100", "--no-progress", "--device", "cpu"]
    main(args)
    text = capsys.readouterr().out
    assert "Δmultiple-choice accuracy, specific" in text
    df = pd.read_parquet(out / "ablation.parquet")
    ch = df[df.metric == "choice_accuracy"]
    langs = [x for x in ("en", "de", "zh") if x in set(df.deactivated_lang)]
    assert set(ch.eval_lang) == set(langs) and set(ch.neuron_set) == {"specific", "random:specific"}
    assert ch.n_docs.tolist()[0] in (2, 3) and (ch.scope == "choice").all()
    nll = df[df.metric == "nll"].sort_values(["deactivated_lang", "eval_lang"])
    old = before[before.metric == "nll"].sort_values(["deactivated_lang", "eval_lang"])
    assert nll["delta"].tolist() == old["delta"].tolist()  # the perplexity rows are kept as they were
    main(args)
    assert "[ablate] up to date, skipped" in capsys.readouterr().out
    main(["report", str(out)])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Multiple-choice accuracy" in html and "ablation_choice_accuracy_specific" in html


def test_cli_needs_a_choice_corpus(tmp_path, capsys):
    err = cli_error(["ablate", str(tmp_path), "--metric", "choice_accuracy"], capsys)
    assert "--choice-corpus" in err


def test_run_with_a_choice_corpus_adds_the_rows(tmp_path):
    model = save_tiny(tmp_path / "model")
    corpus = write_sample_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    data = write_belebele(tmp_path / "bb.jsonl")
    main(["run", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--control", "none",
          "--bootstrap", "0", "--top-rate", "0.1", "--no-progress", "--sets", "specific", "--lens-docs", "0",
          "--ablation-langs", "en,zh", "--choice-corpus", str(data)])
    df = pd.read_parquet(out / "ablation.parquet")
    ch = df[df.metric == "choice_accuracy"]
    assert set(ch.deactivated_lang) == set(ch.eval_lang) == {"en", "zh"} and len(ch) == 4
    assert {"nll", "choice_accuracy"} <= set(df.metric)
    from langneurons.runs import RunDir

    assert RunDir(out).stage_result("ablation")["choice_corpus"] == str(data)
