"""Bootstrap intervals of the ablation matrix against an independent direct resampling loop,
exact enumeration of the distinct resamples, and the control's seed variance."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pandas as pd
import pytest

from langneurons.errors import LangNeuronsError
from langneurons.intervals import ablation_intervals, distinct_resamples, documents_frame

LANGS = ("a", "b", "c")


def _docs(n_docs=(6, 7, 5), seed_effects=(0.02, 0.05, 0.03), own=0.4, other=0.05, noise=0.3, seed=0):
    """Synthetic per-document scores: set "specific" of language k raises k's NLL by ``own``
    nats/token and the others' by ``other``; its control (seed s) by seed_effects[s] everywhere."""
    rng = np.random.default_rng(seed)
    rows = []
    tokens = {j: rng.integers(5, 40, size=n) for j, n in zip(LANGS, n_docs)}
    base = {j: tokens[j] * (2.0 + rng.normal(0, 0.5, size=len(tokens[j]))) for j in LANGS}
    for j in LANGS:
        for d, (t, b) in enumerate(zip(tokens[j], base[j])):
            rows.append(dict(neuron_set="none", deactivated_lang=None, seed=None, control=None, eval_lang=j, doc=d,
                             nll=float(b), tokens=int(t), bytes=int(3 * t)))
    for k in LANGS:
        for j in LANGS:
            eff = (own.get(k, 0.4) if isinstance(own, dict) else own) if j == k else other
            for d, (t, b) in enumerate(zip(tokens[j], base[j])):
                rows.append(dict(neuron_set="specific", deactivated_lang=k, seed=None, control=None, eval_lang=j,
                                 doc=d, nll=float(b + t * (eff + rng.normal(0, noise))), tokens=int(t),
                                 bytes=int(3 * t)))
                for s, ce in enumerate(seed_effects):
                    rows.append(dict(neuron_set="random:specific", deactivated_lang=k, seed=s, control="matched",
                                     eval_lang=j, doc=d, nll=float(b + t * (ce + rng.normal(0, noise / 3))),
                                     tokens=int(t), bytes=int(3 * t)))
    return documents_frame(rows)


def _direct(docs, R: int, seed: int):
    """Independent oracle: a plain Python loop over resamples (random.Random), summing lists."""
    rnd = random.Random(seed)
    by = {}
    for r in docs.itertuples():
        by.setdefault((r.neuron_set, None if pd.isna(r.deactivated_lang) else r.deactivated_lang, None if pd.isna(r.seed) else int(r.seed),
                       r.eval_lang), {})[r.doc] = (r.nll, r.tokens)
    n = {j: len(by[("none", None, None, j)]) for j in LANGS}
    seeds = sorted({int(s) for s in docs["seed"].dropna()})

    def cell(key, j, pick):
        base, abl = by[("none", None, None, j)], by[key + (j,)]
        return sum(abl[d][0] - base[d][0] for d in pick) / sum(base[d][1] for d in pick)

    out = {}
    for _ in range(R):
        pick = {j: [rnd.randrange(n[j]) for _ in range(n[j])] for j in LANGS}
        sd = [rnd.choice(seeds) for _ in seeds]
        for k in LANGS:
            d = {j: cell(("specific", k, None), j, pick[j]) for j in LANGS}
            c = {j: sum(cell(("random:specific", k, s), j, pick[j]) for s in sd) / len(sd) for j in LANGS}
            sel = d[k] - sum(d[j] for j in LANGS if j != k) / (len(LANGS) - 1)
            csel = c[k] - sum(c[j] for j in LANGS if j != k) / (len(LANGS) - 1)
            for name, v in (("own", d[k]), ("excess", d[k] - c[k]), ("sel", sel), ("sel_excess", sel - csel),
                            ("other", d["a" if k != "a" else "b"])):
                out.setdefault((k, name), []).append(v)
    return {key: tuple(np.percentile(v, [2.5, 97.5])) for key, v in out.items()}


def test_distinct_resamples_by_enumeration():
    for n in range(1, 7):
        multisets = sum(1 for _ in itertools.combinations_with_replacement(range(n), n))
        assert distinct_resamples(n) == multisets
    assert distinct_resamples(2) == 3 and distinct_resamples(0) == 0
    assert distinct_resamples(10_000) == 2 ** 62  # capped, no overflow


