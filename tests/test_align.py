"""`langneurons align`: question readers, sampling, scorers, pairs, DPO + LoRA, the whole pipeline.

Every number is checked against a second computation: scorer outputs against unbatched
token-by-token loops, batched left-padded generation against unbatched generation, the DPO
margin before/after against plain forward passes, the first DPO loss against ln 2 (policy ==
reference at step 0), the in-memory merge against a merge reloaded from the adapter checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from ci import skip_or_fail
from tiny import make_tokenizer, save_tiny

from langneurons.align import (
    ALIGN_INFO_FILE,
    AlignConfig,
    AlignError,
    Pair,
    Question,
    Sample,
    ScoreItem,
    SelfTranslationScorer,
    Seq2SeqTranslationScorer,
    align,
    build_pairs,
    default_questions_path,
    lora_target_modules,
    make_scorer,
    merge_lora_checkpoint,
    read_align_info,
    read_questions,
    register_scorer,
    sample_answers,
    score_samples,
    select_questions,
    train_dpo,
)
from langneurons.io import sha256_file
from langneurons.models import load_model

SHIPPED_LANGS = ["en", "zh", "de", "fr", "es", "ru", "ja", "bn", "th", "sw"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")  # fresh each time: training changes it in place


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------------------------
# questions
# --------------------------------------------------------------------------------------------


def test_shipped_questions_are_parallel():
    qs = read_questions(default_questions_path())
    assert len(qs) == 300
    by_id: dict[str, dict[str, Question]] = {}
    for q in qs:
        by_id.setdefault(q.id, {})[q.lang] = q
    assert len(by_id) == 30
    for qid, per in by_id.items():
        assert sorted(per) == sorted(SHIPPED_LANGS), qid
        assert len({q.answer for q in per.values()}) == 1 and per["en"].answer.isdigit()
        # translations keep the numbers of the English problem (Japanese also writes counters
        # such as 1時間 / 2倍 with digits, so it may have more)
        en_numbers = sorted(re.findall(r"\d+", per["en"].question))
        for lang, q in per.items():
            numbers = sorted(re.findall(r"\d+", q.question))
            if lang == "ja":
                assert set(en_numbers) <= set(numbers), (qid, lang)
            else:
                assert numbers == en_numbers, (qid, lang)


def test_read_mgsm_tsv_dir(tmp_path):
    (tmp_path / "mgsm_en.tsv").write_text("Tom has 3 cats. How many?\t3\n\nA has 2. B has 2. Sum?\t4\n", encoding="utf-8")
    (tmp_path / "mgsm_de.tsv").write_text("Tom hat 3 Katzen. Wie viele?\t3\nA hat 2. B hat 2. Summe?\t4\n",
                                          encoding="utf-8")
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    qs = read_questions(tmp_path)
    assert {(q.id, q.lang, q.answer) for q in qs} == {("1", "en", "3"), ("2", "en", "4"), ("1", "de", "3"),
                                                       ("2", "de", "4")}
    assert [q.question for q in qs if q.lang == "de"][0] == "Tom hat 3 Katzen. Wie viele?"
    assert {q.lang for q in read_questions(tmp_path, langs=["de"])} == {"de"}


def test_read_msvamp_json_and_jsonl(tmp_path):
    (tmp_path / "test_zh.json").write_text(json.dumps([{"m_query": "有3个苹果，又买了5个。一共几个？", "response": 8.0},
                                                       {"m_query": "有10本书，借出4本。还剩几本？", "response": 6}],
                                                      ensure_ascii=False), encoding="utf-8")
    (tmp_path / "test_en.json").write_text(json.dumps({"data": [
        {"question": "3 apples and 5 more. How many?", "answer": "8"},
        {"question": "10 books, 4 lent. How many left?", "answer": 6}]}), encoding="utf-8")
    qs = read_questions(tmp_path)
    assert {(q.id, q.lang, q.answer) for q in qs} == {("1", "zh", "8"), ("2", "zh", "6"), ("1", "en", "8"),
                                                       ("2", "en", "6")}
    f = tmp_path / "fr.jsonl"
    f.write_text('{"question": "Q1 fr", "answer": 1}\n\n{"question": "Q2 fr"}\n', encoding="utf-8")
    got = read_questions(f)
    assert [(q.id, q.lang, q.answer) for q in got] == [("1", "fr", "1"), ("2", "fr", None)]
    g = tmp_path / "mixed.jsonl"
    g.write_text('{"id": "a", "lang": "en", "question": "x?", "answer": 2}\n'
                 '{"id": "a", "lang": "de", "question": "x de?", "answer": "2"}\n', encoding="utf-8")
    assert [(q.id, q.lang) for q in read_questions(g)] == [("a", "en"), ("a", "de")]


@pytest.mark.parametrize("name,content,expect", [
    ("bad.jsonl", '{"id": 1, "lang": "en", "question": "ok"}\n{oops\n', "bad.jsonl:2: invalid JSON"),
    ("mgsm_en.tsv", "no tab here\n", "mgsm_en.tsv:1: expected 'question<TAB>answer'"),
    ("questions.tsv", "q\t1\n", "cannot tell the language"),
    ("dup.jsonl", '{"id": 1, "lang": "en", "question": "a"}\n{"id": 1, "lang": "en", "question": "b"}\n',
     "appears twice"),
    ("noq.jsonl", '{"id": 1, "lang": "en", "text": "a"}\n', "no question field"),
    ("nolang.jsonl", '{"id": 1, "question": "a"}\n', "no language"),
    ("mismatch.jsonl", '{"id": 1, "lang": "en", "question": "a", "answer": 3}\n'
                       '{"id": 1, "lang": "de", "question": "b", "answer": 4}\n', "differs from"),
    ("list.json", '{"x": 1}', "expected a JSON list"),
    ("mgsm.json", '[{"question": "a"}]', "no language"),
    ("q.csv", "a,b\n", "unknown question file type"),
])
def test_read_questions_bad_input(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AlignError) as exc:
        read_questions(path)
    assert expect in one_line_error(exc)


def test_read_questions_missing_and_binary(tmp_path):
    with pytest.raises(AlignError) as exc:
        read_questions(tmp_path / "nope.jsonl")
    assert "does not exist" in one_line_error(exc)
    with pytest.raises(AlignError) as exc:
        read_questions(tmp_path)  # empty directory
    assert "holds no" in one_line_error(exc)
    (tmp_path / "x_en.jsonl").write_bytes(b'{"question": "\xff\xfe"}\n')
    with pytest.raises(AlignError) as exc:
        read_questions(tmp_path / "x_en.jsonl")
    assert "not UTF-8" in one_line_error(exc)


def test_select_questions():
    qs = read_questions(default_questions_path())
    sel, langs = select_questions(qs, "en", ["zh", "de"], max_questions=3)
    assert langs == ["zh", "de"]
    assert [(q.id, q.lang) for q in sel] == [(f"q0{i}", x) for i in (1, 2, 3) for x in ("en", "zh", "de")]
    _, all_langs = select_questions(qs, "en")
    assert all_langs == [x for x in SHIPPED_LANGS if x != "en"]
    with pytest.raises(AlignError) as exc:
        select_questions(qs, "xx")
    assert "pivot" in one_line_error(exc)
    with pytest.raises(AlignError) as exc:
        select_questions(qs, "en", ["zz"])
    assert "no questions in zz" in one_line_error(exc)
    only_de = [q for q in qs if q.lang == "de"]
    with pytest.raises(AlignError):
        select_questions(only_de + [Question("other", "en", "x?")], "en", ["de"])


@pytest.mark.parametrize("kw,expect", [
    ({"langs": ["en", "de"]}, "must not contain the pivot"),
    ({"n_samples": 1}, "--n-samples"),
    ({"temperature": 0.0}, "--temperature"),
    ({"top_p": 0.0}, "--top-p"),
    ({"min_margin": -1.0}, "--min-margin"),
    ({"max_steps": 0}, "--max-steps"),
    ({"prompt_template": "no slot"}, "{question}"),
])
def test_config_validate(kw, expect):
    with pytest.raises(AlignError) as exc:
        AlignConfig(**kw).validate()
    assert expect in one_line_error(exc)


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------


def _s(qid, lang, index, score, text=None, kind="sample"):
    return Sample(id=qid, lang=lang, kind=kind, index=index, prompt=f"P{qid}{lang}", text=text or f" ans{index}",
                  finished=True, score=score)


def test_build_pairs_planted():
    samples = [
        _s("1", "en", 0, None, " pivot", kind="pivot"),
        _s("1", "de", 0, -1.0), _s("1", "de", 1, -3.0), _s("1", "de", 2, -2.0),  # margin 2
        _s("1", "zh", 0, -2.0), _s("1", "zh", 1, -2.0), _s("1", "zh", 2, -2.0),  # all equal: no pair
        _s("2", "de", 0, -1.0), _s("2", "de", 1, -1.0), _s("2", "de", 2, -1.5),  # tie for best -> index 0
        _s("3", "de", 0, float("nan")), _s("3", "de", 1, -1.0), _s("3", "de", 2, None),  # one valid: no pair
        _s("4", "de", 0, -0.5, text="   "), _s("4", "de", 1, -1.0), _s("4", "de", 2, -0.75),  # empty text out
    ]
    pairs = build_pairs(samples)
    got = {(p.id, p.lang): p for p in pairs}
    assert set(got) == {("1", "de"), ("2", "de"), ("4", "de")}
    p = got[("1", "de")]
    assert (p.chosen_index, p.rejected_index, p.chosen, p.rejected, p.prompt) == (0, 1, " ans0", " ans1", "P1de")
    assert p.margin == pytest.approx(2.0) and p.chosen_score == -1.0 and p.rejected_score == -3.0
    assert (got[("2", "de")].chosen_index, got[("2", "de")].rejected_index) == (0, 2)
    assert (got[("4", "de")].chosen_index, got[("4", "de")].rejected_index) == (2, 1)
    assert got[("4", "de")].margin == pytest.approx(0.25)
    # min_margin is inclusive; margins below it drop the pair
    assert {(p.id, p.lang) for p in build_pairs(samples, min_margin=0.5)} == {("1", "de"), ("2", "de")}
    assert {(p.id, p.lang) for p in build_pairs(samples, min_margin=2.0)} == {("1", "de")}
    assert build_pairs(samples, min_margin=2.0 + 1e-9) == []
    with pytest.raises(AlignError):
        build_pairs(samples, min_margin=-0.1)


def test_build_pairs_all_equal_scores_gives_nothing():
    samples = [_s(str(i), "de", k, -1.25) for i in range(3) for k in range(4)]
    assert build_pairs(samples) == []
    assert build_pairs([_s("1", "de", 0, -1.0, text=" same"), _s("1", "de", 1, -2.0, text="same ")]) == []


# --------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------


@register_scorer("test-length")
def _length_scorer(**_kw):
    class LengthScorer:
        name = "test-length"

        def describe(self):
            return {"scorer": self.name}

        def score(self, items):
            return [-abs(len(it.text.strip()) - len(it.pivot_text.strip())) for it in items]

    return LengthScorer()


def test_planted_scorer_through_registry():
    scorer = make_scorer("test-length")
    samples = [_s("1", "en", 0, None, " twelve", kind="pivot"),  # 6 characters
               _s("1", "de", 0, None, " a"), _s("1", "de", 1, None, " sechs!"), _s("1", "de", 2, None, " zwölf zwölf"),
               _s("1", "de", 3, None, "   ")]
    scored = score_samples(samples, scorer)
    assert scored[0] == samples[0]  # the pivot answer is not scored
    assert [s.score for s in scored[1:4]] == [-5.0, 0.0, -5.0]
    assert math.isnan(scored[4].score)  # empty answers cannot be scored
    (pair,) = build_pairs(scored)
    assert (pair.chosen, pair.rejected, pair.margin) == (" sechs!", " a", 5.0)
    with pytest.raises(AlignError) as exc:
        make_scorer("no-such-scorer")
    assert "unknown scorer" in one_line_error(exc)
    with pytest.raises(AlignError):  # a sample without a pivot answer
        score_samples(samples[1:], scorer)


def _naive_mean_logprob(model, prefix, cont):
    """One unpadded forward pass, then a Python loop over the continuation tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + cont])).logits[0].double()
    total = 0.0
    for t, token in enumerate(cont):
        total += float(torch.log_softmax(logits[len(prefix) - 1 + t], -1)[token])
    return total / len(cont)


