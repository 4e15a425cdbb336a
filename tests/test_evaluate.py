"""Evaluation: perplexity against HF's own loss, bits per byte by hand, batch invariance, a planted
language-neuron model, generation, language ID, MGSM scoring/reading, the ablate CLI and the
report section."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import processors

from langneurons.corpus import Example
from langneurons.errors import CorpusError, LangNeuronsError
from langneurons.evaluate import (ablation_matrix, detect_language, extract_final_number, generate, perplexity,
                                  read_mgsm, score_math, write_generations)
from langneurons.intervals import ablation_intervals, distinct_resamples, documents_frame
from langneurons.intervene import deactivate
from langneurons.neurons import GENERAL, RELATED, SPECIFIC, NeuronMap
from tiny import SAMPLE_TEXTS, make_model, make_tokenizer

TEXTS = SAMPLE_TEXTS["en"][:2] + SAMPLE_TEXTS["ru"][:1] + SAMPLE_TEXTS["zh"][:1] + ["Stop here.</s> Then go."]


def _naive_sum(model, tokenizer, text: str) -> tuple[float, int]:
    """Summed NLL of one text from HF's own shifted cross-entropy (``labels=``), one text at a time."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    n = ids.shape[1] - 1  # every token after the first (BOS) is a target
    return float(loss) * n, n


# -- perplexity -----------------------------------------------------------------------------
def test_perplexity_equals_hf_loss_per_text(tokenizer, llama):
    res = perplexity(llama, tokenizer, TEXTS, batch_size=3)
    naive = [_naive_sum(llama, tokenizer, t) for t in TEXTS]
    for got, (want, n), got_n in zip(res.doc_nll, naive, res.doc_tokens):
        assert got_n == n
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    total = sum(s for s, _ in naive)
    assert res.n_tokens == sum(n for _, n in naive)
    assert res.nll == pytest.approx(total / res.n_tokens, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(res.nll), rel=1e-9)
    # the EOS written in the last text is a target; the BOS added by the tokenizer is not
    ids = tokenizer(TEXTS[-1])["input_ids"]
    assert tokenizer.eos_token_id in ids and res.doc_tokens[-1] == len(ids) - 1


def test_bits_per_byte_by_hand(tokenizer, llama):
    text = "Привет"  # 6 Cyrillic letters = 12 UTF-8 bytes
    res = perplexity(llama, tokenizer, [text])
    want_nll, _ = _naive_sum(llama, tokenizer, text)
    assert res.n_bytes == 12
    assert res.bpb == pytest.approx(want_nll / math.log(2) / 12, rel=1e-5)
    # mixed: two documents add NLL and bytes separately (bytes: 12 + 5)
    res2 = perplexity(llama, tokenizer, [text, "hello"])
    want2 = want_nll + _naive_sum(llama, tokenizer, "hello")[0]
    assert res2.n_bytes == 17 and res2.bpb == pytest.approx(want2 / math.log(2) / 17, rel=1e-5)


def test_without_bos_the_first_token_is_neither_scored_nor_counted_in_bytes(llama):
    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    text = "hello world"
    ids = tok(text)["input_ids"]
    first = tok.decode(ids[:1])
    res = perplexity(llama, tok, [text])
    assert res.n_tokens == len(ids) - 1
    assert res.n_bytes == len(text.encode()) - len(first.encode())
    with torch.no_grad():
        want = float(llama(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss) * (len(ids) - 1)
    assert res.doc_nll[0] == pytest.approx(want, rel=1e-5)


def test_response_scope_scores_only_the_response(tokenizer, llama):
    prompt, response = "How many apples are left?", "Сколько яблок осталось?"
    ex = Example("ru", prompt=prompt, response=response)
    res = perplexity(llama, tokenizer, [ex], scope="response")
    full = tokenizer(prompt + "\n" + response)["input_ids"]
    prefix = tokenizer(prompt + "\n")["input_ids"]
    assert full[:len(prefix)] == prefix  # a clean boundary, so the naive split below is exact
    labels = torch.tensor([full])
    labels[0, :len(prefix)] = -100
    with torch.no_grad():
        loss = llama(input_ids=torch.tensor([full]), labels=labels).loss
    n = len(full) - len(prefix)
    assert res.n_tokens == n
    assert res.doc_nll[0] == pytest.approx(float(loss) * n, rel=1e-5)
    assert res.n_bytes == len(response.encode("utf-8"))
    with pytest.raises(CorpusError, match="prompt/response"):
        perplexity(llama, tokenizer, ["plain text"], scope="response")


def test_batch_size_invariance(tokenizer, llama):
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts][:10]
    one = perplexity(llama, tokenizer, texts, batch_size=1)
    four = perplexity(llama, tokenizer, texts, batch_size=4)
    assert one.n_tokens == four.n_tokens and one.doc_tokens == four.doc_tokens
    assert abs(one.nll - four.nll) < 1e-5
    for a, b in zip(one.doc_nll, four.doc_nll):
        assert a == pytest.approx(b, abs=1e-4)


# -- a planted model ------------------------------------------------------------------------
def _token_ids(tok, lang: str) -> set[int]:
    out: set[int] = set()
    for t in SAMPLE_TEXTS[lang]:
        out |= set(tok(t, add_special_tokens=False)["input_ids"])
    return out


