"""Confidence: per-bucket counts in recording, bootstrap stability, the permutation null, and
intervals on intervention effects.

Every number is checked against a second computation: bucket counts against recordings of
each bucket's documents alone, resampled counts against naive loops, every resample's
identification against `identify()` on the resampled stats, Jaccard overlaps against Python
sets, interval coverage against simulated documents with a known effect.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import langneurons.cli.confidence  # noqa: F401  (registers `stability` on the app)
import langneurons.record as record_mod
import langneurons.identify as ident
from langneurons import confidence as conf
from langneurons.cli import main
from langneurons.corpus import Corpus, Example
from langneurons.errors import StatsError
from langneurons.identify import identify, select_lowest
from langneurons.neurons import NeuronMap
from langneurons.record import RecordConfig, Recorder, record
from langneurons.runs import RunDir
from langneurons.stats import ActivationStats, LanguageStats, merge_runs
from tiny import SAMPLE_TEXTS, save_tiny, dying_forward



@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a machine whose cores are busy (CI, shared hosts), OpenMP
    regions of small ops can wait tens of ms each for a second thread; one thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- synthetic stats built as buckets ---------------------------------------------------------------
def planted(K: int = 4, B: int = 16, L: int = 2, N: int = 400, strong: int = 8, weak: int = 8, signal: bool = True,
            tokens: tuple[int, int] = (2000, 3000), doc_sd: float = 0.25, seed: int = 0,
            empty: dict[int, int] | None = None) -> ActivationStats:
    """Bucket counts drawn from known rates. Strong neurons (layer 0, ``strong`` per language)
    fire at 0.6 in their language and 0.01 elsewhere; weak ones (layer 1) fire 1.3x their base
    rate in their language; the rest fire at one base rate in every language. Each bucket
    (a group of documents) scales every rate by its own lognormal factor (sd ``doc_sd``), so
    resampling buckets sees realistic document-level variation. ``signal=False``: no strong or
    weak neurons at all. ``empty``: {language: number of trailing empty buckets}."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 + 0.28 * torch.rand(L, N, generator=g, dtype=torch.float64)
    p = base.expand(K, L, N).clone()
    if signal:
        for k in range(K):
            s = torch.arange(k * strong, (k + 1) * strong)
            p[:, 0, s] = 0.01
            p[k, 0, s] = 0.6
            w = torch.arange(k * weak, (k + 1) * weak)
            p[k, 1, w] = (base[1, w] * 1.3).clamp(max=1)
    bt = torch.randint(tokens[0], tokens[1], (K, B), generator=g, dtype=torch.int64)
    docs = torch.randint(3, 9, (K, B), generator=g, dtype=torch.int64)
    for k, n in (empty or {}).items():
        bt[k, B - n:] = 0
        docs[k, B - n:] = 0
    jitter = torch.exp(doc_sd * torch.randn(K, B, L, N, generator=g, dtype=torch.float64))
    pb = (p.unsqueeze(1) * jitter).clamp(0, 1)
    bp = torch.binomial(bt.view(K, B, 1, 1).to(torch.float64).expand(K, B, L, N).contiguous(), pb,
                        generator=g).to(torch.int64)
    st = ActivationStats([f"l{k}" for k in range(K)], bp.sum(1), bt.sum(1), None,
                         {"model": "planted", "model_fingerprint": "planted", "scope": "all"})
    st.bucket_positive, st.bucket_tokens, st.bucket_docs = bp.to(torch.int32), bt, docs
    st.validate()
    return st


def strong_mask(L: int = 2, N: int = 400, K: int = 4, strong: int = 8) -> torch.Tensor:
    m = torch.zeros(L, N, dtype=torch.bool)
    m[0, :K * strong] = True
    return m


def weak_mask(L: int = 2, N: int = 400, K: int = 4, weak: int = 8) -> torch.Tensor:
    m = torch.zeros(L, N, dtype=torch.bool)
    m[1, :K * weak] = True
    return m


SPEC = conf.IdentifySpec("entropy-lambda", {"top_rate": 0.08})
LAPE = conf.IdentifySpec("lape", {"top_rate": 0.08})


def quiet_identify(st: ActivationStats, spec: conf.IdentifySpec) -> NeuronMap:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return identify(st, spec.method, **spec.params)


