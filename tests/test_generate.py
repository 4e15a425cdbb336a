"""generate.py: the model answers task questions; its answers are counted from the generated ids,
in a separate pass or during generation (compared token by token); chat-rendered pairs; the
paper's perplexity style; `langneurons generate` and `langneurons run --task`."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer, save_tiny

from langneurons.cli import main
from langneurons.corpus import Example
from langneurons.errors import LangNeuronsError
from langneurons.generate import (
    PLAIN_TEMPLATE,
    GenerateStage,
    GenerateStageConfig,
    read_responses,
    record_responses,
)
from langneurons.lm import GenerateConfig, generate
from langneurons.record import GenerationCounter, RecordConfig, Recorder, TokenExample
from langneurons.tasks import TaskExample

QUESTIONS = {
    "en": ["How many apples are left?", "The cat sat on the warm mat.", "We walked to the market in the morning.",
           "It rained all day in the city."],
    "de": ["Wie viele Äpfel sind übrig?", "Die Katze saß auf der warmen Matte.", "Wir gingen am Morgen zum Markt."],
    "zh": ["还剩下多少个苹果？", "猫坐在温暖的垫子上。", "城市里下了一整天的雨。"],
}
QUESTIONS_BY_LANG = {lang: [TaskExample(lang, f"q{i}", q, answer=str(i)) for i, q in enumerate(qs)]
                     for lang, qs in QUESTIONS.items()}
ACT = {"llama": lambda m: [layer.mlp.act_fn for layer in m.model.layers],
       "gpt2": lambda m: [block.mlp.act for block in m.transformer.h]}


def loaded_of(model, tok, fingerprint="tiny-fp"):
    return types.SimpleNamespace(model=model, tokenizer=tok, source="tiny", fingerprint=fingerprint, dtype="float32")


def capture(model, family):
    """Independent hooks (not the recorder's): every forward's activations, per layer."""
    mods = ACT[family](model)
    store: list[list[torch.Tensor | None]] = []

    def hook(i):
        def h(_mod, _inp, out):
            if i == 0:
                store.append([None] * len(mods))
            store[-1][i] = out.detach().float().clone()
        return h

    return store, [m.register_forward_hook(hook(i)) for i, m in enumerate(mods)]


def separate_pass_acts(model, family, prompt_ids, token_ids):
    """[layers, len(token_ids), N] activations of the generated tokens in one unbatched pass."""
    store, handles = capture(model, family)
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(prompt_ids) + list(token_ids)]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    [acts] = store
    return torch.stack([a[0, len(prompt_ids):] for a in acts])


def eos_on_some_rows(model, tok, prompts, limit):
    """Make a token that some row generates early a stop token, so batches hold rows that end by
    EOS, rows that end by length, and (when it exists) a row whose EOS comes right at the limit."""
    free = [generate(model, tok, [p], max_new_tokens=limit + 1, batch_size=1)[0] for p in prompts]
    at_limit = [g.token_ids[limit] for g in free
                if len(g.token_ids) > limit and g.token_ids[limit] not in g.token_ids[:limit]]
    early = [g.token_ids[2] for g in free if len(g.token_ids) > 2]
    model.generation_config.eos_token_id = sorted({early[1], *at_limit[:1]})
    return bool(at_limit)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_counting_during_generation_equals_a_separate_pass_token_by_token(family):
    tok = make_tokenizer()
    model = make_model(family, vocab_size=len(tok))
    prompts = [q for qs in QUESTIONS.values() for q in qs]
    limit = 5
    eos_on_some_rows(model, tok, prompts, limit)
    counter = GenerationCounter(model, RecordConfig(scope="response", buckets=4))
    events: list[tuple[str, list[int]]] = []

    def on_batch(rows):
        events.append(("batch", list(rows)))
        counter.on_batch(rows)

    def on_step(step, ids, finished):
        events.append(("step", (~finished).nonzero().squeeze(1).tolist()))
        counter.on_step(step, ids, finished)

    store, handles = capture(model, family)
    try:
        with counter.hooks():  # one token more than kept: the pass choosing it feeds the last kept token
            gens = generate(model, tok, prompts, max_new_tokens=limit + 1, batch_size=3, on_batch=on_batch,
                            on_step=on_step)
    finally:
        for h in handles:
            h.remove()
    kept = [g.token_ids[:limit] for g in gens]
    assert {len(k) for k in kept} != {limit} and limit in {len(k) for k in kept}  # both stop reasons occur
    # the activations each decoding pass computed, by (output, token index): pass j feeds token j-1
    during: dict[tuple[int, int], torch.Tensor] = {}
    forward, rows, steps = 0, [], 0
    for kind, value in events:
        if kind == "batch":
            rows, steps = value, 0
            forward += 1  # the prefill (prompt tokens: not counted)
            continue
        steps += 1  # token steps - 1 was chosen; the next pass feeds it to the rows still live
        if not value or steps == limit + 1:  # every row finished, or the length limit: no pass follows
            continue
        for r in value:
            during[(rows[r], steps - 1)] = torch.stack([a[r, 0] for a in store[forward]])
        forward += 1
    assert forward == len(store)  # every pass accounted for
    assert set(during) == {(o, t) for o, k in enumerate(kept) for t in range(len(k))}  # exactly the kept tokens
    assert counter.row_tokens == {o: len(k) for o, k in enumerate(kept)}

    L, N = len(ACT[family](model)), store[0][0].shape[-1]
    pos_during = torch.zeros(L, N, dtype=torch.int64)
    pos_separate = torch.zeros(L, N, dtype=torch.int64)
    flips = near = 0
    max_diff = 0.0
    for o, k in enumerate(kept):
        sep = separate_pass_acts(model, family, gens[o].prompt_ids, k)  # [L, T, N]
        for t in range(len(k)):
            a, b = during[(o, t)], sep[:, t]
            max_diff = max(max_diff, float((a - b).abs().max()))
            flip = (a > 0) != (b > 0)
            flips += int(flip.sum())
            near += int((flip & (b.abs() < 1e-5)).sum())
            pos_during += (a > 0).long()
            pos_separate += (b > 0).long()
    assert max_diff < 1e-4  # the same computation up to float rounding (KV cache, left padding)
    assert flips == near  # a sign differs only where the activation is within rounding of zero
    print(f"{family}: {len(during)} tokens, max |during - separate| = {max_diff:.2e}, sign flips: {flips}")
    stats = counter.stats("en")
    assert torch.equal(stats.positive, pos_during) and stats.tokens == sum(len(k) for k in kept)
    assert torch.equal(stats.bucket_positive.sum(0), stats.positive) and int(stats.bucket_tokens.sum()) == stats.tokens
    # the separate pass (the recorder, batched, from the generated ids) counts what the naive loop counts
    examples = [TokenExample("en", prompt=g.prompt, response="", prompt_ids=tuple(g.prompt_ids), token_ids=tuple(k))
                for g, k in zip(gens, kept)]
    recorded = Recorder(model, tok, RecordConfig(scope="response", batch_size=4)).count(examples, progress=False)
    assert torch.equal(recorded.positive, pos_separate)
    # and the two countings differ by exactly the sign flips (measured: none on this model)
    assert int((pos_during - pos_separate).abs().sum()) <= flips


def test_response_counts_from_generated_ids_equal_an_independent_count(tmp_path):
    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    loaded = loaded_of(model, tok)
    cfg = GenerateStageConfig(decoding=GenerateConfig(max_new_tokens=6, chat=None, batch_size=3), progress=False)
    GenerateStage(tmp_path, loaded, QUESTIONS_BY_LANG, cfg).run_stage()
    stats = record_responses(tmp_path, loaded, list(QUESTIONS), RecordConfig(scope="response", batch_size=4),
                             progress=False)
    for k, lang in enumerate(stats.languages):
        responses = read_responses(tmp_path, lang)
        assert [r.question for r in responses] == QUESTIONS[lang]
        for r in responses:
            assert r.prompt == PLAIN_TEMPLATE.format(question=r.question)  # no chat template: the plain one
            assert r.prompt_ids == tok(r.prompt)["input_ids"] and r.num_tokens == len(r.token_ids) > 0
        want = sum((separate_pass_acts(model, "llama", r.prompt_ids, r.token_ids) > 0).long().sum(1)
                   for r in responses)
        assert int(stats.tokens[k]) == sum(r.num_tokens for r in responses)
        assert torch.equal(stats.positive[k], want)
    rec = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert rec["record"]["result"]["scope"] == "response" and rec["generate"]["result"]["decoding"]["chat"] is False
    assert rec["generate"]["result"]["template"]["user_template"] == PLAIN_TEMPLATE


def test_counting_modes_give_the_same_answers_and_counts(tmp_path):
    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    prompts = [PLAIN_TEMPLATE.format(question=q) for qs in QUESTIONS.values() for q in qs]
    exercised = eos_on_some_rows(model, tok, prompts, 5)
    loaded = loaded_of(model, tok)
    out = {}
    for counting in ("pass", "during"):
        run = tmp_path / counting
        cfg = GenerateStageConfig(decoding=GenerateConfig(max_new_tokens=5, chat=None, batch_size=4),
                                  counting=counting, progress=False)
        answers = GenerateStage(run, loaded, QUESTIONS_BY_LANG, cfg).run_stage()
        stats = record_responses(run, loaded, list(QUESTIONS), RecordConfig(scope="response"), counting=counting,
                                 progress=False)
        out[counting] = (answers, stats)
    (a_pass, s_pass), (a_during, s_during) = out["pass"], out["during"]
    assert a_pass == a_during  # the extra decoding step changes no answer, stop reason or text
    stops = [r.stop for rs in a_pass.values() for r in rs]
    assert "eos" in stops and "length" in stops and exercised
    assert torch.equal(s_pass.tokens, s_during.tokens) and torch.equal(s_pass.positive, s_during.positive)
    assert torch.equal(s_pass.bucket_positive, s_during.bucket_positive)
    assert torch.allclose(s_pass.sums, s_during.sums, rtol=1e-5, atol=1e-4)
    rec = json.loads((tmp_path / "during" / "manifest.json").read_text())["stages"]["record"]["result"]
    assert rec["config"]["counting"] == "generation"


def test_generate_stage_resumes_per_language(tmp_path):
    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    loaded = loaded_of(model, tok)
    cfg = GenerateStageConfig(decoding=GenerateConfig(max_new_tokens=3, chat=None), progress=False)
    lines: list[str] = []
    GenerateStage(tmp_path, loaded, QUESTIONS_BY_LANG, cfg).run_stage(echo=lines.append)
    assert sum("answers" in x for x in lines) == 3
    lines.clear()
    changed = dict(QUESTIONS_BY_LANG, de=QUESTIONS_BY_LANG["de"][:2])  # one language's questions changed
    (tmp_path / "responses" / "zh.jsonl").write_text("edited\n", encoding="utf-8")  # one damaged by hand
    GenerateStage(tmp_path, loaded, changed, cfg).run_stage(echo=lines.append)
    assert any(x.startswith("[generate] en: up to date") for x in lines)
    assert any(x.startswith("[generate] de: 2 answers") for x in lines)
    assert any(x.startswith("[generate] zh: 3 answers") for x in lines)
    lines.clear()
    GenerateStage(tmp_path, loaded, changed, cfg).run_stage(echo=lines.append)
    assert all("up to date" in x for x in lines) and len(lines) == 3
    # other decoding settings: every language again
    cfg2 = GenerateStageConfig(decoding=GenerateConfig(max_new_tokens=4, chat=None), progress=False)
    lines.clear()
    GenerateStage(tmp_path, loaded, changed, cfg2).run_stage(echo=lines.append)
    assert not any("up to date" in x for x in lines)


def test_chat_models_pairs_are_rendered_with_their_template():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    model = make_model("llama", vocab_size=len(tok))
    pair = Example("en", prompt="How many apples are left?", response=" Seven apples.")
    rec = Recorder(model, tok, RecordConfig(scope="response"))
    enc, _ = rec.encode_one(pair)
    rendered = "<s>[user] How many apples are left?\n[assistant]"
    full = tok(rendered + " Seven apples.", add_special_tokens=False, return_offsets_mapping=True)
    assert enc.input_ids == full["input_ids"] and enc.input_ids.count(tok.bos_token_id) == 1
    want = [start >= len(rendered) for start, _ in full["offset_mapping"]]
    assert enc.counted == want and any(want) and not all(want)
    assert tok.decode([t for t, c in zip(enc.input_ids, enc.counted) if c]) == " Seven apples."
    # --no-chat: prompt + separator + response, the separator an option (the authors use none)
    plain, _ = Recorder(model, tok, RecordConfig(scope="response", chat=False, separator="")).encode_one(pair)
    assert plain.input_ids == tok("How many apples are left? Seven apples.")["input_ids"]
    # the all scope: the template's special tokens are not counted
    enc_all, _ = Recorder(model, tok, RecordConfig(scope="all")).encode_one(pair)
    assert [t for t, c in zip(enc_all.input_ids, enc_all.counted) if not c] == [tok.bos_token_id]
    with pytest.raises(LangNeuronsError, match="no chat template"):
        Recorder(model, make_tokenizer(), RecordConfig(scope="response", chat=True))


def test_paper_perplexity_style_is_the_mean_of_document_means(tokenizer, llama):
    from langneurons.evaluate import perplexity

    texts = ["The cat sat on the warm mat.", "How many apples are left?",
             "We walked to the market in the morning. It rained all day in the city."]
    res = perplexity(llama, tokenizer, texts, batch_size=2)
    doc_means, total, n = [], 0.0, 0
    for text in texts:  # naive: every true next token's log-probability, one document at a time
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        nll = [-float(logp[t - 1, ids[t]]) for t in range(2, len(ids))] + [-float(logp[0, ids[1]])]
        doc_means.append(sum(nll) / len(nll))
        total, n = total + sum(nll), n + len(nll)
    paper = sum(doc_means) / len(doc_means)
    assert res.metric("nll", "paper") == pytest.approx(paper, rel=1e-5)
    assert res.metric("ppl", "paper") == pytest.approx(math.exp(paper), rel=1e-5)
    assert res.metric("nll") == pytest.approx(total / n, rel=1e-5)
    assert abs(res.metric("nll", "paper") - res.metric("nll")) > 1e-4  # the styles differ on unequal lengths
    with pytest.raises(LangNeuronsError, match="ppl-style"):
        res.metric("nll", "mean")


def test_cli_generate_and_bad_task(tmp_path, capsys):
    model = save_tiny(tmp_path / "model", "llama")
    task = tmp_path / "q.jsonl"
    task.write_text("".join(json.dumps({"lang": lang, "id": q.id, "question": q.question, "answer": q.answer}) + "\n"
                            for lang, qs in QUESTIONS_BY_LANG.items() for q in qs), encoding="utf-8")
    run = tmp_path / "run"
    main(["generate", str(run), "--task", str(task), "--model", str(model), "--max-new-tokens", "4",
          "--no-progress", "--counting", "during"])
    out = capsys.readouterr().out
    assert "response tokens" in out and "counted during generation" in out
    assert {p.name for p in (run / "responses").iterdir()} >= {"en.jsonl", "de.jsonl", "zh.jsonl"}
    assert (run / "stats" / "en.safetensors").exists()
    main(["generate", str(run), "--task", str(task), "--no-progress", "--counting", "during", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.count("up to date, skipped") == 3
    for bad, msg in [(tmp_path / "missing.jsonl", "does not exist"), (tmp_path / "model" / "config.json", "")]:
        with pytest.raises(SystemExit) as exc:
            main(["generate", str(run), "--task", str(bad), "--model", str(model)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err
    with pytest.raises(SystemExit):
        main(["generate", str(run), "--task", str(task), "--counting", "twice"])
    assert "--counting must be one of" in capsys.readouterr().err


def test_run_task_end_to_end_and_resume(tmp_path, capsys):
    import pandas as pd

    model = save_tiny(tmp_path / "model", "llama")
    questions = Path(__file__).parents[1] / "src" / "langneurons" / "data" / "questions" / "questions.jsonl"
    args = ["run", "--task", str(questions), "--model", str(model), "--out", str(tmp_path / "run"), "--langs",
            "en,de,zh", "--max-questions", "10", "--max-new-tokens", "6", "--control", "none", "--bootstrap", "0",
            "--top-rate", "0.1", "--lens-docs", "0", "--sets", "specific,related,general", "--no-progress",
            "--ppl-style", "paper"]
    main(args)
    out = tmp_path / "run"
    for lang in ("en", "de", "zh"):
        answers = read_responses(out, lang)
        assert len(answers) == 8 and all(r.prompt.startswith("Question: ") for r in answers)  # 2 of 10 held out
    df = pd.read_parquet(out / "ablation.parquet")
    assert set(df["metric"]) >= {"accuracy", "language_accuracy", "nll", "ppl"}
    assert set(df.loc[df["metric"] == "nll", "ppl_style"]) == {"paper"}
    assert set(df.loc[df["metric"] == "accuracy", "ppl_style"]) == {"none"}
    held = [json.loads(x) for x in (out / "eval_questions.jsonl").read_text().splitlines()]
    assert {(h["lang"], h["id"]) for h in held} == {(lang, q) for lang in ("en", "de", "zh") for q in ("q01", "q06")}
    assert "Perplexity style: paper" in (out / "report.html").read_text(encoding="utf-8")
    from langneurons.report.ablation import run_intervals
    from langneurons.runs import RunDir

    cells = run_intervals(RunDir(out), resamples=50).cells  # the report's cells: in the rows' style
    docs = pd.read_parquet(out / "ablation_docs.parquet")
    nll = df[(df["metric"] == "nll") & (df["neuron_set"] == "specific,related,general")]
    styles_differ = 0
    for r in cells.itertuples():
        row = nll[(nll["deactivated_lang"] == r.deactivated_lang) & (nll["eval_lang"] == r.eval_lang)]
        assert r.delta == pytest.approx(float(row["delta"].iloc[0]), abs=1e-9)
        assert r.n_tokens == int(row["n_tokens"].iloc[0])
        j = docs[docs["eval_lang"] == r.eval_lang]
        base, abl = j[j["neuron_set"] == "none"], j[(j["neuron_set"] == r.neuron_set)
                                                   & (j["deactivated_lang"] == r.deactivated_lang)]
        token_delta = (abl["nll"].sum() - base["nll"].sum()) / base["tokens"].sum()
        styles_differ += abs(token_delta - r.delta) > 1e-6
    assert styles_differ  # (so the check above tells the styles apart)
    capsys.readouterr()
    main(args)
    text = capsys.readouterr().out
    assert text.count("up to date, skipped") >= 6 and "[ablate] up to date, skipped" in text


# -- real model (slow) -------------------------------------------------------------------------------
EMBEDDED = Path(__file__).parents[1] / "src" / "langneurons" / "data" / "questions" / "questions.jsonl"


@pytest.mark.slow
def test_smollm2_answers_in_the_chat_format_and_its_answers_are_counted_exactly(tmp_path):
    from langneurons.generate import group_questions
    from langneurons.models import load_model
    from langneurons.tasks import read_task

    loaded = load_model("smollm2-135m")
    tok, model = loaded.tokenizer, loaded.model
    langs = ["en", "de", "zh"]
    questions = group_questions(read_task(EMBEDDED, langs=langs), 4)
    cfg = GenerateStageConfig(decoding=GenerateConfig(max_new_tokens=24, chat=None, batch_size=12), progress=False)
    answers = GenerateStage(tmp_path, loaded, questions, cfg).run_stage()
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for lang in langs:
        assert [r.id for r in answers[lang]] == ["q01", "q02", "q03", "q04"]
        for r in answers[lang]:
            assert r.token_ids and r.response.strip()
            assert r.prompt.startswith("<|im_start|>system\n")  # the model's own chat template
            assert r.prompt.endswith(f"<|im_start|>user\n{r.question}<|im_end|>\n<|im_start|>assistant\n")
            assert r.prompt_ids == tok(r.prompt, add_special_tokens=False)["input_ids"]
            assert r.stop == "length" or r.stop_token_id == end_of_turn
            assert end_of_turn not in r.token_ids
    # one answer per batch: the recorder's computation is then the independent one's, so the counts
    # must be equal exactly iff exactly the generated tokens are counted
    stats = record_responses(tmp_path, loaded, langs, RecordConfig(scope="response", batch_size=1), progress=False)
    acts = [layer.mlp.act_fn for layer in model.model.layers]  # independent hooks, one answer at a time
    for k, lang in enumerate(stats.languages):
        want = torch.zeros(len(acts), model.config.intermediate_size, dtype=torch.int64)
        for r in answers[lang]:
            seen: list[torch.Tensor] = []
            handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[0, len(r.prompt_ids):] > 0))
                       for m in acts]
            try:
                with torch.inference_mode():
                    model(input_ids=torch.tensor([r.prompt_ids + r.token_ids]), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            want += torch.stack([s.sum(0) for s in seen])
        assert int(stats.tokens[k]) == sum(r.num_tokens for r in answers[lang])
        assert torch.equal(stats.positive[k], want), lang
    # batched (right padding, sdpa): the same tokens, float rounding of other matmul shapes can flip
    # a sign within rounding of zero (measured: docs/generate.md); it must stay negligible
    batched = record_responses(tmp_path, loaded, langs, RecordConfig(scope="response", batch_size=12),
                               force=True, progress=False)
    assert torch.equal(batched.tokens, stats.tokens)
    assert int((batched.positive - stats.positive).abs().sum()) <= 1e-5 * int(stats.positive.sum())


@pytest.mark.slow
def test_run_task_on_smollm2_with_few_questions(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "run"
    main(["run", "--task", str(EMBEDDED), "--model", "smollm2-135m", "--out", str(out), "--langs", "en,de,zh",
          "--max-questions", "5", "--max-new-tokens", "16", "--control", "none", "--bootstrap", "0",
          "--lens-docs", "0", "--sets", "specific", "--no-progress"])
    text = capsys.readouterr().out
    assert "report:" in text and "[record] done" in text
    for lang in ("en", "de", "zh"):
        answers = read_responses(out, lang)
        assert len(answers) == 4 and all(r.prompt.startswith("<|im_start|>") and r.token_ids for r in answers)
    df = pd.read_parquet(out / "ablation.parquet")
    assert {"accuracy", "language_accuracy", "nll"} <= set(df["metric"]) and set(df["ppl_style"]) <= {"token", "none"}
    assert (out / "report.html").exists()