ITEMS = [
    ScoreItem("Die Katze saß auf der warmen Matte.", "de", "The cat sat on the warm mat.", "en"),
    ScoreItem("Es regnete.", "de", "It rained all day in the city.", "en"),
    ScoreItem("猫坐在温暖的垫子上。", "zh", "The cat sat on the warm mat.", "en"),
    ScoreItem("Сколько яблок осталось? Сколько?", "ru", "How many apples are left?", "en"),
    ScoreItem("", "ru", "How many apples are left?", "en"),
    ScoreItem("Wir gingen zum Markt.", "de", "", "en"),
]


def test_self_translation_scorer_matches_naive(tiny):
    scorer = SelfTranslationScorer(tiny.model, tiny.tokenizer, batch_size=2, chat=False)
    prefix, cont = scorer.encode(ITEMS[0])
    assert tiny.tokenizer.decode(prefix, skip_special_tokens=True) == \
        "Translate to English: Die Katze saß auf der warmen Matte.\nEnglish:"
    assert tiny.tokenizer.decode(cont) == " The cat sat on the warm mat."
    got = scorer.score(ITEMS)
    for item, value in zip(ITEMS[:5], got[:5]):
        p, c = scorer.encode(item)
        assert value == pytest.approx(_naive_mean_logprob(tiny.model, p, c), abs=1e-4)
    assert math.isnan(got[5])  # nothing to force-decode
    # batch size does not change the scores
    assert SelfTranslationScorer(tiny.model, tiny.tokenizer, batch_size=5, chat=False).score(ITEMS)[:5] == \
        pytest.approx(got[:5], abs=1e-5)


