"""Recorder counts against independent computations (naive hooks, two-pass method, planted model)."""

from __future__ import annotations

import warnings

import pytest
import torch

from langneurons.arch import locate_activations
from langneurons.corpus import Corpus, Example
from langneurons.errors import ArchitectureError, CorpusError, LangNeuronsError, StatsError
from langneurons.record import RecordConfig, Recorder, record
from langneurons.stats import ActivationStats, merge_runs
from tiny import FAMILIES, SAMPLE_TEXTS, make_model, dying_forward


def text_corpus(langs=("en", "de", "zh", "ru")) -> Corpus:
    return Corpus({lang: [Example(lang, text=t) for t in SAMPLE_TEXTS[lang]] for lang in langs})


def naive_counts(model, tokenizer, texts, include_special=False):
    """One sequence at a time, full model (with LM head), plain forward hooks."""
    sites = locate_activations(model)
    L, N = sites.num_layers, sites.num_neurons
    pos = torch.zeros(L, N, dtype=torch.int64)
    sums = torch.zeros(L, N, dtype=torch.float64)
    tokens = 0
    special = set(tokenizer.all_special_ids)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        keep = torch.tensor([include_special or i not in special for i in ids])
        acts = {}
        handles = [m.register_forward_hook(lambda _m, _i, out, layer=layer: acts.__setitem__(layer, out.reshape(-1, out.shape[-1])))
                   for layer, m in enumerate(sites.modules)]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for h in handles:
            h.remove()
        for layer in range(L):
            a = acts[layer][keep]
            pos[layer] += (a > 0).sum(0)
            sums[layer] += a.double().sum(0)
        tokens += int(keep.sum())
    return pos, sums, tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_equal_naive_hooks_every_family(family, tokenizer, tmp_path):
    model = make_model(family, vocab_size=len(tokenizer))
    corpus = text_corpus()
    stats = record(model, tokenizer, corpus, tmp_path, RecordConfig(batch_size=3), progress=False)
    for k, lang in enumerate(corpus.languages):
        pos, sums, tokens = naive_counts(model, tokenizer, SAMPLE_TEXTS[lang])
        assert int(stats.tokens[k]) == tokens
        assert torch.equal(stats.positive[k], pos), family
        torch.testing.assert_close(stats.sums[k], sums, rtol=1e-4, atol=1e-4)
    assert (stats.positive > 0).any() and (stats.positive < stats.tokens.view(-1, 1, 1)).any()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "opt"])
def test_batch_size_invariance(family, tokenizer, tmp_path):
    model = make_model(family, vocab_size=len(tokenizer))
    corpus = text_corpus()
    a = record(model, tokenizer, corpus, tmp_path / "a", RecordConfig(batch_size=1), progress=False)
    b = record(model, tokenizer, corpus, tmp_path / "b", RecordConfig(batch_size=8), progress=False)
    assert torch.equal(a.positive, b.positive)
    assert torch.equal(a.tokens, b.tokens)


def test_include_special_counts_bos(llama, tokenizer, tmp_path):
    corpus = text_corpus(("en", "de"))
    a = record(llama, tokenizer, corpus, tmp_path / "a", RecordConfig(), progress=False)
    b = record(llama, tokenizer, corpus, tmp_path / "b", RecordConfig(include_special=True), progress=False)
    n_docs = torch.tensor([len(SAMPLE_TEXTS["en"]), len(SAMPLE_TEXTS["de"])])
    assert torch.equal(b.tokens - a.tokens, n_docs)  # one BOS per document
    pos, _, _ = naive_counts(llama, tokenizer, SAMPLE_TEXTS["en"], include_special=True)
    assert torch.equal(b.positive[0], pos)
    assert a.meta["include_special"] is False and b.meta["include_special"] is True


PAIRS = {
    "en": [("What is two plus two?", "Two plus two is four."), ("Where is the cat?", "The cat sat on the mat.")],
    "de": [("Wie viele Äpfel?", "Es sind drei Äpfel."), ("Wo ist die Katze?", "Die Katze ist im Garten.")],
    "zh": [("还剩多少个苹果？", "还剩三个苹果。"), ("猫在哪里？", "猫坐在垫子上。")],
}