def naive_counts(st: ActivationStats, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The resampled counts of one design row by a plain loop over (target, source, bucket)."""
    K, _, B = W.shape
    pos = torch.zeros_like(st.positive)
    tok = torch.zeros(K, dtype=torch.int64)
    for k, src, b in itertools.product(range(K), range(K), range(B)):
        m = int(W[k, src, b])
        if m:
            pos[k] += m * st.bucket_positive[src, b].to(torch.int64)
            tok[k] += m * int(st.bucket_tokens[src, b])
    return pos, tok


# -- recording keeps per-bucket counts ----------------------------------------------------------
def text_corpus(n_per_lang: int = 12) -> Corpus:
    return Corpus({lang: [Example(lang, text=f"{t} ({i})") for i in range(3) for t in SAMPLE_TEXTS[lang]][:n_per_lang]
                   for lang in ("en", "zh")})


def test_recorded_buckets_equal_recordings_of_each_bucket_alone(llama, tokenizer, tmp_path):
    """Bucket b holds documents b, b+B, b+2B, ... of each language: recording exactly those
    documents (no buckets) gives that bucket's counts; buckets sum exactly to the totals."""
    corpus = text_corpus()
    B = 5
    full = record(llama, tokenizer, corpus, tmp_path / "full", RecordConfig(buckets=B, batch_size=3), progress=False)
    assert full.has_buckets and full.num_buckets == B
    assert full.bucket_positive.shape == (2, B, full.num_layers, full.num_neurons)
    assert torch.equal(full.bucket_positive.to(torch.int64).sum(1), full.positive)
    assert torch.equal(full.bucket_tokens.sum(1), full.tokens)
    for k, lang in enumerate(corpus.languages):
        docs = corpus.by_lang[lang]
        for b in range(B):
            part = Corpus({lang: docs[b::B]})
            alone = record(llama, tokenizer, part, tmp_path / f"{lang}{b}", RecordConfig(buckets=0), progress=False)
            assert not alone.has_buckets
            assert torch.equal(full.bucket_positive[k, b].to(torch.int64), alone.positive[0]), (lang, b)
            assert int(full.bucket_tokens[k, b]) == int(alone.tokens[0])
            assert int(full.bucket_docs[k, b]) == len(docs[b::B])
    # on disk: int32 (no bucket near 2**31 tokens), content-hashed, validated on load
    loaded = ActivationStats.load(tmp_path / "full")
    assert loaded.bucket_positive.dtype == torch.int32
    assert torch.equal(loaded.bucket_positive, full.bucket_positive.to(torch.int32))
    assert not ActivationStats.load(tmp_path / "full", buckets=False).has_buckets
    manifest = RunDir(tmp_path / "full").read_manifest()
    assert manifest["stages"]["record"]["result"]["buckets"] == {"en": B, "zh": B}


def test_bucket_counts_are_validated():
    st = planted(K=2, B=4, L=1, N=10, signal=False)
    part = st.language("l0")
    part.validate()
    broken = LanguageStats("l0", part.positive, part.tokens, None, {},
                           part.bucket_positive.clone(), part.bucket_tokens.clone(), part.bucket_docs.clone())
    broken.bucket_positive[0, 0, 0] += 1
    with pytest.raises(StatsError, match="do not add up"):
        broken.validate()
    half = LanguageStats("l0", part.positive, part.tokens, None, {}, part.bucket_positive, None, None)
    with pytest.raises(StatsError, match="only some"):
        half.validate()


def test_buckets_survive_shards_and_merge(llama, tokenizer, tmp_path):
    """Shards deal documents by the same global index, so merged shards have the buckets of
    an unsharded run; merging a shard without buckets keeps the totals only (warned)."""
    corpus = text_corpus()
    cfg = dict(buckets=4, batch_size=2)
    full = record(llama, tokenizer, corpus, tmp_path / "full", RecordConfig(**cfg), progress=False)
    for i in range(3):
        record(llama, tokenizer, corpus, tmp_path / f"s{i}", RecordConfig(shard=(i, 3), **cfg), progress=False)
    merged = merge_runs([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    assert torch.equal(merged.bucket_positive.to(torch.int64), full.bucket_positive.to(torch.int64))
    assert torch.equal(merged.bucket_tokens, full.bucket_tokens) and torch.equal(merged.bucket_docs, full.bucket_docs)
    reloaded = ActivationStats.load(tmp_path / "merged")
    assert torch.equal(reloaded.bucket_positive.to(torch.int64), full.bucket_positive.to(torch.int64))
    record(llama, tokenizer, corpus, tmp_path / "nob", RecordConfig(shard=(2, 3), buckets=0, batch_size=2),
           progress=False)
    with pytest.warns(UserWarning, match="per-bucket"):
        mixed = merge_runs([tmp_path / "s0", tmp_path / "s1", tmp_path / "nob"], tmp_path / "mixed")
    assert not mixed.has_buckets and torch.equal(mixed.positive, full.positive)


def test_buckets_survive_flush_and_resume(llama, tokenizer, tmp_path, monkeypatch):
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts]
    corpus = Corpus({"en": [Example("en", text=t) for t in texts]})
    ref = record(llama, tokenizer, corpus, tmp_path / "ref", RecordConfig(batch_size=2, buckets=3), progress=False)
    cfg = RecordConfig(batch_size=2, flush_every=2, buckets=3)
    body = Recorder(llama, tokenizer, cfg).body
    real_forward, dying = dying_forward(body, 6)

    monkeypatch.setattr(type(body), "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        record(llama, tokenizer, corpus, tmp_path / "run", cfg, progress=False)
    partial = LanguageStats.load(tmp_path / "run" / "stats" / ".partial" / "en.safetensors")
    assert partial.has_buckets and 0 < partial.tokens < int(ref.tokens[0])
    assert int(partial.bucket_tokens.sum()) == partial.tokens
    monkeypatch.setattr(type(body), "forward", real_forward)
    resumed = record(llama, tokenizer, corpus, tmp_path / "run", cfg, progress=False)
    assert torch.equal(resumed.bucket_positive, ref.bucket_positive)
    assert torch.equal(resumed.bucket_tokens, ref.bucket_tokens) and torch.equal(resumed.bucket_docs, ref.bucket_docs)


def test_resume_from_a_partial_without_buckets_keeps_totals(llama, tokenizer, tmp_path, monkeypatch):
    """A partial file of an older version (no buckets): resumed, totals exact, buckets dropped (warned)."""
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts]
    corpus = Corpus({"en": [Example("en", text=t) for t in texts]})
    ref = record(llama, tokenizer, corpus, tmp_path / "ref", RecordConfig(batch_size=2), progress=False)
    cfg = RecordConfig(batch_size=2, flush_every=2)
    rec = Recorder(llama, tokenizer, cfg)
    real_forward, dying = dying_forward(rec.body, 5)

    partial_path = tmp_path / "p.safetensors"
    monkeypatch.setattr(type(rec.body), "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        rec.count(corpus.by_lang["en"], lang="en", partial=partial_path, progress=False)
    monkeypatch.setattr(type(rec.body), "forward", real_forward)
    old = LanguageStats.load(partial_path)
    LanguageStats("en", old.positive, old.tokens, old.sums, old.meta).save(partial_path)  # no buckets
    with pytest.warns(UserWarning, match="no per-bucket counts"):
        got = rec.count(corpus.by_lang["en"], lang="en", partial=partial_path, progress=False)
    assert not got.has_buckets and torch.equal(got.positive, ref.positive[0]) and got.tokens == int(ref.tokens[0])


def test_all_reduce_carries_buckets(monkeypatch):
    """The packed reduction: buckets ride along; a rank without them makes every rank drop them."""
    st = planted(K=2, B=3, L=2, N=5, signal=False).language("l0")
    st.sums = torch.rand(2, 5, dtype=torch.float64)
    rec = object.__new__(Recorder)
    monkeypatch.setattr(record_mod, "_dist", lambda: (0, 2))
    monkeypatch.setattr(record_mod.distributed, "all_reduce_sum", lambda ts: [t * 2 for t in ts])
    out = rec._all_reduce(st, 3)
    assert out.tokens == 2 * st.tokens and torch.equal(out.positive, 2 * st.positive)
    assert torch.equal(out.bucket_positive, 2 * st.bucket_positive.to(torch.int64))
    assert torch.equal(out.bucket_tokens, 2 * st.bucket_tokens) and torch.equal(out.bucket_docs, 2 * st.bucket_docs)
    torch.testing.assert_close(out.sums, 2 * st.sums)
    out.validate()
    lost = LanguageStats("l0", st.positive, st.tokens, st.sums, {})
    with pytest.warns(UserWarning, match="without per-bucket counts"):
        out = rec._all_reduce(lost, 3)
    assert not out.has_buckets and torch.equal(out.positive, 2 * st.positive)


def test_data_parallel_buckets_equal_one_process(tmp_path):
    """torchrun, 2 gloo ranks: every rank counts its documents into the same global buckets."""
    model_dir = save_tiny(tmp_path / "model", "llama")
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for lang in ("en", "ru"):
        docs = [f"{t} ({i})" for i in range(3) for t in SAMPLE_TEXTS[lang]]
        (corpus_dir / f"{lang}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    common = ["record", "--model", str(model_dir), "--corpus", str(corpus_dir), "--batch-size", "2"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "langneurons", *common, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from langneurons.models import load_model
    from langneurons.corpus import load_corpus

    loaded = load_model(model_dir, device="cpu")
    one = record(loaded.model, loaded.tokenizer, load_corpus(corpus_dir), tmp_path / "one", RecordConfig(batch_size=3),
                 model_fingerprint=loaded.fingerprint, progress=False)
    got = ActivationStats.load(tmp_path / "ddp")
    assert got.has_buckets and got.num_buckets == 16
    assert torch.equal(got.bucket_positive.to(torch.int64), one.bucket_positive.to(torch.int64))
    assert torch.equal(got.bucket_tokens, one.bucket_tokens) and torch.equal(got.bucket_docs, one.bucket_docs)


# -- designs and resampled counts -----------------------------------------------------------------
def test_designs_have_their_defining_properties():
    st = planted(K=3, B=8, L=1, N=20, signal=False, empty={1: 3})
    pools = [torch.nonzero(st.bucket_docs[k] > 0).flatten() for k in range(3)]
    W = conf.bootstrap_design(st, 30, seed=1)
    off = W.clone()
    for k in range(3):
        off[:, k, k] = 0
        assert torch.equal(W[:, k, k].sum(1), torch.full((30,), pools[k].numel()))  # n_k draws
        assert int(W[:, k, k][:, st.bucket_docs[k] == 0].sum()) == 0  # never an empty bucket
    assert int(off.abs().sum()) == 0  # only a language's own buckets
    assert torch.equal(conf.bootstrap_design(st, 30, seed=1), W)  # reproducible
    assert torch.equal(conf.bootstrap_design(st, 7, seed=1), W[:7])  # resample r depends on (seed, r) only
    assert not torch.equal(conf.bootstrap_design(st, 30, seed=2), W)
    P = conf.permutation_design(st, 25, seed=0)
    for r in range(25):
        used = P[r].sum(0)  # [source language, bucket]: how often each bucket is dealt
        assert torch.equal(used, (st.bucket_docs > 0).to(torch.int64))
        assert P[r].sum((1, 2)).tolist() == [p.numel() for p in pools]
    assert int((P[:, 0, 1:] != 0).sum()) > 0  # buckets do move between languages
    H = conf.split_half_design(st, seed=0)
    for k in range(3):
        a, b = H[0, k, k], H[1, k, k]
        assert int((a * b).sum()) == 0 and torch.equal(a + b, (st.bucket_docs[k] > 0).to(torch.int64))
        assert int(a.sum()) == pools[k].numel() // 2


@pytest.mark.parametrize("tokens", [(2000, 3000), (3_000_000, 4_000_000)], ids=["float32", "float64"])
def test_design_counts_equal_naive_loops(tokens):
    st = planted(K=3, B=6, L=2, N=30, strong=4, weak=4, tokens=tokens)
    for W in (conf.bootstrap_design(st, 4, 0), conf.permutation_design(st, 4, 0), conf.split_half_design(st, 0)):
        pos, tok = conf.design_counts(st, W)
        for r in range(W.shape[0]):
            want_pos, want_tok = naive_counts(st, W[r])
            assert torch.equal(pos[r].to(torch.int64), want_pos) and torch.equal(tok[r], want_tok)
    # counts beyond 2**24 take the exact float64 path
    big = int(conf.design_counts(st, conf.bootstrap_design(st, 1, 0))[1].max()) >= 2**24
    assert big == (tokens[0] > 1_000_000)


# -- a resample's identification is identify() on the resampled stats ------------------------------
def assert_same_as_identify(st: ActivationStats, spec: conf.IdentifySpec, fit: conf.ResampleFit) -> None:
    nm = quiet_identify(st, spec)
    assert torch.equal(nm.selected, fit.selected)
    assert torch.equal(nm.classes, fit.classes)
    keep = fit.selected | (fit.classes == 3)
    active = torch.zeros_like(nm.active)
    K = len(st.languages)
    active.view(K, -1)[:, fit.sel_index] = fit.sel_languages  # language sets of the selected neurons
    lang = (nm.classes == 1) | (nm.classes == 2)
    assert torch.equal(nm.active & lang.unsqueeze(0), active)
    assert torch.equal(nm.active & keep.unsqueeze(0), nm.active)
    assert nm.meta["tau"] == fit.tau
    assert nm.meta["lambda"] == fit.lam
    assert nm.summary()["totals"]["specific"] == fit.counts()["specific"]
    if spec.method == "entropy-lambda" and spec.params.get("lam", "auto") == "auto":
        assert len(nm.meta["lambda_trace"]) == fit.evaluations
        assert nm.meta["lambda_saturated"] == fit.saturated


@pytest.mark.parametrize("spec", [SPEC, LAPE, conf.IdentifySpec("entropy-lambda", {"top_rate": 0.05, "lam": 0.03}),
                                  conf.IdentifySpec("entropy-lambda", {"top_rate": 0.08, "lam_range": (0.0, 0.05),
                                                                       "widen": True})],
                         ids=["auto", "lape", "fixed", "widen"])
@pytest.mark.parametrize("tokens", [(2000, 3000), (3_000_000, 4_000_000)], ids=["small", "beyond-2^24"])
def test_every_resample_equals_identify_on_resampled_stats(spec, tokens):
    st = planted(tokens=tokens, seed=3)
    fits: dict[int, conf.ResampleFit] = {}
    for W in (conf.bootstrap_design(st, 5, seed=0), conf.permutation_design(st, 3, seed=0)):
        fits.clear()
        conf.fit_design(st, W, spec, lambda r, fit, err: fits.__setitem__(r, fit), chunk=2,
                        tau_guess=float(quiet_identify(st, spec).meta["tau"]))
        for r in range(W.shape[0]):
            rs = conf.resampled_stats(st, W[r])
            if fits[r] is None:  # identification failed: identify() must fail too
                with pytest.raises(Exception):
                    quiet_identify(rs, spec)
                continue
            assert_same_as_identify(rs, spec, fits[r])


def test_lambda_subset_evaluation_is_exact_with_ties(monkeypatch):
    """The bisection's candidate subset: probabilities on a coarse grid (many equal scores)."""
    sizes: list[int] = []
    real = ident._select_lowest_topk
    monkeypatch.setattr(ident, "_select_lowest_topk", lambda s, k, kth=None: sizes.append(s.numel()) or real(s, k, kth))
    g = torch.Generator().manual_seed(5)
    K, L, N = 4, 3, 200
    pos = torch.randint(0, 9, (K, L, N), generator=g) * 40
    pos[:, 0, :20] = 0
    pos[:, 2, :30] = 360 + torch.randint(0, 3, (K, 30), generator=g) * 10  # busy everywhere: λ search must stop
    pos[torch.arange(K), 1, torch.arange(K)] = 400
    tok = torch.full((K,), 400, dtype=torch.int64)
    st = ActivationStats([f"l{k}" for k in range(K)], pos, tok, None, {})
    for top_rate in (0.02, 0.1, 0.3):
        spec = conf.IdentifySpec("entropy-lambda", {"top_rate": top_rate, "eps": 1e-4})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = conf.fit_counts(pos, tok, spec)
        except conf.IdentifyError:
            with pytest.raises(conf.IdentifyError):
                quiet_identify(st, spec)
            continue
        assert_same_as_identify(st, spec, fit)
    assert min(sizes) < L * N  # the subset path was taken (and agreed)


def skewed(K: int = 5, B: int = 8, L: int = 4, N: int = 1500, seed: int = 0) -> ActivationStats:
    """Like a real model (and benchmarks/stability_speed.py): most neurons share one base rate
    in every language, ~3% are boosted in 1-3 languages; every bucket jitters every rate."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(L, N, generator=g, dtype=torch.float64) ** 2 * 0.5
    p = base.expand(K, L, N) * torch.exp(0.08 * torch.randn(K, L, N, generator=g, dtype=torch.float64))
    skew = torch.rand(L, N, generator=g) < 0.03
    n = int(skew.sum())
    boost = torch.rand(K, n, generator=g).argsort(0) < torch.randint(1, 4, (n,), generator=g).unsqueeze(0)
    sk = p[:, skew]
    p[:, skew] = torch.where(boost, torch.maximum(sk, 0.3 + 0.6 * torch.rand(K, n, generator=g, dtype=torch.float64)),
                             sk * 0.1)
    bt = torch.randint(20_000, 40_000, (K, B), generator=g, dtype=torch.int64)
    pb = (p.clamp(0, 1).unsqueeze(1) * torch.exp(0.1 * torch.randn(K, B, L, N, generator=g, dtype=torch.float64)))
    bp = (pb.clamp(0, 1) * bt.view(K, B, 1, 1)).round().to(torch.int64)
    st = ActivationStats([f"l{k}" for k in range(K)], bp.sum(1), bt.sum(1), None, {})
    st.bucket_positive, st.bucket_tokens, st.bucket_docs = bp, bt, torch.full((K, B), 4, dtype=torch.int64)
    return st


def test_bisection_on_a_candidate_subset_equals_identify_on_model_like_stats(monkeypatch):
    sizes: list[int] = []
    real = ident._select_lowest_topk
    monkeypatch.setattr(ident, "_select_lowest_topk", lambda s, k, kth=None: sizes.append(s.numel()) or real(s, k, kth))
    st = skewed()
    W = conf.bootstrap_design(st, 4, seed=0)
    fits: dict[int, conf.ResampleFit] = {}
    conf.fit_design(st, W, SPEC, lambda r, fit, err: fits.__setitem__(r, fit), chunk=3)
    for r in range(4):
        assert fits[r] is not None and not fits[r].saturated  # a real bisection inside the range
        assert_same_as_identify(conf.resampled_stats(st, W[r]), SPEC, fits[r])
    assert min(sizes) < st.num_layers * st.num_neurons  # on a candidate subset (~11% of L·N at 7B scale)


def test_fast_selection_helpers_match_the_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        scores = (torch.randint(0, 30, (4, 50), generator=g).to(torch.float32) / 7)
        k = int(torch.randint(1, 200, (1,), generator=g))
        assert torch.equal(ident._select_lowest_topk(scores, k), select_lowest(scores, k))
        values = torch.rand(5000, generator=g)
        kk = int(torch.randint(1, 5000, (1,), generator=g))
        want = torch.kthvalue(values, kk).values
        for guess in (None, float(want), float(want) * 1.001, 0.5, 2.0):
            assert ident.kth_near(values, kk, guess) == want


# -- stability ------------------------------------------------------------------------------------
def test_planted_signal_strong_neurons_always_selected_noise_near_chance():
    st = planted(seed=1)
    res = conf.stability(st, SPEC, resamples=60, seed=0)
    freq = res.selection_freq
    strong, weak = strong_mask(), weak_mask()
    noise = ~(strong | weak)
    assert float(freq[strong].min()) >= 0.95  # strong neurons come back in (nearly) every resample
    assert float(freq[noise].max()) < 0.9  # no noise neuron reaches the stable core
    assert bool(res.stable_core[strong].all()) and not bool(res.stable_core[noise].any())
    # weak neurons: found more often than noise, far less reliably than strong ones
    assert float(freq[noise].mean()) < float(freq[weak].mean()) < float(freq[strong].mean())
    # noise: the slots the signal leaves, spread thinly -- near the share a random pick gets
    k = round(0.08 * 800)
    slots = (k - float(freq[strong | weak].sum())) / int(noise.sum())
    assert float(freq[noise].mean()) == pytest.approx(slots, rel=1e-5)
    assert float((freq[noise] > 0.5).float().mean()) < 0.02
    # each language's strong neurons are in its set in every resample
    for kk in range(4):
        assert float(res.language_freq[kk, 0, kk * 8:(kk + 1) * 8].min()) >= 0.95
    assert res.per_set[conf.ALL_LANGS]["full_size"] > 0


def test_stability_numbers_equal_a_naive_loop_over_identify():
    """Selection and class frequencies, per-language frequencies and every Jaccard summary
    recomputed with identify() on each resampled stats and Python sets."""
    st = planted(seed=2, N=200)
    R = 12
    res = conf.stability(st, SPEC, resamples=R, seed=4)
    W = conf.bootstrap_design(st, R, seed=4)
    full = quiet_identify(st, SPEC)
    maps = [quiet_identify(conf.resampled_stats(st, W[r]), SPEC) for r in range(R)]
    sel = torch.stack([m.selected for m in maps]).float().mean(0)
    assert torch.equal(res.selection_freq, sel)
    for name, code in (("specific", 1), ("related", 2), ("general", 3), ("unassigned", 4)):
        assert torch.equal(res.class_freq[name], torch.stack([m.classes == code for m in maps]).float().mean(0))

    def lang_set(m: NeuronMap, k: int) -> set[int]:
        mask = m.language_mask(m.languages[k], ("specific", "related"))
        return set(torch.nonzero(mask.reshape(-1)).flatten().tolist())

    def jac(a: set[int], b: set[int]) -> float:
        return len(a & b) / len(a | b) if a | b else float("nan")

    for k, lang in enumerate(st.languages):
        sets = [lang_set(m, k) for m in maps]
        pairs = [jac(a, b) for a, b in itertools.combinations(sets, 2)]
        pairs = [x for x in pairs if not math.isnan(x)]
        assert res.per_set[lang]["expected_jaccard"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
        with_full = [jac(s, lang_set(full, k)) for s in sets]
        assert res.per_set[lang]["jaccard_full_mean"] == pytest.approx(float(np.mean(with_full)), abs=1e-12)
        assert res.per_set[lang]["full_size"] == len(lang_set(full, k))
        lang_freq = torch.stack([m.language_mask(lang, ("specific", "related")) for m in maps]).float().mean(0)
        assert torch.equal(res.language_freq[k], lang_freq)
    selections = [set(torch.nonzero(m.selected.reshape(-1)).flatten().tolist()) for m in maps]
    pairs = [jac(a, b) for a, b in itertools.combinations(selections, 2)]
    assert res.per_set[conf.SELECTION]["expected_jaccard"] == pytest.approx(float(np.mean(pairs)), abs=1e-12)
    table = res.neuron_table()
    assert len(table) == int(((sel > 0) | full.selected).sum())
    row = table.iloc[0]
    assert row.selection_freq == pytest.approx(float(sel[int(row.layer), int(row.neuron)]))


def test_bootstrap_with_a_fixed_seed_is_reproducible():
    st = planted(seed=5, N=200)
    a = conf.stability(st, SPEC, resamples=10, seed=7)
    b = conf.stability(st, SPEC, resamples=10, seed=7, chunk=3)  # chunking changes nothing
    c = conf.stability(st, SPEC, resamples=10, seed=8)
    assert torch.equal(a.selection_freq, b.selection_freq) and a.per_set == b.per_set
    assert [r["lambda"] for r in a.per_resample] == [r["lambda"] for r in b.per_resample]
    assert [r["tau"] for r in a.per_resample] != [r["tau"] for r in c.per_resample]  # another seed, other resamples


def test_split_half_on_strong_signal_agrees_on_the_strong_neurons():
    st = planted(seed=1)
    sh = conf.split_half(st, SPEC, seed=0)
    W = conf.split_half_design(st, 0)
    for h in range(2):  # each half is identify() on that half's counts
        assert torch.equal(quiet_identify(conf.resampled_stats(st, W[h]), SPEC).selected, sh.halves[h].selected)
        assert bool(sh.halves[h].selected[strong_mask()].all())
    for k, lang in enumerate(st.languages):
        assert sh.jaccard[lang] > 0.3
    assert 0 < sh.jaccard[conf.SELECTION] <= 1


def test_languages_with_too_few_buckets_are_refused():
    st = planted(K=2, B=4, L=1, N=20, signal=False, empty={1: 3})
    with pytest.raises(conf.ConfidenceError, match="fewer than 2 non-empty"):
        conf.stability(st, SPEC, resamples=5)
    st.bucket_positive = st.bucket_tokens = st.bucket_docs = None
    with pytest.raises(conf.ConfidenceError, match="record the run again"):
        conf.stability(st, SPEC, resamples=5)


# -- the permutation null -------------------------------------------------------------------------
def test_null_without_signal_is_consistent_with_the_observed_counts():
    st = planted(signal=False, seed=11)
    res = conf.null_distribution(st, SPEC, permutations=39, seed=0)
    for stat in ("specific", "language"):
        t = res.test(stat)
        assert t["n"] >= 30
        vals = res.values(stat)
        assert min(vals) <= t["observed"] <= max(vals)  # inside the null distribution
        assert t["p_value"] > 0.05
        assert t["p_value"] == (1 + sum(v >= t["observed"] for v in vals)) / (1 + len(vals))


def test_null_with_strong_signal_gives_the_smallest_p_value():
    st = planted(seed=1)
    res = conf.null_distribution(st, SPEC, permutations=29, seed=0)
    t = res.test("specific")
    assert t["p_value"] == pytest.approx(1 / (t["n"] + 1))
    assert t["fdr"] < 0.5 and t["observed"] >= 32
    # every permutation's counts are identify() on the relabelled stats
    W = conf.permutation_design(st, 29, seed=0)
    for row in res.null[:4]:
        if row.get("error"):
            continue
        nm = quiet_identify(conf.resampled_stats(st, W[row["resample"]]), SPEC)
        assert row["specific"] == nm.summary()["totals"]["specific"]
        assert row["related"] == nm.summary()["totals"]["related"]
    df = res.table()
    assert (df["kind"] == "observed").sum() == 1 and int(df.loc[df.kind == "observed", "specific"].iloc[0]) == t["observed"]


# -- intervals on interventions -------------------------------------------------------------------
def test_bootstrap_interval_coverage_is_nominal():
    """Documents with a known per-token effect: the paired document bootstrap that
    ablation_matrix uses covers it about 95% of the time."""
    from langneurons.evaluate import EvalResult, _bootstrap

    rng = np.random.default_rng(0)
    true, reps, n_docs = 0.3, 400, 60
    hits = 0
    for _ in range(reps):
        tok = rng.integers(20, 200, n_docs)
        base = tok * rng.gamma(4.0, 0.7, n_docs)
        delta = true + rng.normal(0.0, 0.6, n_docs)  # independent of length: the token-weighted mean is `true`
        b = EvalResult.from_docs(base.tolist(), tok.tolist(), (4 * tok).tolist())
        a = EvalResult.from_docs((base + tok * delta).tolist(), tok.tolist(), (4 * tok).tolist())
        lo, hi = _bootstrap(b, a, "nll", 500)
        hits += lo <= true <= hi
    coverage = hits / reps
    assert 0.90 <= coverage <= 0.985, coverage


def test_interval_cells_against_the_control_mean_over_seeds():
    import pandas as pd

    rows = []

    def add(nset, k, j, delta, lo, hi, seed=None):
        rows.append({"deactivated_lang": k, "eval_lang": j, "neuron_set": nset, "metric": "nll", "base": 1.0,
                     "ablated": 1.0 + delta, "delta": delta, "n_tokens": 10, "seed": seed, "n_neurons": 5,
                     "ci_low": lo, "ci_high": hi})

    add("specific", "en", "en", 0.5, 0.4, 0.6)  # far above the control
    add("specific", "en", "zh", 0.02, -0.01, 0.05)  # interval holds the control's mean
    add("specific", "zh", "zh", 0.3, float("nan"), float("nan"))  # no interval: never marked
    for seed, d in enumerate((0.01, 0.03, 0.02)):
        for j in ("en", "zh"):
            add("random:specific", "en", j, d, d - 0.1, d + 0.1, seed)
    add("random:specific", "zh", "zh", 0.0, -0.1, 0.1, 0)
    cells = conf.interval_cells(pd.DataFrame(rows)).set_index(["deactivated_lang", "eval_lang"])
    assert cells.loc[("en", "en"), "control_mean"] == pytest.approx(0.02)
    assert cells.loc[("en", "en"), "control_sd"] == pytest.approx(float(np.std([0.01, 0.03, 0.02], ddof=1)))
    assert cells.loc[("en", "en"), "control_seeds"] == 3
    assert bool(cells.loc[("en", "en"), "excludes_control"])
    assert not bool(cells.loc[("en", "zh"), "excludes_control"])
    assert not bool(cells.loc[("zh", "zh"), "excludes_control"])
    assert math.isnan(cells.loc[("zh", "zh"), "control_sd"])


# -- command line and report -----------------------------------------------------------------------
def make_run(path: Path, *, buckets: bool = True, identify_map: bool = True) -> ActivationStats:
    st = planted(seed=1)
    if not buckets:
        st.bucket_positive = st.bucket_tokens = st.bucket_docs = None
    st.save(path, extra_manifest={"model": {"model": "planted", "model_fingerprint": "planted"},
                                  "record": {"scope": "all"}})
    if identify_map:
        assert main(["identify", str(path), "--top-rate", "0.08"]) is None
    return st


def test_cli_stability_and_null_write_their_files(tmp_path, capsys):
    make_run(tmp_path)
    main(["stability", str(tmp_path), "--resamples", "20", "--null", "permutations=15", "--no-progress"])
    out = capsys.readouterr().out
    assert "stable core" in out and "chance baseline" in out and "p-value" in out
    import pandas as pd

    table = pd.read_parquet(tmp_path / conf.STABILITY_FILE)
    langs = pd.read_parquet(tmp_path / conf.STABILITY_LANG_FILE)
    null = pd.read_parquet(tmp_path / conf.NULL_FILE)
    assert {"layer", "neuron", "selection_freq", "freq_specific", "freq_related", "freq_general",
            "in_full_selection", "stable"} <= set(table.columns)
    assert list(langs["set"]) == ["l0", "l1", "l2", "l3", conf.ALL_LANGS, conf.SELECTION]
    assert (null["kind"] == "null").sum() == 15
    nmap = NeuronMap.load(tmp_path)
    freq, core = nmap.extras["selection_freq"], nmap.extras["stable_core"]
    assert freq.dtype == torch.float32 and freq.shape == nmap.selected.shape and core.dtype == torch.bool
    assert torch.equal(core, freq >= 0.9)
    for r in table.itertuples():
        assert freq[r.layer, r.neuron] == pytest.approx(r.selection_freq)
    assert int(core.sum()) == int(table["stable"].sum())
    manifest = RunDir(tmp_path).read_manifest()
    assert manifest["stages"]["stability"]["result"]["resamples"] == 20
    assert manifest["stages"]["stability"]["result"]["neuron_map_updated"] is True
    assert manifest["stages"]["null"]["result"]["tests"]["specific"]["p_value"] == pytest.approx(1 / 16, abs=0.02)
    RunDir(tmp_path).verify_checksum(tmp_path / "neurons.safetensors")  # the map was rewritten with its checksum
    # --quick: split-half only
    main(["stability", str(tmp_path), "--quick"])
    assert (tmp_path / conf.SPLIT_HALF_FILE).is_file()
    assert "split_half" in RunDir(tmp_path).read_manifest()["stages"]


def test_cli_parameters_come_from_the_run(tmp_path):
    make_run(tmp_path)
    spec = conf.run_spec(tmp_path)
    assert spec.method == "entropy-lambda" and spec.params["top_rate"] == 0.08 and spec.params["lam"] == "auto"
    lam = NeuronMap.load(tmp_path).meta["lambda"]
    assert conf.run_spec(tmp_path, lam="fixed").params["lam"] == lam
    assert conf.run_spec(tmp_path, method="lape").params == {"top_rate": 0.08, "bar": 0.95}
    with pytest.raises(conf.ConfidenceError, match="entropy-lambda only"):
        conf.run_spec(tmp_path, method="lape", lam="0.1")


@pytest.mark.parametrize("args, message", [
    (["--resamples", "5"], "record the run again"),
    (["--null", "perms=3"], "permutations=N"),
    (["--resamples", "0"], "nothing to do"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    make_run(tmp_path, buckets=False, identify_map=False)
    with pytest.raises(SystemExit) as exc:
        main(["stability", str(tmp_path), *args, "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_report_gains_a_confidence_section(tmp_path):
    import pandas as pd

    from langneurons.report import build_report
    from langneurons.report import confidence as report_conf

    report_conf.register()  # another test may have replaced the section of this name
    make_run(tmp_path)
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert 'id="section-confidence"' not in text  # nothing to show yet
    main(["stability", str(tmp_path), "--resamples", "12", "--null", "8", "--no-progress"])
    # an ablation matrix with intervals: one cell far from its control
    rows = []
    for k, j in itertools.product(("l0", "l1"), repeat=2):
        d = 0.5 if k == j else 0.01
        rows.append({"deactivated_lang": k, "eval_lang": j, "neuron_set": "specific", "metric": "nll", "base": 2.0,
                     "ablated": 2.0 + d, "delta": d, "n_tokens": 100, "seed": None, "n_neurons": 8,
                     "ci_low": d - 0.05, "ci_high": d + 0.05})
        for seed in range(3):
            rows.append({**rows[-1], "neuron_set": "random:specific", "delta": 0.01 * seed, "seed": seed})
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    df.to_parquet(RunDir(tmp_path).ablation_path, index=False)
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert 'id="section-confidence"' in text
    for fig in ("confidence_selection_freq", "confidence_language_stability", "confidence_null",
                "confidence_ablation_specific"):
        assert f'id="figure-{fig}"' in text and (RunDir(tmp_path).figures_dir / f"{fig}.png").is_file()
    assert "2 of 4 cells with an interval exclude" in text