def test_seq2seq_scorer_matches_naive(tmp_path):
    import transformers

    tok = make_tokenizer()
    cfg = transformers.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "mt")
    tok.save_pretrained(tmp_path / "mt")
    scorer = make_scorer(str(tmp_path / "mt"), batch_size=2)
    assert isinstance(scorer, Seq2SeqTranslationScorer) and scorer.code("de") is None
    assert Seq2SeqTranslationScorer(tmp_path / "mt", lang_codes={"de": "deu_Latn"}).code("de") == "deu_Latn"
    got = scorer.score(ITEMS)
    model.eval()
    for item, value in zip(ITEMS[:4], got[:4]):
        src = tok(item.text)["input_ids"]
        tgt = tok(text_target=item.pivot_text)["input_ids"]
        dec = [cfg.decoder_start_token_id] + tgt[:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0].double()
        naive = sum(float(torch.log_softmax(logits[t], -1)[tok_id]) for t, tok_id in enumerate(tgt)) / len(tgt)
        assert value == pytest.approx(naive, abs=1e-4)
    assert math.isnan(got[4]) and math.isnan(got[5])
    with pytest.raises(AlignError) as exc:
        Seq2SeqTranslationScorer(tmp_path)
    assert "not a local model directory" in one_line_error(exc)