PLANTED = torch.arange(0, 8)  # layer-0 neurons that fire only on Russian-only tokens


@pytest.fixture(scope="module")
def planted():
    """Tiny llama in which layer-0 neurons 0..7 fire (strongly) only on tokens that occur in Russian
    text and never in English, and push up the logits of exactly those tokens.

    Embedding coordinate 0 is +3 for Russian-only tokens and -3 for every other token; the planted
    neurons' gate and up rows read coordinate 0 (silu(+20) ~ 20 vs silu(-20) ~ 0), their down_proj
    columns write coordinate 1, and the LM head maps coordinate 1 to the Russian-only tokens."""
    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    ru_only = sorted(_token_ids(tok, "ru") - _token_ids(tok, "en"))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = -3.0
        emb[ru_only, 0] = 3.0
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[PLANTED] = 0
        mlp.gate_proj.weight[PLANTED, 0] = 4.0
        mlp.up_proj.weight[PLANTED] = 0
        mlp.up_proj.weight[PLANTED, 0] = 1.0
        mlp.down_proj.weight[:, PLANTED] = 0
        mlp.down_proj.weight[1, PLANTED] = 1.0
        model.lm_head.weight[:, 1] = 0
        model.lm_head.weight[ru_only, 1] = 1.0
    L, N = 2, 48
    classes = torch.zeros(L, N, dtype=torch.int8)
    active = torch.zeros(2, L, N, dtype=torch.bool)
    classes[0, PLANTED] = SPECIFIC
    active[0, 0, PLANTED] = True
    classes[1, 10:16] = SPECIFIC  # some English "specific" neurons in layer 1 (random weights)
    active[1, 1, 10:16] = True
    nmap = NeuronMap(["ru", "en"], classes, active, classes > 0)
    return model, tok, nmap


def test_planted_neurons_matter_only_for_their_language(planted):
    model, tok, nmap = planted
    ru, en = SAMPLE_TEXTS["ru"], SAMPLE_TEXTS["en"]
    base_ru, base_en = perplexity(model, tok, ru), perplexity(model, tok, en)
    with deactivate(model, nmap.language_mask("ru", ("specific",))):
        abl_ru, abl_en = perplexity(model, tok, ru), perplexity(model, tok, en)
    d_ru, d_en = abl_ru.nll - base_ru.nll, abl_en.nll - base_en.nll
    assert d_ru > 0.5  # Russian loses its helper neurons: loss rises clearly
    assert abs(d_en) < 0.01 * d_ru  # English barely notices


def test_ablation_matrix_on_planted_model(planted):
    model, tok, nmap = planted
    corpus = {"ru": SAMPLE_TEXTS["ru"], "en": SAMPLE_TEXTS["en"]}
    stats: dict = {}
    df = ablation_matrix(model, tok, nmap, corpus, neuron_sets=("specific", "specific,related"),
                         control="random", control_seeds=(0, 1), progress=False, stats=stats)
    assert list(df.columns[:8]) == ["deactivated_lang", "eval_lang", "neuron_set", "metric", "base", "ablated",
                                    "delta", "n_tokens"]
    # 2 sets x 2 langs x (1 real + 2 random) x 2 eval langs x 3 metrics
    assert len(df) == 2 * 2 * 3 * 2 * 3
    real = df[(df.metric == "nll") & (df.neuron_set == "specific")].set_index(["deactivated_lang", "eval_lang"])
    assert real.loc[("ru", "ru"), "delta"] > 0.5
    assert abs(real.loc[("ru", "en"), "delta"]) < 0.01 * real.loc[("ru", "ru"), "delta"]
    rand = df[(df.metric == "nll") & (df.neuron_set == "random:specific")]
    rand_ru = rand[(rand.deactivated_lang == "ru") & (rand.eval_lang == "ru")]
    assert sorted(rand_ru.seed.tolist()) == [0, 1] and (rand_ru.n_neurons == 8).all()
    assert rand_ru.delta.abs().mean() < 0.2 * real.loc[("ru", "ru"), "delta"]
    # no related neurons: "specific,related" is the same mask as "specific" -> reused, same numbers
    same = df[(df.metric == "nll") & (df.neuron_set == "specific,related")].set_index(["deactivated_lang", "eval_lang"])
    assert (same["ablated"] == real["ablated"]).all()
    # pooled passes (all eval languages at once): 1 baseline + 2 real masks + 2 langs x 2 sets x 2 seeds
    assert stats["passes"] == 1 + 2 + 8
    # a cell equals a direct second-path computation; the baseline is the unpatched model
    with deactivate(model, nmap.language_mask("ru", ("specific",))):
        direct = perplexity(model, tok, corpus["en"])
    assert real.loc[("ru", "en"), "ablated"] == pytest.approx(direct.nll, abs=1e-9)
    assert real.loc[("ru", "en"), "base"] == pytest.approx(perplexity(model, tok, corpus["en"]).nll, abs=1e-9)
    ppl = df[(df.metric == "ppl") & (df.neuron_set == "specific")].set_index(["deactivated_lang", "eval_lang"])
    assert ppl.loc[("ru", "ru"), "base"] == pytest.approx(math.exp(real.loc[("ru", "ru"), "base"]))