def test_response_scope_equals_two_pass_full_minus_prefix(llama, tokenizer, tmp_path):
    corpus = Corpus({lang: [Example(lang, prompt=p, response=r) for p, r in prs] for lang, prs in PAIRS.items()})
    stats = record(llama, tokenizer, corpus, tmp_path, RecordConfig(scope="response", batch_size=4), progress=False)
    for k, lang in enumerate(corpus.languages):
        fulls = [p + "\n" + r for p, r in PAIRS[lang]]
        prefixes = [p + "\n" for p, _ in PAIRS[lang]]
        for f, pre in zip(fulls, prefixes):  # the boundary is clean: prefix tokens are a prefix
            fi, pi = tokenizer(f)["input_ids"], tokenizer(pre)["input_ids"]
            assert fi[: len(pi)] == pi
        pf, _, tf = naive_counts(llama, tokenizer, fulls)
        pp, _, tp = naive_counts(llama, tokenizer, prefixes)
        assert int(stats.tokens[k]) == tf - tp
        assert torch.equal(stats.positive[k], pf - pp)
    assert stats.meta["scope"] == "response"


def test_response_scope_needs_pairs(llama, tokenizer, tmp_path):
    with pytest.raises(CorpusError, match="prompt/response"):
        record(llama, tokenizer, text_corpus(), tmp_path, RecordConfig(scope="response"), progress=False)


def planted_model(tokenizer, langs_tokens: dict[str, set[int]]):
    """Layer 0 neuron j fires exactly on the tokens exclusive to language j.

    Attention of layer 0 is silenced (o_proj = 0) so the MLP sees RMSNorm(embedding);
    every token's embedding is e0, plus e_{1+j} for tokens exclusive to language j; the
    gate row of neuron j is -0.5 e0 + e_{1+j}: positive (>= 2) on its tokens, <= -2 elsewhere.
    """
    model = make_model("llama", vocab_size=len(tokenizer), hidden=32, inter=48)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, 0] = 1.0
        for j, toks in enumerate(langs_tokens.values()):
            emb[list(toks), 1 + j] = 1.0
        layer0 = model.model.layers[0]
        layer0.self_attn.o_proj.weight.zero_()
        gate = layer0.mlp.gate_proj.weight
        for j in range(len(langs_tokens)):
            gate[j].zero_()
            gate[j, 0] = -0.5
            gate[j, 1 + j] = 1.0
    return model


def test_planted_neurons_give_exact_probabilities(tokenizer, tmp_path):
    langs = ("en", "zh", "ru")
    special = set(tokenizer.all_special_ids)
    ids = {lang: [i for t in SAMPLE_TEXTS[lang] for i in tokenizer(t)["input_ids"] if i not in special]
           for lang in langs}
    exclusive = {lang: set(ids[lang]) - set().union(*(set(ids[o]) for o in langs if o != lang)) for lang in langs}
    assert all(exclusive.values())
    model = planted_model(tokenizer, exclusive)
    stats = record(model, tokenizer, text_corpus(langs), tmp_path, RecordConfig(batch_size=2), progress=False)
    p = stats.probs(torch.float64)
    for k, lang in enumerate(langs):
        for j, owner in enumerate(langs):
            expected = sum(i in exclusive[owner] for i in ids[lang]) / len(ids[lang])
            assert p[k, 0, j].item() == pytest.approx(expected, abs=0)
            if owner != lang:
                assert p[k, 0, j].item() == 0.0
        assert p[k, 0, k].item() > 0.2


def test_shards_merge_to_full_run(llama, tokenizer, tmp_path):
    corpus = text_corpus()
    full = record(llama, tokenizer, corpus, tmp_path / "full", RecordConfig(), progress=False)
    for i in range(2):
        record(llama, tokenizer, corpus, tmp_path / f"s{i}", RecordConfig(shard=(i, 2)), progress=False)
    merged = merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert torch.equal(merged.positive, full.positive) and torch.equal(merged.tokens, full.tokens)
    torch.testing.assert_close(merged.sums, full.sums)
    reloaded = ActivationStats.load(tmp_path / "merged")
    assert torch.equal(reloaded.positive, full.positive)
    assert reloaded.meta["shards"] == [0, 1]
    with pytest.raises(StatsError, match="twice"):
        merge_runs([tmp_path / "s0", tmp_path / "s0"], tmp_path / "bad")


def test_merge_refuses_other_model(llama, tokenizer, tmp_path):
    other = make_model("gpt2", vocab_size=len(tokenizer))
    record(llama, tokenizer, text_corpus(), tmp_path / "a", RecordConfig(), progress=False)
    record(other, tokenizer, text_corpus(), tmp_path / "b", RecordConfig(), progress=False)
    with pytest.raises(StatsError, match="differ"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "c")