@pytest.mark.slow
def test_self_translation_ranks_faithful_answer_first():
    from langneurons.models import ModelLoadError

    try:
        lm = load_model("smollm2-135m", device="cpu")
    except ModelLoadError as exc:
        skip_or_fail(f"smollm2-135m not available: {exc}")
    cases = [
        ("Maria has 12 pencils and gives 5 away, so she has 12 - 5 = 7 pencils left.", "de",
         "Maria hat 12 Bleistifte und gibt 5 weg, also hat sie 12 - 5 = 7 Bleistifte übrig.",
         "Der Zug fährt morgen um 9 Uhr vom Hauptbahnhof ab und kommt am Abend in Berlin an."),
        ("The train travels 60 kilometers per hour, so in 3 hours it travels 180 kilometers.", "fr",
         "Le train parcourt 60 kilomètres par heure, donc en 3 heures il parcourt 180 kilomètres.",
         "Ma sœur aime cuisiner des gâteaux au chocolat pour ses amis le dimanche après-midi."),
        ("A box holds 6 eggs, so 7 boxes hold 6 x 7 = 42 eggs.", "zh",
         "一个盒子装6个鸡蛋，所以7个盒子装6 x 7 = 42个鸡蛋。", "今天天气很好，我们一起去公园散步吧。"),
    ]
    for chat in (True, False):
        scorer = SelfTranslationScorer(lm.model, lm.tokenizer, chat=chat)
        items = [ScoreItem(t, lang, en, "en") for en, lang, good, bad in cases for t in (good, bad)]
        s = scorer.score(items)
        for k, case in enumerate(cases):
            assert s[2 * k] > s[2 * k + 1] + 0.3, (chat, case[1], s[2 * k], s[2 * k + 1])


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def test_sample_answers_counts_seeds_and_padding(tiny):
    qs, _ = select_questions(read_questions(default_questions_path()), "en", ["de", "zh"], max_questions=3)
    cfg = AlignConfig(langs=["de", "zh"], n_samples=3, max_new_tokens=5, gen_batch_size=2, chat=False)
    samples = sample_answers(tiny.model, tiny.tokenizer, qs, cfg)
    pivots = [s for s in samples if s.kind == "pivot"]
    assert [(s.id, s.index) for s in pivots] == [("q01", 0), ("q02", 0), ("q03", 0)]
    for qid in ("q01", "q02", "q03"):
        for lang in ("de", "zh"):
            assert sorted(s.index for s in samples if (s.id, s.lang, s.kind) == (qid, lang, "sample")) == [0, 1, 2]
    assert all(s.prompt.startswith("Q: ") and s.prompt.endswith("\nA:") for s in samples)
    assert tiny.tokenizer.padding_side == "right"  # restored
    # same seed -> same samples; another seed -> other samples
    assert sample_answers(tiny.model, tiny.tokenizer, qs, cfg) == samples
    other = sample_answers(tiny.model, tiny.tokenizer, qs, AlignConfig(**{**cfg.__dict__, "seed": 1}))
    assert [s.text for s in other if s.kind == "sample"] != [s.text for s in samples if s.kind == "sample"]
    # the greedy pivot answers (batched, left-padded) equal unbatched, unpadded greedy decoding
    tok = tiny.tokenizer
    for s in pivots:
        ids = tok(s.prompt)["input_ids"]
        with torch.no_grad():
            gen = tiny.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id)]
        expected = tok.decode(ids + gen, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
        assert s.text == expected


# --------------------------------------------------------------------------------------------
# DPO + LoRA
# --------------------------------------------------------------------------------------------

PAIRS = [
    Pair("1", "de", "Q: Wie viele Äpfel sind übrig?\nA:", " Drei Äpfel.", " The cat sat.", -1.0, -2.0, 1.0, 0, 1),
    Pair("2", "de", "Q: Es regnete den ganzen Tag.\nA:", " Ja, in der Stadt.", " 猫坐在垫子上。", -1.0, -3.0, 2.0, 1, 0),
    Pair("3", "de", "Q: Wir gingen zum Markt.\nA:", " Am Morgen.", " Сколько яблок?", -0.5, -1.0, 0.5, 0, 2),
    Pair("4", "de", "Q: Die Katze saß.\nA:", " Auf der Matte.", " It rained.", -0.2, -0.9, 0.7, 2, 1),
]


def _completion_logprob(model, tok, prompt, answer):
    """Sum of log P(answer + EOS | prompt), tokenised as TRL does (prompt+answer as one string)."""
    prompt_ids = tok(prompt)["input_ids"]
    full = tok(prompt + answer + tok.eos_token)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), len(prompt_ids))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].double()
    return sum(float(torch.log_softmax(logits[t - 1], -1)[full[t]]) for t in range(start, len(full)))