def test_bootstrap_interval_brackets_the_delta(planted):
    model, tok, nmap = planted
    df = ablation_matrix(model, tok, nmap, {"ru": SAMPLE_TEXTS["ru"]}, neuron_sets=("specific",), control=None,
                         progress=False, bootstrap=300, langs=["ru"])
    for row in df.itertuples():
        assert row.ci_low <= row.delta <= row.ci_high
    nll = df[df.metric == "nll"].iloc[0]
    assert nll.ci_low > 0  # the planted effect is positive in every resample of the 4 documents


def test_ablation_matrix_empty_set_reuses_baseline(planted):
    model, tok, nmap = planted
    only_ru = NeuronMap(nmap.languages, torch.where(nmap.active[0] | (nmap.classes != SPECIFIC), nmap.classes,
                                                    torch.zeros_like(nmap.classes)),
                        nmap.active & torch.tensor([True, False]).view(2, 1, 1), nmap.selected)
    stats: dict = {}
    df = ablation_matrix(model, tok, only_ru, {"en": SAMPLE_TEXTS["en"][:2]}, neuron_sets=("specific",),
                         control=None, metrics=("nll",), progress=False, stats=stats)
    en_row = df[df.deactivated_lang == "en"].iloc[0]
    assert en_row.n_neurons == 0 and en_row.delta == 0.0 and en_row.ablated == en_row.base
    assert stats["passes"] == 2  # baseline + the Russian mask; nothing for the empty English set


def test_ablation_matrix_rejects_a_map_of_another_model(planted, tokenizer):
    model, tok, nmap = planted
    wrong = NeuronMap(["a", "b"], torch.zeros(3, 48, dtype=torch.int8), torch.zeros(2, 3, 48, dtype=torch.bool),
                      torch.zeros(3, 48, dtype=torch.bool))
    with pytest.raises(LangNeuronsError, match="another model"):
        ablation_matrix(model, tok, wrong, {"a": ["x"]}, progress=False)