def test_resume_skips_recorded_languages(llama, tokenizer, tmp_path, monkeypatch):
    corpus = text_corpus()
    first = record(llama, tokenizer, corpus, tmp_path, RecordConfig(), progress=False)
    calls = []
    monkeypatch.setattr(Recorder, "count", lambda *a, **k: calls.append(1))
    again = record(llama, tokenizer, corpus, tmp_path, RecordConfig(), progress=False)
    assert calls == [] and torch.equal(first.positive, again.positive)
    with pytest.raises(StatsError, match="other settings"):
        record(llama, tokenizer, corpus, tmp_path, RecordConfig(include_special=True), progress=False)


def test_interrupted_language_resumes_without_double_counting(llama, tokenizer, tmp_path, monkeypatch):
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts]
    corpus = Corpus({"en": [Example("en", text=t) for t in texts]})
    ref = record(llama, tokenizer, corpus, tmp_path / "ref", RecordConfig(batch_size=2), progress=False)
    cfg = RecordConfig(batch_size=2, flush_every=2)
    body = Recorder(llama, tokenizer, cfg).body
    real_forward, dying = dying_forward(body, 6)

    monkeypatch.setattr(type(body), "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        record(llama, tokenizer, corpus, tmp_path / "run", cfg, progress=False)
    partial = tmp_path / "run" / "stats" / ".partial" / "en.safetensors"
    assert partial.exists()
    monkeypatch.setattr(type(body), "forward", real_forward)
    resumed = record(llama, tokenizer, corpus, tmp_path / "run", cfg, progress=False)
    assert torch.equal(resumed.positive, ref.positive) and torch.equal(resumed.tokens, ref.tokens)
    assert not partial.exists()


def test_bypassed_hooks_fail_loudly(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    mlp = model.model.layers[1].mlp
    # A "fused kernel": the MLP computes its activation without calling the act_fn module.
    mlp.forward = lambda x: mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    rec = Recorder(model, tokenizer, RecordConfig())
    with pytest.raises(LangNeuronsError, match=r"layers \[1\] fired \[0\] times"):
        rec.count([Example("en", text="hello there")], progress=False)


def test_hooks_that_fire_twice_fail_loudly(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.act_fn(mlp.gate_proj(x))) * mlp.up_proj(x))
    rec = Recorder(model, tokenizer, RecordConfig())
    with pytest.raises(LangNeuronsError, match="fired"):
        rec.count([Example("en", text="hello there")], progress=False)


def test_unknown_architecture_is_one_clear_line(tokenizer):
    """A family outside the table without the Llama-style layout is one clear line (a Llama-style
    one is used with a warning: tests/test_hub.py); --mlp-act-path always works."""
    from tiny import make_model

    gpt2 = make_model("gpt2", vocab_size=len(tokenizer))
    gpt2.config.model_type = "mystery"
    with pytest.raises(ArchitectureError, match="supported families are .*mlp-act-path"):
        locate_activations(gpt2)
    sites = locate_activations(gpt2, act_path="transformer.h.{i}.mlp.act")
    assert sites.num_layers == 2 and sites.num_neurons == 48


def test_truncation_warns(llama, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="truncated"):
        s = record(llama, tokenizer, text_corpus(("en", "de")), tmp_path, RecordConfig(max_length=5), progress=False)
    assert int(s.tokens.max()) <= 4 * 4


def test_max_tokens_per_lang_stops_early(llama, tokenizer, tmp_path):
    s = record(llama, tokenizer, text_corpus(("en", "de")), tmp_path, RecordConfig(max_tokens_per_lang=5),
               progress=False)
    first = [len(tokenizer(SAMPLE_TEXTS[x][0])["input_ids"]) - 1 for x in ("en", "de")]
    assert s.tokens.tolist() == first  # each first document alone already reaches 5 tokens


def test_stats_roundtrip_and_corruption_detected(llama, tokenizer, tmp_path):
    s = record(llama, tokenizer, text_corpus(("en", "de")), tmp_path, RecordConfig(), progress=False)
    loaded = ActivationStats.load(tmp_path)
    assert loaded.languages == ["en", "de"] and torch.equal(loaded.positive, s.positive)
    assert loaded.meta["model_fingerprint"] == s.meta["model_fingerprint"]
    f = tmp_path / "stats" / "de.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StatsError, match="de.safetensors.*corrupt"):
        ActivationStats.load(tmp_path)
    f.write_bytes(bytes(data[:40]))
    with pytest.raises(StatsError, match="de.safetensors"):
        ActivationStats.load(tmp_path)


def test_no_warnings_on_plain_run(llama, tokenizer, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record(llama, tokenizer, text_corpus(), tmp_path, RecordConfig(), progress=False)


def test_partial_counts_of_another_model_are_not_resumed(tokenizer, tmp_path, monkeypatch):
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts]
    corpus = Corpus({"en": [Example("en", text=t) for t in texts]})
    model_a, model_b = make_model("llama", seed=1, vocab_size=len(tokenizer)), make_model("llama", seed=2,
                                                                                          vocab_size=len(tokenizer))
    ref_b = record(model_b, tokenizer, corpus, tmp_path / "ref", RecordConfig(batch_size=2), progress=False)
    cfg = RecordConfig(batch_size=2, flush_every=2)
    body = Recorder(model_a, tokenizer, cfg).body
    real_forward, dying = dying_forward(body, 6)

    monkeypatch.setattr(type(body), "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        record(model_a, tokenizer, corpus, tmp_path / "run", cfg, progress=False)
    assert (tmp_path / "run" / "stats" / ".partial" / "en.safetensors").exists()
    monkeypatch.setattr(type(body), "forward", real_forward)
    got = record(model_b, tokenizer, corpus, tmp_path / "run", cfg, progress=False, force=True)
    assert torch.equal(got.positive, ref_b.positive) and torch.equal(got.tokens, ref_b.tokens)


def test_activation_layout_is_checked(llama, tokenizer):
    """An activation laid out [T, B, N] (or packed) instead of [B, T, N] fails loudly."""
    from langneurons.record import _Counter

    rec = Recorder(llama, tokenizer, RecordConfig())
    counter = _Counter(rec.sites, keep_sums=False)
    counter.fired = [1, 1]
    counter.counted_rows = [5, 5]
    counter.shapes = [(2, 7), (7, 2)]  # layer 1 is transposed
    with pytest.raises(LangNeuronsError, match=r"layers \[1\].*one row per token"):
        rec._verify(counter, 5, (2, 7))
    counter.shapes = [(2, 7), (14,)]  # OPT's flattened [B*T, N] is fine
    rec._verify(counter, 5, (2, 7))


def test_include_special_is_refused_in_response_scope(llama, tokenizer):
    with pytest.raises(LangNeuronsError, match="include-special"):
        Recorder(llama, tokenizer, RecordConfig(scope="response", include_special=True))


# -- the response-scope boundary when a token straddles it (issue 19, item 10) -------------------
#: prompt/response pairs joined by a separator where a token crosses the boundary: the tiny BPE
#: merges "去了" across "" and "Ġwarm" across "war" | "men"; " " keeps every boundary clean.
STRADDLE = {
    "": [("我们早上去", "了市场。"), ("还剩下多少个", "苹果？"), ("Die Katze saß auf der war", "men Matte.")],
    " ": [("What is two plus two?", "Two plus two is four."), ("Die Katze saß auf der", "warmen Matte.")],
}


def naive_response_counts(model, tokenizer, pairs, separator):
    """The rule written out: tokenise prompt + separator + response, count a token iff its
    character span starts at or after the response's first character (never a special token,
    never an empty span); one sequence at a time through the full model with plain hooks."""
    sites = locate_activations(model)
    pos = torch.zeros(sites.num_layers, sites.num_neurons, dtype=torch.int64)
    tokens = straddling = 0
    for prompt, response in pairs:
        start = len(prompt) + len(separator)
        enc = tokenizer(prompt + separator + response, return_offsets_mapping=True, return_special_tokens_mask=True)
        keep = torch.tensor([not s and b >= start and e > b
                             for (b, e), s in zip(enc["offset_mapping"], enc["special_tokens_mask"])])
        straddling += sum(b < start < e for b, e in enc["offset_mapping"])
        acts = {}
        handles = [m.register_forward_hook(lambda _m, _i, out, layer=layer: acts.__setitem__(layer, out[0]))
                   for layer, m in enumerate(sites.modules)]
        with torch.no_grad():
            model(input_ids=torch.tensor([enc["input_ids"]]))
        for h in handles:
            h.remove()
        for layer in range(sites.num_layers):
            pos[layer] += (acts[layer][keep] > 0).sum(0)
        tokens += int(keep.sum())
    return pos, tokens, straddling


@pytest.mark.parametrize("separator", list(STRADDLE))
def test_response_boundary_straddling_tokens_follow_the_naive_rule(llama, tokenizer, tmp_path, separator):
    pairs = STRADDLE[separator]
    corpus = Corpus({"xx": [Example("xx", prompt=p, response=r) for p, r in pairs]})
    stats = record(llama, tokenizer, corpus, tmp_path, RecordConfig(scope="response", separator=separator,
                                                                    batch_size=2), progress=False)
    pos, tokens, straddling = naive_response_counts(llama, tokenizer, pairs, separator)
    assert int(stats.tokens[0]) == tokens
    assert torch.equal(stats.positive[0], pos)
    if separator == "":
        assert straddling >= 3  # the rule is exercised: counting these would change `tokens`