def _margin(model, tok, pairs):
    return sum(_completion_logprob(model, tok, p.prompt, p.chosen) - _completion_logprob(model, tok, p.prompt, p.rejected)
               for p in pairs)


def test_train_dpo_moves_margin_and_saves_loadable_models(tiny, tiny_dir, tmp_path):
    before = _margin(tiny.model, tiny.tokenizer, PAIRS)
    cfg = AlignConfig(langs=["de"], lr=1e-3, max_steps=4, batch_size=2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      save_every=2, chat=False)
    assert lora_target_modules(tiny.model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]
    res = train_dpo(tiny.model, tiny.tokenizer, PAIRS, cfg, tmp_path, base_path=tiny_dir,
                    info={"trained_langs": ["de"], "pivot": "en", "base_fingerprint": tiny.fingerprint})
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert res.global_step == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
    # step 1: the policy IS the reference (LoRA B starts at 0), so the DPO loss is -log sigmoid(0)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    merged = load_model(str(res.merged_dir), device="cpu")
    after = _margin(merged.model, merged.tokenizer, PAIRS)
    assert after > before + 0.1, (before, after)
    info = read_align_info(res.merged_dir)
    assert info["trained_langs"] == ["de"] and info["step"] == 4 and info["pivot"] == "en"
    # the model was trained in place and behaves like the saved one (TRL's forward patch removed)
    ids = torch.tensor([tiny.tokenizer("Q: Die Katze\nA:")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(tiny.model(input_ids=ids).logits, merged.model(input_ids=ids).logits, atol=1e-5)
    # intermediate checkpoint: a full model at step 2, between base and final
    assert [p.name for p in res.checkpoints] == ["step-2"]
    step2 = load_model(str(res.checkpoints[0]), device="cpu")
    assert read_align_info(res.checkpoints[0])["step"] == 2
    mid = _margin(step2.model, step2.tokenizer, PAIRS)
    assert before < mid < after
    # merging the step-4 adapter from disk equals the in-memory merge
    final_adapter = [p for p in res.adapter_checkpoints if p.name == "checkpoint-4"][0]
    again = merge_lora_checkpoint(tiny_dir, final_adapter, tmp_path / "again")
    sd_a = load_model(str(again), device="cpu").model.state_dict()
    for name, value in merged.model.state_dict().items():
        assert torch.allclose(value, sd_a[name], atol=1e-6), name


def test_train_dpo_resumes_exactly(tiny_dir, tmp_path):
    """An interrupted training continues from its last checkpoint and ends with the same weights;
    other settings start over."""
    cfg = AlignConfig(langs=["de"], lr=1e-3, max_steps=3, batch_size=2, lora_r=4, lora_alpha=8, save_every=1,
                      chat=False)
    first = load_model(str(tiny_dir), device="cpu")
    full = train_dpo(first.model, first.tokenizer, PAIRS, cfg, tmp_path)
    sd_full = load_model(str(full.merged_dir), device="cpu").model.state_dict()
    import shutil

    shutil.rmtree(tmp_path / "trainer" / "checkpoint-3")  # "killed" after step 2
    shutil.rmtree(tmp_path / "merged")
    second = load_model(str(tiny_dir), device="cpu")
    resumed = train_dpo(second.model, second.tokenizer, PAIRS, cfg, tmp_path)
    assert resumed.global_step == 3
    sd_resumed = load_model(str(resumed.merged_dir), device="cpu").model.state_dict()
    for name, value in sd_full.items():
        assert torch.equal(value, sd_resumed[name]), name
    key = json.loads((tmp_path / "trainer" / "langneurons_train.json").read_text())["key"]
    third = load_model(str(tiny_dir), device="cpu")
    train_dpo(third.model, third.tokenizer, PAIRS, AlignConfig(**{**cfg.__dict__, "max_steps": 1}), tmp_path)
    assert json.loads((tmp_path / "trainer" / "langneurons_train.json").read_text())["key"] != key
    assert sorted(p.name for p in (tmp_path / "trainer").glob("checkpoint-*")) == ["checkpoint-1"]


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def test_chat_template_path(tiny, tmp_path):
    """With a chat template, sampling renders the question as the user turn and DPO trains the
    answers as the assistant turn after exactly that rendering (TRL's conversational format)."""
    tok = tiny.tokenizer
    tok.chat_template = CHAT_TEMPLATE
    qs, _ = select_questions(read_questions(default_questions_path()), "en", ["de"], max_questions=2)
    cfg = AlignConfig(langs=["de"], n_samples=2, max_new_tokens=4, lr=1e-3, max_steps=1, batch_size=2, lora_r=2,
                      lora_alpha=4, save_every=1)
    samples = sample_answers(tiny.model, tok, qs, cfg)
    assert all(s.prompt == q.question for s in samples for q in qs if (q.id, q.lang) == (s.id, s.lang))
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>user: Q?</s><s>assistant:"
    pairs = [Pair("1", "de", "Wie viele?", " Drei.", " Katze.", -1.0, -2.0, 1.0, 0, 1),
             Pair("2", "de", "Wo?", " Hier.", " Nein nein.", -1.0, -2.0, 1.0, 0, 1)]
    res = train_dpo(tiny.model, tok, pairs, cfg, tmp_path, info={"trained_langs": ["de"]})
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert load_model(str(res.merged_dir), device="cpu").tokenizer.chat_template == CHAT_TEMPLATE
    with pytest.raises(AlignError):  # --chat without a template
        tok.chat_template = None
        sample_answers(tiny.model, tok, qs, AlignConfig(**{**cfg.__dict__, "chat": True}))


def test_train_dpo_without_pairs(tiny, tmp_path):
    with pytest.raises(AlignError) as exc:
        train_dpo(tiny.model, tiny.tokenizer, [], AlignConfig(), tmp_path)
    assert "no preference pairs" in one_line_error(exc)


# --------------------------------------------------------------------------------------------
# the whole pipeline and the CLI
# --------------------------------------------------------------------------------------------


def test_align_end_to_end_and_resume(tiny, tiny_dir, tmp_path):
    out = tmp_path / "aligned"
    cfg = AlignConfig(langs=["zh", "de"], n_samples=3, max_new_tokens=6, max_questions=3, max_steps=2, save_every=1,
                      lr=1e-3, batch_size=2, lora_r=4, lora_alpha=8)
    res = align(cfg, tiny, None, out)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 * (1 + 2 * 3) and sum(r["kind"] == "pivot" for r in rows) == 3
    # pairs agree with an independent pass over scores.jsonl: best vs worst per (id, lang)
    scores: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for r in map(json.loads, (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()):
        if r["score"] is not None:
            scores.setdefault((r["id"], r["lang"]), []).append((r["score"], r["index"]))
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert pairs and len(pairs) == len(res.pairs)
    for p in pairs:
        group = scores[(p["id"], p["lang"])]
        assert p["chosen_score"] == max(s for s, _ in group) and p["rejected_score"] == min(s for s, _ in group)
        assert p["margin"] == pytest.approx(p["chosen_score"] - p["rejected_score"]) and p["margin"] > 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    trained = sorted({p["lang"] for p in pairs})
    assert sorted(manifest["align"]["trained_langs"]) == trained and manifest["align"]["pivot"] == "en"
    assert manifest["model"]["model_fingerprint"] == tiny.fingerprint
    assert manifest["questions"]["sha256"] == sha256_file(default_questions_path())
    assert manifest["counts"]["samples"] == {"zh": 9, "de": 9} and manifest["config"]["lr"] == 1e-3
    assert all(manifest["versions"][k] for k in ("torch", "transformers", "trl", "peft"))
    assert sum(manifest["counts"]["pairs"].values()) == len(pairs)
    merged = load_model(str(out / "merged"), device="cpu")
    assert merged.fingerprint != tiny.fingerprint
    assert sorted(json.loads((out / "merged" / ALIGN_INFO_FILE).read_text())["trained_langs"]) == trained
    assert manifest["align"]["checkpoints"] == ["checkpoints/step-1"]
    load_model(str(out / "checkpoints" / "step-1"), device="cpu")
    assert (out / "trainer" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    # re-running with the same settings reuses every step
    mtime = (out / "samples.jsonl").stat().st_mtime_ns
    again = align(cfg, load_model(str(tiny_dir), device="cpu"), None, out)
    assert again.skipped == ["samples", "scores", "pairs", "train"]
    assert (out / "samples.jsonl").stat().st_mtime_ns == mtime
    # a new pair threshold recomputes only the pairs (here: none left, a one-line error)
    with pytest.raises(AlignError) as exc:
        align(AlignConfig(**{**cfg.__dict__, "min_margin": 1e6}), load_model(str(tiny_dir), device="cpu"), None, out)
    assert "no preference pairs" in one_line_error(exc)
    assert (out / "samples.jsonl").stat().st_mtime_ns == mtime


def test_cli_align(tiny_dir, tmp_path, capsys):
    import langneurons.cli.align  # noqa: F401  (registers the command; cli/__init__.py imports it too)
    from langneurons.cli import main

    out = tmp_path / "cli"
    main(["align", "--model", str(tiny_dir), "--out", str(out), "--langs", "de", "--max-questions", "2",
          "--n-samples", "3", "--max-new-tokens", "4", "--max-steps", "1", "--save-every", "1", "--lora-r", "2",
          "--lora-alpha", "4", "--lr", "1e-3", "--batch-size", "2", "--no-chat"])
    text = capsys.readouterr().out
    assert "merged model:" in text and (out / "merged" / ALIGN_INFO_FILE).is_file()
    for argv, expect in [(["--langs", "en,de"], "must not contain the pivot"),
                         (["--questions", str(tmp_path / "missing.jsonl")], "does not exist"),
                         (["--scorer", "nonsense"], "unknown scorer")]:
        with pytest.raises(SystemExit) as exc:
            main(["align", "--model", str(tiny_dir), "--out", str(tmp_path / "bad"), "--max-questions", "1",
                  "--n-samples", "2", "--max-new-tokens", "2", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and expect in err[-1]