# -- generation -----------------------------------------------------------------------------
def test_generate_is_batch_invariant_and_the_mask_acts(tokenizer, llama):
    prompts = ["The cat sat on", "Кошка", "我们早上去了市场。还剩下"]
    one = generate(llama, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    three = generate(llama, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert one == three
    assert tokenizer.padding_side == "right"  # restored
    mask = torch.zeros(2, 48, dtype=torch.bool)
    mask[:, :24] = True
    ablated = generate(llama, tokenizer, prompts, max_new_tokens=6, mask=mask)
    assert ablated != one
    later = generate(llama, tokenizer, prompts, max_new_tokens=6, mask=mask, positions="generated", batch_size=3)
    assert later == generate(llama, tokenizer, prompts, max_new_tokens=6, mask=mask, positions="generated",
                             batch_size=1)


def test_write_generations(tmp_path):
    rows = [{"prompt": "Q?", "output": "A.", "deactivated_lang": "de", "neuron_set": "specific",
             "requested_lang": "en", "detected_lang": "en", "answer": "3"}, {"prompt": "p", "output": "o"}]
    path = write_generations(tmp_path / "g.jsonl", rows)
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert list(lines[0])[:6] == ["prompt", "output", "deactivated_lang", "neuron_set", "requested_lang",
                                  "detected_lang"]
    assert lines[0]["answer"] == "3" and lines[1]["detected_lang"] is None
    assert not list(tmp_path.glob(".*tmp"))


# -- language identification and MGSM scoring ----------------------------------------------------
@pytest.mark.parametrize("text,lang", [
    ("The answer is 42 apples.", "en"), ("Die Antwort ist 42 Äpfel.", "de"), ("Ответ: 42 яблока.", "ru"),
    ("答案是42个苹果。", "zh"), ("答えは42個のりんごです。", "ja"), ("উত্তর হল ৪২টি আপেল।", "bn"),
    ("คำตอบคือแอปเปิ้ล 42 ผล", "th"), ("Jibu ni maapulo 42.", "sw"), ("La réponse est 42 pommes.", "fr"),
    ("La respuesta es 42 manzanas.", "es")])
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_detect_language_none_and_unknown():
    assert detect_language("") is None and detect_language("42 + 7 = 49") is None
    with pytest.raises(LangNeuronsError, match="ISO 639-1"):
        detect_language("hello", languages=["en", "xx"])


@pytest.mark.parametrize("text,want", [
    ("So she has 1,234 apples.", "1234"), ("Sie hat 1.234 Äpfel.", "1234"), ("Il a 1 234 pommes.", "1234"),
    ("Il a 1\u202f234 pommes.", "1234"), ("Es kostet 2,5 Euro.", "2.5"), ("It costs 3.75 dollars.", "3.75"),
    ("1.234.567,89 total", "1234567.89"), ("1,234,567.5", "1234567.5"), ("The answer is 18.", "18"),
    ("The temperature is -5 degrees.", "-5"), ("Ответ: −12", "-12"), ("答えは１２です。", "12"),
    ("উত্তর হল ১২।", "12"), ("คำตอบคือ ๑๒", "12"), ("उत्तर १,२३४ है", "1234"), ("الجواب ٤٢", "42"),
    ("first 3, then 4, finally 7", "7"), ("Area 12 m².", "12"), ("0.125 of it", "0.125"), ("x = 10.0", "10"),
    ("3-4 apples", "4"), ("no number here", None), ("", None)])
def test_extract_final_number(text, want):
    assert extract_final_number(text) == want


def test_score_math():
    ok = score_math("Janet sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18 dollars.", "18", "en")
    assert ok == {"correct": True, "number_ok": True, "lang_ok": True, "detected": "en", "predicted": "18"}
    wrong_lang = score_math("Sie verdient jeden Tag 18 Dollar auf dem Markt.", 18, "en")
    assert wrong_lang["number_ok"] and not wrong_lang["lang_ok"] and not wrong_lang["correct"]
    assert wrong_lang["detected"] == "de"
    wrong_num = score_math("She makes 17 dollars every day.", "18", "en")
    assert not wrong_num["number_ok"] and wrong_num["lang_ok"] and not wrong_num["correct"]
    none = score_math("I do not know the answer.", "18", "en")
    assert none["predicted"] is None and not none["correct"]
    locale = score_math("Она зарабатывает 1 234 рубля в день.", "1,234", "ru")
    assert locale["correct"]
    bengali = score_math("সে প্রতিদিন বাজারে ১৮ ডলার আয় করে।", 18, "bn")
    assert bengali["correct"]


def test_read_mgsm_layouts(tmp_path):
    d = tmp_path / "mgsm"
    d.mkdir()
    (d / "mgsm_en.tsv").write_text("Janet has 3 eggs and buys 2. How many?\t5\nA second\tquestion?\t1,000\n",
                                   encoding="utf-8")
    (d / "mgsm_de.tsv").write_text("Wie viele?\t7\n", encoding="utf-8")
    exs = read_mgsm(d)
    assert sorted({e.lang for e in exs}) == ["de", "en"]
    en = read_mgsm(d, lang="en")
    assert [e.answer for e in en] == ["5", "1000"] and en[1].prompt == "A second\tquestion?"
    assert en[0].is_pair and en[0].response == "5"
    js = tmp_path / "mgsm.json"
    js.write_text(json.dumps([{"question": "Q1", "answer": "Step... The answer is 12.", "answer_number": 12,
                               "lang": "fr"}]), encoding="utf-8")
    [j] = read_mgsm(js)
    assert j.lang == "fr" and j.answer == "12" and j.response.startswith("Step")
    jl = tmp_path / "mgsm_sw.jsonl"
    jl.write_text(json.dumps({"question": "Swali", "answer": None, "answer_number": "1.500"}) + "\n",
                  encoding="utf-8")
    [s] = read_mgsm(jl)
    assert s.lang == "sw" and s.answer == "1500"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "Q", "answer_number": 3}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no language"):
        read_mgsm(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match="does not exist"):
        read_mgsm(tmp_path / "missing")


# -- the CLI and the report ----------------------------------------------------------------------
def _run_dir(tmp_path: Path, model_dir: Path) -> Path:
    from langneurons.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    L, N = 2, 48
    g = torch.Generator().manual_seed(0)
    classes = torch.zeros(L, N, dtype=torch.int8)
    active = torch.zeros(3, L, N, dtype=torch.bool)
    perm = torch.randperm(L * N, generator=g)
    for k in range(3):
        idx = perm[k * 5:(k + 1) * 5]
        classes.view(-1)[idx] = SPECIFIC
        active[k].view(-1)[idx] = True
    classes.view(-1)[perm[15:18]] = RELATED
    active[0].view(-1)[perm[15:18]] = True
    active[1].view(-1)[perm[15:18]] = True
    classes.view(-1)[perm[18:20]] = GENERAL
    active[:, :, :].view(3, -1)[:, perm[18:20]] = True
    NeuronMap(["en", "de", "ru"], classes, active, (classes == SPECIFIC) | (classes == RELATED)).save(run.neurons_path)
    run.update_manifest({"languages": ["en", "de", "ru"],
                         "model": {"model": str(model_dir), "dtype": "float32", "num_layers": L, "num_neurons": N}})
    return run.path


def test_cli_ablate(tmp_path, capsys):
    from langneurons.cli import main
    from langneurons.runs import RunDir
    from tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    run_dir = _run_dir(tmp_path, model_dir)
    corpus = tmp_path / "eval"
    corpus.mkdir()
    for lang in ("en", "de", "ru"):
        (corpus / f"{lang}.txt").write_text("\n".join(SAMPLE_TEXTS[lang][:2]) + "\n", encoding="utf-8")
    main(["ablate", str(run_dir), "--classes", "specific;specific,related", "--control", "layer",
          "--control-seeds", "0", "--eval-corpus", str(corpus), "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "ΔNLL/token" in out and "random:specific" in out
    run = RunDir(run_dir)
    df = pd.read_parquet(run.ablation_path)
    assert set(df.neuron_set) == {"specific", "specific,related", "random:specific", "random:specific,related"}
    assert set(df.metric) == {"nll", "ppl", "bpb"}
    assert len(df) == 2 * 3 * 2 * 3 * 3  # sets x rows x (real + 1 seed) x cols x metrics
    assert ((df.delta - (df.ablated - df.base)).abs() < 1e-12).all()
    man = run.read_manifest()
    section = run.stage_result("ablation")
    assert section["neuron_sets"] == ["specific", "specific,related"]
    assert section["control_seeds"] == [0] and "ablation.parquet" in man["checksums"]
    assert (run.figures_dir / "ablation_nll_specific.png").exists()
    assert (run.figures_dir / "ablation_nll_random-specific-related.svg").exists()

    # accuracy on an MGSM TSV: rows are added, perplexity rows kept, generations written
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("Tom has 2 apples and gets 3 more. How many?\t5\n", encoding="utf-8")
    (mgsm / "mgsm_de.tsv").write_text("Tom hat 2 Äpfel und bekommt 3. Wie viele?\t5\n", encoding="utf-8")
    main(["ablate", str(run_dir), "--classes", "specific", "--metric", "accuracy", "--control", "none",
          "--eval-corpus", str(mgsm), "--max-new-tokens", "4", "--no-progress", "--device", "cpu"])
    df2 = pd.read_parquet(run.ablation_path)
    assert {"accuracy", "number_accuracy", "language_accuracy", "nll"} <= set(df2.metric)
    assert len(df2[df2.metric == "nll"]) == len(df[df.metric == "nll"])
    acc = df2[df2.metric == "accuracy"]
    assert set(acc.eval_lang) == {"en", "de"} and set(acc.deactivated_lang) == {"en", "de", "ru"}
    gens = [json.loads(x) for x in run.generations_path.read_text(encoding="utf-8").splitlines()]
    assert len(gens) == 2 * (1 + 3)  # two problems: baseline + three deactivated languages
    assert {g["requested_lang"] for g in gens} == {"en", "de"}


def test_cli_ablate_bad_input(tmp_path, capsys):
    from langneurons.cli import main

    run_dir = _run_dir(tmp_path, tmp_path / "nomodel")
    for argv, msg in [(["--control", "bogus"], "--control"), (["--classes", "special"], "class"),
                      (["--metric", "acc"], "--metric"), ([], "--eval-corpus"),
                      (["--control-seeds", "a"], "--control-seeds"), (["--positions", "prompt"], "--positions")]:
        with pytest.raises(SystemExit) as exc:
            main(["ablate", str(run_dir), "--no-progress"] + argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


def test_report_section(tmp_path):
    from langneurons.report.ablation import heatmaps, render_section, summary
    from langneurons.runs import RunDir

    langs = ["en", "de", "zh"]
    # en: own loss rises most; zh: en's rises more; de: own "least harmed" but its loss falls -> not hurt
    delta = {("en", "en"): 0.9, ("en", "de"): 0.2, ("en", "zh"): 0.1, ("de", "en"): -0.05, ("de", "de"): -0.01,
             ("de", "zh"): -0.06, ("zh", "en"): 0.4, ("zh", "de"): 0.05, ("zh", "zh"): 0.3}
    rows = []
    for (k, j), d in delta.items():
        rows.append(dict(deactivated_lang=k, eval_lang=j, neuron_set="specific", metric="nll", base=2.0,
                         ablated=2.0 + d, delta=d, n_tokens=10, seed=None, n_neurons=5))
        for seed, rd in ((0, 0.01), (1, 0.03)):
            rows.append(dict(deactivated_lang=k, eval_lang=j, neuron_set="random:specific", metric="nll", base=2.0,
                             ablated=2.0 + rd, delta=rd, n_tokens=10, seed=seed, n_neurons=5))
    df = pd.DataFrame(rows)
    [s] = summary(df)
    assert s["own_most"] == 1 and s["with_neurons"] == 3
    assert [x["hurts_own_most"] for x in s["languages"]] == [True, False, False]
    assert s["diag_mean"] == pytest.approx((0.9 - 0.01 + 0.3) / 3)
    assert s["off_mean"] == pytest.approx((0.2 + 0.1 - 0.05 - 0.06 + 0.4 + 0.05) / 6)
    assert s["random_diag_mean"] == pytest.approx(0.02)
    paths = heatmaps(df, tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["ablation_nll_random-specific.png", "ablation_nll_random-specific.svg",
                                             "ablation_nll_specific.png", "ablation_nll_specific.svg"]
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    df.to_parquet(run.ablation_path)
    html = render_section(run.path)
    assert html.count('src="data:image/png;base64,') == 2
    assert 'alt=""' not in html
    assert ("for 1 of 3 languages by point estimates (not for de, zh); no interval was computed, so none of them is "
            "confirmed against the control") in html
    assert "The number of evaluated documents is not recorded for en, de, zh" in html
    assert render_section(run.path, standalone=True).startswith('<section id="section-interventions">')
    assert langs[0] in html


# -- busy neurons vs language neurons: the control decides --------------------------------------
BUSY = torch.arange(40, 64)  # layer-0 neurons that fire on every token and help every language
BUSY_SET = BUSY[:8]  # the "language set" that is really just busy


@pytest.fixture(scope="module")
def busy_model(tmp_path_factory):
    """Tiny llama (128 neurons per layer) with two planted groups in layer 0:

    * neurons 0..7 fire only on Russian-only tokens (embedding coordinate 0 = +3 there, -3
      elsewhere) and raise the logits of exactly those tokens (coordinate 1 -> LM head);
    * neurons 40..63 fire on EVERY token (coordinate 2 = +3 for all tokens) and raise the logits
      of every token seen in either language (coordinate 3 -> LM head): language-neutral, busy
      and important for both languages.

    The map calls 0..7 Russian and 40..47 "English". Activity comes from really recording the
    texts (stats.probs()), as in a run."""
    from langneurons.corpus import Corpus
    from langneurons.intervene import activity_from_probs
    from langneurons.record import RecordConfig, record

    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok), inter=128)
    ru_only = sorted(_token_ids(tok, "ru") - _token_ids(tok, "en"))
    seen = sorted(_token_ids(tok, "ru") | _token_ids(tok, "en"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = -3.0
        emb[ru_only, 0] = 3.0
        emb[:, 2] = 3.0
        model.model.layers[0].self_attn.v_proj.weight[:, [0, 2]] = 0  # planted coordinates reach only the MLP
        mlp = model.model.layers[0].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[:, [0, 2]] = 0  # no other neuron reads the planted coordinates...
        mlp.down_proj.weight[[1, 3], :] = 0  # ...or writes the read-out coordinates
        for group, coord in ((PLANTED, 0), (BUSY, 2)):
            mlp.gate_proj.weight[group] = 0
            mlp.gate_proj.weight[group, coord] = 4.0
            mlp.up_proj.weight[group] = 0
            mlp.up_proj.weight[group, coord] = 1.0
            mlp.down_proj.weight[:, group] = 0
        mlp.down_proj.weight[1, PLANTED] = 0.05
        mlp.down_proj.weight[3, BUSY] = 0.02 * (1 + 0.3 * torch.rand(len(BUSY), generator=gen))
        model.lm_head.weight[:, [1, 3]] = 0
        model.lm_head.weight[ru_only, 1] = 1.0
        model.lm_head.weight[seen, 3] = 1.0
    L, N = 2, 128
    classes = torch.zeros(L, N, dtype=torch.int8)
    active = torch.zeros(2, L, N, dtype=torch.bool)
    classes[0, PLANTED] = SPECIFIC
    active[0, 0, PLANTED] = True
    classes[0, BUSY_SET] = SPECIFIC
    active[1, 0, BUSY_SET] = True
    nmap = NeuronMap(["ru", "en"], classes, active, classes > 0)
    corpus = Corpus({k: [Example(k, text=t) for t in SAMPLE_TEXTS[k]] for k in ("ru", "en")}, "planted")
    stats = record(model, tok, corpus, tmp_path_factory.mktemp("busy"), RecordConfig(), progress=False)
    return model, tok, nmap, activity_from_probs(stats.probs())


def _own(df, kind_set: str, lang: str) -> float:
    sub = df[(df.metric == "nll") & (df.neuron_set == kind_set) & (df.deactivated_lang == lang) & (df.eval_lang == lang)]
    return float(sub.delta.mean())


def test_matched_control_separates_busy_from_language_neurons(busy_model):
    model, tok, nmap, activity = busy_model
    # the recorded activity shows the set-up: busy neurons always fire, the Russian ones on Russian
    assert (activity[0, BUSY] == 1.0).all()
    assert (activity[0, PLANTED] > 0.8).all() and activity[0, 64:].mean() < 0.8
    corpus = {k: SAMPLE_TEXTS[k] for k in ("ru", "en")}
    kw = dict(neuron_sets=("specific",), control_seeds=(0, 1, 2, 3), metrics=("nll",), progress=False,
              activity=activity)
    layer_docs: list = []
    matched_docs: list = []
    layer = ablation_matrix(model, tok, nmap, corpus, control="layer", documents=layer_docs, **kw)
    stats: dict = {}
    with pytest.warns(UserWarning, match=r"matched control of ru specific.*could not be drawn"):
        matched = ablation_matrix(model, tok, nmap, corpus, control="matched", stats=stats, documents=matched_docs,
                                  **kw)
    assert set(layer[layer.neuron_set == "random:specific"].control) == {"layer"}
    assert set(matched[matched.neuron_set == "random:specific"].control) == {"matched"}
    assert set(matched[matched.neuron_set == "specific"].control.isna()) == {True}
    # the Russian set has no other neuron as busy as it in its stratum: said, with numbers
    ru_info = [x for x in stats["control_match"] if x["deactivated_lang"] == "ru"]
    assert ru_info and all(x["shortfall"] for x in ru_info)
    en_info = [x for x in stats["control_match"] if x["deactivated_lang"] == "en"]
    assert all(not x["shortfall"] and x["activity_control"] == x["activity_real"] == 1.0 for x in en_info)

    busy = _own(layer, "specific", "en")
    assert busy > 0.03  # the busy set matters for "its" language...
    assert _own(matched, "specific", "en") == busy  # (same real rows under both controls)
    # ...and the layer-only control, mostly quiet neurons, makes that look like a language effect
    assert _own(layer, "random:specific", "en") < 0.2 * busy
    # the matched control draws other busy neurons: the excess over it is small
    assert abs(busy - _own(matched, "random:specific", "en")) < 0.1 * busy
    # the planted Russian neurons stand out from both controls
    ru = _own(layer, "specific", "ru")
    assert ru > 0.2
    assert ru - _own(layer, "random:specific", "ru") > 0.5 * ru
    assert ru - _own(matched, "random:specific", "ru") > 0.5 * ru
    # and the busy set is no more harmful to "its" language than to the other one
    en_on_ru = float(layer[(layer.metric == "nll") & (layer.neuron_set == "specific") & (layer.deactivated_lang == "en")
                           & (layer.eval_lang == "ru")].delta.iloc[0])
    assert en_on_ru > 0.5 * busy

    # with intervals (documents and control seeds resampled): the same verdicts
    sel_layer = ablation_intervals(documents_frame(layer_docs), resamples=500).selectivity.set_index("deactivated_lang")
    sel_matched = ablation_intervals(documents_frame(matched_docs),
                                     resamples=500).selectivity.set_index("deactivated_lang")
    assert sel_layer.loc["en", "excess_low"] > 0  # "English neurons", says the layer-only control
    assert sel_matched.loc["en", "excess_low"] < 0 < sel_matched.loc["en", "excess_high"]  # not beyond busy
    for sel in (sel_layer, sel_matched):
        assert sel.loc["ru", "excess_low"] > 0 and sel.loc["ru", "selectivity_low"] > 0
        assert sel.loc["en", "selectivity_high"] < 0.5 * busy  # never selective: it hurts both languages
        assert sel.loc["en", "n_docs"] == 4 and sel.loc["en", "distinct_resamples"] == 35 * 35
    # the per-document scores add up to the matrix rows
    d = documents_frame(matched_docs)
    row = matched[(matched.metric == "nll") & (matched.neuron_set == "specific") & (matched.deactivated_lang == "en")
                  & (matched.eval_lang == "ru")].iloc[0]
    part = d[(d.neuron_set == "specific") & (d.deactivated_lang == "en") & (d.eval_lang == "ru")]
    assert part.nll.sum() / part.tokens.sum() == pytest.approx(row.ablated, rel=1e-12)
    assert row.n_docs == 4 and row.n_tokens == part.tokens.sum()


def test_matched_control_needs_activity(planted):
    model, tok, nmap = planted
    with pytest.raises(LangNeuronsError, match="needs the neurons' activity"):
        ablation_matrix(model, tok, nmap, {"ru": SAMPLE_TEXTS["ru"]}, progress=False)
    with pytest.raises(LangNeuronsError, match="another model"):
        ablation_matrix(model, tok, nmap, {"ru": SAMPLE_TEXTS["ru"]}, progress=False, activity=torch.zeros(3, 48))
    with pytest.raises(LangNeuronsError, match="matched, layer or none"):
        ablation_matrix(model, tok, nmap, {"ru": SAMPLE_TEXTS["ru"]}, progress=False, control="uniform")


def test_report_shows_intervals_sizes_and_warnings(tmp_path):
    """The Interventions section from per-document scores: every cell with its interval, the
    documents and tokens behind each column, the small-sample warnings, and a verdict that counts
    only languages whose own-language interval lies above the control."""
    import html as html_lib

    from langneurons.intervals import DOCS_FILE
    from langneurons.report.ablation import render_section
    from langneurons.runs import RunDir
    from test_intervals import _docs

    docs = _docs(n_docs=(4, 12, 12), own={"a": 0.5, "b": 0.5, "c": 0.08}, other=0.02, noise=0.3)
    base = docs[docs.neuron_set == "none"]
    rows = []
    for (nset, k, seed, j), part in docs[docs.neuron_set != "none"].groupby(
            ["neuron_set", "deactivated_lang", "seed", "eval_lang"], dropna=False):
        b = base[base.eval_lang == j]
        bn, an = b.nll.sum() / b.tokens.sum(), part.nll.sum() / b.tokens.sum()
        rows.append(dict(deactivated_lang=k, eval_lang=j, neuron_set=nset, metric="nll", base=bn, ablated=an,
                         delta=an - bn, n_tokens=int(b.tokens.sum()), seed=None if pd.isna(seed) else int(seed),
                         n_neurons=5, ci_low=float("nan"), ci_high=float("nan"), n_docs=len(b), n_resamples=0,
                         control=None if nset == "specific" else "matched"))
    df = pd.DataFrame(rows)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    df.to_parquet(run.ablation_path)
    docs.to_parquet(run.path / DOCS_FILE)
    page = html_lib.unescape(render_section(run.path))
    # column headers: documents and tokens, summed directly
    for j, n in (("a", 4), ("b", 12), ("c", 12)):
        assert f"{j} ({n} docs, {int(base[base.eval_lang == j].tokens.sum()):,} tokens)" in page
    # every cell: delta [interval] from the engine, the delta itself from the direct sums
    iv = ablation_intervals(docs, resamples=1000, seed=0)
    for r in iv.cells.itertuples():
        direct = df[(df.neuron_set == "specific") & (df.deactivated_lang == r.deactivated_lang)
                    & (df.eval_lang == r.eval_lang)].delta.iloc[0]
        assert f"{direct:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" in page
    # warnings: 4 documents (< 10) and C(7, 4) = 35 distinct resamples < 1,000 drawn
    assert "Fewer than 10 evaluated documents for 1 language(s): a (4)" in page
    assert "The bootstrap drew 1,000 resamples, but fewer distinct ones exist for a (35)" in page
    # the verdict counts only own-language cells above the control
    real = df[df.neuron_set == "specific"].pivot(index="deactivated_lang", columns="eval_lang", values="delta")
    point = [k for k in "abc" if real.loc[k, k] > 0 and real.loc[k, k] > max(real.loc[k, j] for j in "abc" if j != k)]
    own = iv.cells[iv.cells.deactivated_lang == iv.cells.eval_lang].set_index("deactivated_lang")
    confirmed = [k for k in point if own.loc[k, "excess_low"] > 0]
    assert len(confirmed) < len(point) == 3  # c is hurt most by point estimate, but not beyond the control
    assert (f"with the 95% interval of its own loss above the control, for {len(confirmed)} of 3 languages "
            f"({len(point)} of 3 by point estimates alone; not beyond the control: c)") in page
    assert "activity-matched control" in page
    sel = iv.selectivity.set_index("deactivated_lang")
    assert f"{sel.loc['a', 'selectivity']:+.3f} [{sel.loc['a', 'selectivity_low']:+.3f}, " in page
    assert f"1,000 of {35 * distinct_resamples(12) ** 2:,}" in page


# -- sizing by tokens, cost up front ----------------------------------------------------------------
def test_select_eval_docs_by_token_budget(tokenizer):
    from langneurons.evaluate import select_eval_docs

    texts = SAMPLE_TEXTS["en"] + SAMPLE_TEXTS["de"]
    # oracle: every token after BOS is a target (predicted from its predecessor, BOS for the first)
    sizes = [len(tokenizer(t)["input_ids"]) - 1 for t in texts]
    budget = sizes[0] + sizes[1] + sizes[2] // 2  # room for two documents and half of the third
    with pytest.warns(UserWarning, match=r"fewer than 10 evaluation documents.*en: 2, zh: 1"):
        sel = select_eval_docs(tokenizer, {"en": texts, "zh": [SAMPLE_TEXTS["zh"][0]]}, budget)
    assert [e.text for e in sel.by_lang["en"]] == texts[:2]
    assert sel.tokens["en"] == sizes[0] + sizes[1] and sel.docs == {"en": 2, "zh": 1}
    assert sel.available == {"en": 8, "zh": 1}
    assert sel.tokens_per_pass == sel.tokens["en"] + sel.tokens["zh"]
    # a budget below the first document still keeps one; a large one keeps all
    assert select_eval_docs(tokenizer, {"en": texts}, 1, min_docs=1).docs == {"en": 1}
    assert select_eval_docs(tokenizer, {"en": texts}, 10 ** 6, min_docs=1).tokens["en"] == sum(sizes)
    with pytest.raises(LangNeuronsError, match="eval-tokens-per-lang"):
        select_eval_docs(tokenizer, {"en": texts}, 0)


def test_cost_estimate_line_and_factor(llama):
    from langneurons.evaluate import ablation_cost, eval_cost_factor

    est = ablation_cost(61, 12_000, 1_700)
    assert est.seconds == pytest.approx(61 * 12_000 / 1_700)
    assert est.line() == "61 passes x 12,000 tokens ≈ 7 min at 1,700 tok/s"
    lines: list = []
    slow = ablation_cost(121, 40_000, 1_000, factor=2.5, echo=lines.append)
    assert lines == ["121 passes x 40,000 tokens ≈ 3.4 h at 1,000 tok/s (recording speed; x2.5 per evaluated token)"]
    assert slow.seconds == pytest.approx(121 * 40_000 * 2.5 / 1_000)
    with pytest.raises(LangNeuronsError, match="tokens per second"):
        ablation_cost(1, 1, 0)
    # factor from parameter counts: the tiny llama has separate input and output embeddings
    V, H = llama.config.vocab_size, llama.config.hidden_size
    total = sum(p.numel() for p in llama.parameters())
    body = total - 2 * V * H
    assert eval_cost_factor(llama) == pytest.approx((body + V * H) / body)


def test_plan_passes_matches_the_matrix(busy_model):
    from langneurons.evaluate import plan_passes

    model, tok, nmap, activity = busy_model
    for kind in ("matched", "layer", None):
        stats: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ablation_matrix(model, tok, nmap, {"en": SAMPLE_TEXTS["en"][:1]}, neuron_sets=("specific", "specific,related"),
                            control=kind, control_seeds=(0, 1), metrics=("nll",), progress=False, activity=activity,
                            stats=stats)
            planned = plan_passes(nmap, neuron_sets=("specific", "specific,related"), control=kind,
                                  control_seeds=(0, 1), activity=activity)
        # baseline + 2 real masks (no related neurons: both sets are one mask) + 2 langs x 2 sets x 2 seeds
        assert planned == stats["passes"] == (1 + 2 + 8 if kind else 3)


def test_ablation_matrix_says_its_cost_after_the_baseline(planted):
    model, tok, nmap = planted
    lines: list = []
    stats: dict = {}
    ablation_matrix(model, tok, nmap, {"ru": SAMPLE_TEXTS["ru"]}, neuron_sets=("specific",), control=None,
                    metrics=("nll",), progress=False, echo=lines.append, stats=stats)
    n_tok = perplexity(model, tok, SAMPLE_TEXTS["ru"]).n_tokens
    assert len(lines) == 1
    assert lines[0].startswith(f"{stats['passes'] - 1} passes x {n_tok:,} tokens ≈ ")
    assert "measured on the baseline pass" in lines[0]