def test_intervals_match_a_direct_resampling_loop():
    docs = _docs()
    R = 3000
    res = ablation_intervals(docs, resamples=R, seed=1)
    ref = _direct(docs, R, seed=7)
    cells = res.cells.set_index(["deactivated_lang", "eval_lang"])
    sel = res.selectivity.set_index("deactivated_lang")
    for k in LANGS:
        other = "a" if k != "a" else "b"
        pairs = [((cells.loc[(k, k), "ci_low"], cells.loc[(k, k), "ci_high"]), ref[(k, "own")]),
                 ((cells.loc[(k, other), "ci_low"], cells.loc[(k, other), "ci_high"]), ref[(k, "other")]),
                 ((cells.loc[(k, k), "excess_low"], cells.loc[(k, k), "excess_high"]), ref[(k, "excess")]),
                 ((sel.loc[k, "excess_low"], sel.loc[k, "excess_high"]), ref[(k, "excess")]),
                 ((sel.loc[k, "selectivity_low"], sel.loc[k, "selectivity_high"]), ref[(k, "sel")]),
                 ((sel.loc[k, "selectivity_excess_low"], sel.loc[k, "selectivity_excess_high"]),
                  ref[(k, "sel_excess")])]
        for (lo, hi), (rlo, rhi) in pairs:
            width = rhi - rlo
            assert width > 0
            # two independent Monte Carlo runs of 3000 resamples: the 2.5/97.5 % points agree to
            # within a small share of the width
            assert lo == pytest.approx(rlo, abs=0.12 * width) and hi == pytest.approx(rhi, abs=0.12 * width)


def test_point_estimates_and_sizes_are_direct_sums():
    docs = _docs()
    res = ablation_intervals(docs, resamples=50)
    base = docs[docs.neuron_set == "none"]
    for r in res.cells.itertuples():
        real = docs[(docs.neuron_set == "specific") & (docs.deactivated_lang == r.deactivated_lang)
                    & (docs.eval_lang == r.eval_lang)]
        b = base[base.eval_lang == r.eval_lang]
        assert r.delta == pytest.approx((real.nll.sum() - b.nll.sum()) / b.tokens.sum(), rel=1e-12)
        ctrl = [(c.nll.sum() - b.nll.sum()) / b.tokens.sum() for _, c in
                docs[(docs.neuron_set == "random:specific") & (docs.deactivated_lang == r.deactivated_lang)
                     & (docs.eval_lang == r.eval_lang)].groupby("seed")]
        assert r.control_mean == pytest.approx(np.mean(ctrl), rel=1e-12)
        assert r.control_sd == pytest.approx(np.std(ctrl, ddof=1), rel=1e-9)
        assert r.excess == pytest.approx(r.delta - r.control_mean, rel=1e-12)
        assert r.n_docs == len(b) and r.n_tokens == int(b.tokens.sum()) and r.n_resamples == 50
        assert r.distinct_resamples == distinct_resamples(len(b)) and r.control == "matched"
        assert r.ci_low <= r.delta <= r.ci_high
    s = res.selectivity.set_index("deactivated_lang").loc["b"]
    c = res.cells.set_index(["deactivated_lang", "eval_lang"])
    assert s.selectivity == pytest.approx(c.loc[("b", "b"), "delta"] - (c.loc[("b", "a"), "delta"]
                                                                        + c.loc[("b", "c"), "delta"]) / 2)
    assert s.distinct_resamples == distinct_resamples(6) * distinct_resamples(7) * distinct_resamples(5)
    assert s.n_docs == 7 and s.n_docs_min == 5
    # bits per byte: the same sums over bytes * ln 2
    bpb = ablation_intervals(docs, resamples=10, metric="bpb").cells
    assert bpb.delta.to_numpy() == pytest.approx(res.cells.delta.to_numpy() / 3 / np.log(2), rel=1e-9)


def test_the_control_seed_variance_widens_the_excess_interval():
    same = ablation_intervals(_docs(seed_effects=(0.05, 0.05, 0.05), noise=0.02), resamples=2000).selectivity
    spread = ablation_intervals(_docs(seed_effects=(0.0, 0.05, 0.3), noise=0.02), resamples=2000).selectivity
    w_same = (same.excess_high - same.excess_low).to_numpy()
    w_spread = (spread.excess_high - spread.excess_low).to_numpy()
    assert (w_spread > w_same + 0.1).all()  # seeds 0.3 apart: the interval knows the control is uncertain


def test_two_documents_have_three_distinct_resamples_and_bad_input():
    docs = _docs(n_docs=(2, 2, 2))
    cells = ablation_intervals(docs, resamples=100).cells
    assert set(cells.distinct_resamples) == {3} and set(cells.n_docs) == {2}
    with pytest.raises(LangNeuronsError, match="baseline"):
        ablation_intervals(docs[docs.neuron_set != "none"])
    with pytest.raises(LangNeuronsError, match="lacks columns"):
        ablation_intervals(docs.drop(columns=["tokens"]))
    with pytest.raises(LangNeuronsError, match="resamples"):
        ablation_intervals(docs, resamples=0)
