"""Logit lens checked against independent computations: the model's own logits at the last layer,
and at every other layer hidden_states (output_hidden_states=True) with the final norm and the
unembedding applied by hand (formulas written out here, not the model's modules)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from langneurons.arch import locate_unembedding
from langneurons.lens import LensConfig, language_masks, lens_metrics, lens_summary, run_lens
from tiny import SAMPLE_TEXTS, make_model, make_tokenizer

FAMILIES = ["llama", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "bloom", "opt"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def hand_norm(model, h: torch.Tensor) -> torch.Tensor:
    norm = locate_unembedding(model).norm
    if isinstance(norm, torch.nn.LayerNorm):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    y = h.float() / torch.sqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)
    w = norm.weight.float()
    return y * (1.0 + w) if type(norm).__name__.startswith("Gemma") else y * w


def hand_logits(model, h: torch.Tensor) -> torch.Tensor:
    x = hand_norm(model, h)
    if model.config.model_type == "opt" and model.model.decoder.project_out is not None:
        x = x @ model.model.decoder.project_out.weight.T
    w = model.get_output_embeddings().weight
    out = x @ w.T
    b = getattr(model.get_output_embeddings(), "bias", None)
    if b is not None:
        out = out + b
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_equals_model_logits_and_hand_computation(family, tok):
    model = make_model(family, layers=3, vocab_size=len(tok)).eval()
    unemb = locate_unembedding(model)
    ids = tok("Die Katze saß auf der warmen Matte.", return_tensors="pt")["input_ids"]
    store = []
    handles = [l.register_forward_hook(lambda m, i, o: store.append(o[0] if isinstance(o, tuple) else o))
               for l in unemb.layers]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for hd in handles:
        hd.remove()
    assert len(store) == len(unemb.layers) == 3
    with torch.no_grad():
        lens_last = unemb.logits(store[-1])
        assert torch.allclose(lens_last, out.logits, atol=1e-5, rtol=0), (lens_last - out.logits).abs().max()
        for layer in range(len(store) - 1):
            ref = hand_logits(model, out.hidden_states[layer + 1])
            got = unemb.logits(store[layer])
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (layer, (got - ref).abs().max())
        # the hand formula also reproduces the model's logits from the last residual
        assert torch.allclose(hand_logits(model, store[-1]), out.logits, atol=1e-5, rtol=1e-5)


def naive_metrics(model, tok, texts, masks_lang, layer_count):
    """Per layer, one document at a time (no padding): p_correct, masses, entropy, top1 averaged
    over positions, from hidden_states + hand norm/unembedding (model logits at the last layer)."""
    m_lang, m_en = masks_lang
    acc = [[0.0] * 5 for _ in range(layer_count)]
    n = 0
    for t in texts:
        ids = tok(t, truncation=True, max_length=256)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model(input_ids=x, output_hidden_states=True)
        tgt = x[0, 1:]
        n += len(tgt)
        for layer in range(layer_count):
            with torch.no_grad():
                lg = out.logits[0, :-1] if layer == layer_count - 1 else \
                    hand_logits(model, out.hidden_states[layer + 1])[0, :-1]
            p = torch.softmax(lg.double(), -1)
            for i, target in enumerate(tgt.tolist()):
                acc[layer][0] += float(p[i, target])
                acc[layer][1] += float(p[i][m_lang].sum())
                acc[layer][2] += float(p[i][m_en].sum())
                acc[layer][3] += float(-(p[i] * torch.log(p[i])).sum())
                acc[layer][4] += float(int(lg[i].argmax()) == target)
    return [[v / n for v in row] for row in acc], n


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_lens_metrics_equal_a_naive_loop(family, tok):
    model = make_model(family, layers=3, vocab_size=len(tok)).eval()
    corpus = {k: SAMPLE_TEXTS[k] for k in ("en", "de", "ru")}
    # small logit chunks and odd batch size: padding and chunking must not change anything
    df = lens_metrics(model, tok, corpus, LensConfig(batch_size=3, max_logit_elems=len(tok) * 5))
    vocab = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)
    masks = language_masks(vocab, corpus)
    for lang in corpus:
        ref, n = naive_metrics(model, tok, corpus[lang], masks[lang], 3)
        g = df[df.lang == lang].sort_values("layer")
        assert g["n_tokens"].tolist() == [n] * 3
        for layer in range(3):
            row = g.iloc[layer]
            got = [row.p_correct, row.lang_mass, row.en_mass, row.entropy, row.top1]
            assert got == pytest.approx(ref[layer], abs=2e-5), (lang, layer)


def test_language_mass_rule_on_a_hand_made_vocabulary():
    vocab = ["the", " cat", "Katze", "ze", "Кош", "ка", "猫", "の", "123", " ", "in", "Ma", "дом!", "Kat"]
    corpus = {"en": ["the cat sat in the mat"], "de": ["die Katze saß in der Matte"],
              "ru": ["Кошка сидела дома"], "zh": ["猫坐在垫子上"]}
    m = language_masks(vocab, corpus)
    on = lambda mask: [v for v, b in zip(vocab, mask.tolist()) if b]  # noqa: E731
    # English tokens: Latin, >= 2 letters, inside an English word
    assert on(m["en"][0]) == on(m["en"][1]) == ["the", " cat", "in", "Ma"]
    # German: inside a German word and inside no English word ("in" is both; "Ma" is in "mat" and "Matte")
    assert on(m["de"][0]) == ["Katze", "ze", "Kat"]
    assert on(m["de"][1]) == ["the", " cat"]
    # Russian: every letter Cyrillic (punctuation ignored); English: Latin tokens inside English words
    assert on(m["ru"][0]) == ["Кош", "ка", "дом!"]
    assert on(m["ru"][1]) == on(m["en"][0])
    # Chinese: CJK only ("の" is Hiragana, not in the zh corpus's scripts)
    assert on(m["zh"][0]) == ["猫"]


def test_lens_summary_layers():
    rows = []
    for layer, (lm, em, t1) in enumerate([(0.1, 0.3, 0.0), (0.4, 0.3, 0.1), (0.2, 0.3, 0.3), (0.5, 0.2, 0.35),
                                          (0.6, 0.1, 0.4)]):
        rows.append({"layer": layer, "lang": "de", "p_correct": 0.1 * layer, "lang_mass": lm, "en_mass": em,
                     "entropy": 1.0, "top1": t1, "n_tokens": 7})
    s = lens_summary(pd.DataFrame(rows))
    assert s["de"]["overtakes_english"] == 3  # above English at 1, below at 2, above from 3 on
    assert s["de"]["correct_top1"] == 2  # >= 0.2 (half of the final 0.4) from layer 2 on
    assert s["de"]["n_tokens"] == 7 and s["de"]["final_top1"] == 0.4


def test_run_lens_writes_parquet(tmp_path, tok):
    model = make_model("llama", layers=2, vocab_size=len(tok)).eval()
    corpus = {k: SAMPLE_TEXTS[k][:2] for k in ("en", "zh")}
    df = run_lens(tmp_path, model, tok, corpus, LensConfig(batch_size=2))
    back = pd.read_parquet(tmp_path / "lens.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert set(back["lang"]) == {"en", "zh"} and sorted(set(back["layer"])) == [0, 1]
    assert ((back["lang_mass"] >= 0) & (back["lang_mass"] <= 1 + 1e-6)).all()
    assert not back[["p_correct", "entropy", "top1"]].isna().any().any()
    assert all(math.isfinite(v) for v in back["entropy"])


def test_report_section_shows_summary_and_phase_of_each_layer(tmp_path, tok):
    import json

    from langneurons.report.lens import render_section

    assert render_section(tmp_path) is None  # no lens.parquet: no section
    model = make_model("llama", layers=4, vocab_size=len(tok)).eval()
    df = run_lens(tmp_path, model, tok, {k: SAMPLE_TEXTS[k] for k in ("en", "de")}, LensConfig(batch_size=4))
    phases = [{"name": f"p{i}", "start": i, "end": i} for i in range(4)]
    (tmp_path / "anatomy.json").write_text(json.dumps({"phases": phases, "phases_reliable": True}))
    html = render_section(tmp_path)
    s = lens_summary(df)["de"]
    assert "Logit lens" in html or "logit lens" in html
    assert (tmp_path / "figures" / "lens_de.png").is_file() and (tmp_path / "figures" / "lens_en.png").is_file()
    top = s["correct_top1"]
    assert (f"{top} (P{top + 1})" if top is not None else "—") in html
    assert "P1 0–0, P2 1–1" in html
