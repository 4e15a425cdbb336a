"""Identification: LAPE and entropy-λ against an independent naive per-neuron implementation,
planted ground truth, the automatic λ search (with saturation), bad input and the CLI."""

from __future__ import annotations

import json
import math
import random
import struct
import warnings

import pytest

from helpers import run_cli
import torch

from langneurons.errors import LangNeuronsError, StatsError
from langneurons.identify import (METHODS, EntropyLambda, IdentifyError, LambdaSearchError, Lape, Selector,
                                  RADIX_MIN, activation_probs, format_summary, identify, kth_smallest,
                                  register_method, select_lowest)
from langneurons.neurons import CLASS_CODE, NeuronMap, to_lape
from langneurons.runs import RunDir
from langneurons.stats import ActivationStats


# ======================================================================================
# An independent, naive implementation: pure Python floats, one neuron at a time.
# ======================================================================================
def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (round half to even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Naive:
    """Plain-Python transcription of the definitions (docs/identify.md)."""

    def __init__(self, positive: list, tokens: list[int], bar: float, top_rate: float):
        self.K, self.L, self.N = len(positive), len(positive[0]), len(positive[0][0])
        K, L, N = self.K, self.L, self.N
        # float32(count) / float32(tokens), rounded to float32
        self.p = [[[f32(f32(positive[k][l][n]) / f32(tokens[k])) for n in range(N)] for l in range(L)]
                  for k in range(K)]
        values = sorted(self.p[k][l][n] for k in range(K) for l in range(L) for n in range(N))
        self.k_tau = round(len(values) * bar)
        self.tau = values[self.k_tau - 1]  # 1-indexed kth smallest
        self.k_sel = round(L * N * top_rate)
        self.neurons = [(l, n) for l in range(L) for n in range(N)]  # flat index = l*N + n
        self.vec = {(l, n): [self.p[k][l][n] for k in range(K)] for (l, n) in self.neurons}
        self.n_act = {x: sum(1 for v in self.vec[x] if v > self.tau) for x in self.neurons}

    # -- scores ---------------------------------------------------------------------------
    def lape_score(self, x) -> float:
        vec = self.vec[x]
        if self.n_act[x] == 0:
            return math.inf
        s = 0.0
        for v in vec:
            s += v
        q = [v / s for v in vec] if s > 0 else [0.0] * self.K
        h = 0.0
        for v in q:
            if v > 0:
                h -= v * math.log(v)
        return f32(h)

    def el_score(self, x, lam: float) -> float:
        vec = self.vec[x]
        K = self.K
        s = 0.0
        for v in vec:
            s += v
        q = [1.0 / K] * K if s <= 0 else [v / s for v in vec]
        q = [max(v, 1e-12) for v in q]
        s2 = 0.0
        for v in q:
            s2 += v
        q = [v / s2 for v in q]
        h = 0.0
        for v in q:
            h -= v * math.log(v)
        c = 0.0
        for j in range(1, K + 1):
            c += 1 / j
        c /= K
        return f32(h / math.log(K) - max(vec) * lam / c)

    def select(self, scores: dict, k: int) -> set:
        order = sorted(range(len(self.neurons)), key=lambda i: (scores[self.neurons[i]], i))
        return {self.neurons[i] for i in order[:k]}

    # -- methods --------------------------------------------------------------------------
    def lape(self):
        scores = {x: self.lape_score(x) for x in self.neurons}
        eligible = sum(1 for x in self.neurons if self.n_act[x] > 0)
        if eligible == 0:
            return None, scores
        return self.select(scores, min(self.k_sel, eligible)), scores

    def entropy_lambda(self, lam: float):
        scores = {x: self.el_score(x, lam) for x in self.neurons}
        return self.select(scores, self.k_sel), scores

    def appear_k(self, selected: set) -> int:
        return sum(1 for x in selected if self.n_act[x] == self.K)

    def auto_lambda(self, lo: float, hi: float, eps: float, widen=True, max_widen=10, lam_max=100.0):
        """Returns (λ, trace) or ('error', trace). The spec: evaluate lo and hi; widen while hi passes;
        then while hi - lo > eps: mid passes -> best = mid, lo = mid; else hi = mid."""
        trace = []

        def ok(lam):
            sel, _ = self.entropy_lambda(lam)
            a = self.appear_k(sel)
            trace.append((lam, a, a == 0))
            return a == 0

        lo0 = lo
        ok_lo, ok_hi = ok(lo), ok(hi)
        if not ok_lo:
            return "error", trace
        best = lo
        if ok_hi:
            best = hi
            if widen:
                n = 0
                while ok_hi and n < max_widen and lo0 + 2 * (hi - lo0) <= lam_max:
                    lo, hi = hi, lo0 + 2 * (hi - lo0)
                    n += 1
                    ok_hi = ok(hi)
                    if ok_hi:
                        best = hi
                if ok_hi:
                    return best, trace
        while hi - lo > eps:
            mid = (lo + hi) / 2
            if ok(mid):
                best, lo = mid, mid
            else:
                hi = mid
        return best, trace

    def classes(self, selected: set) -> dict:
        out = {}
        for x in self.neurons:
            a = self.n_act[x]
            if a == self.K:
                out[x] = "general"
            elif x in selected and a == 1:
                out[x] = "specific"
            elif x in selected and 2 <= a <= self.K - 1:
                out[x] = "related"
            elif x in selected and a == 0:
                out[x] = "unassigned"
            else:
                out[x] = "none"
        return out

    def appear(self, selected: set) -> list[int]:
        out = [0] * (self.K + 1)
        for x in selected:
            out[self.n_act[x]] += 1
        return out


def random_counts(K: int, L: int, N: int, seed: int, equal_tokens: bool):
    """Random counts with ties on purpose: zero columns, duplicated and permuted columns,
    coarse counts (many equal probabilities, also at τ), skewed and all-high neurons."""
    rng = random.Random(seed)
    if equal_tokens:
        tokens = [rng.choice([40, 100, 250])] * K
    else:
        tokens = [rng.randint(20, 300) for _ in range(K)]
        tokens[-1] = tokens[0]
    cols: list[list[int]] = []
    for _ in range(L * N):
        u = rng.random()
        if u < 0.08 or not cols:
            col = [0] * K
        elif u < 0.18:
            col = list(rng.choice(cols))
        elif u < 0.28:
            col = list(rng.choice(cols))
            rng.shuffle(col)
        elif u < 0.45:
            j = rng.randrange(K)
            col = [rng.randint(0, t // 10) for t in tokens]
            col[j] = rng.randint(tokens[j] // 2, tokens[j])
        elif u < 0.52:
            col = [rng.randint(t * 3 // 4, t) for t in tokens]
        elif u < 0.535:
            col = [t - rng.randint(0, 1) for t in tokens]  # fires (almost) always: general
        elif u < 0.65:
            f = rng.choice([0.1, 0.25, 0.5])
            col = [round(f * t) for t in tokens]
        else:
            col = [rng.randint(0, t) // 5 * 5 for t in tokens]
        col = [min(c, t) for c, t in zip(col, tokens)]
        cols.append(col)
    positive = [[[cols[l * N + n][k] for n in range(N)] for l in range(L)] for k in range(K)]
    return positive, tokens


def to_stats(positive, tokens, langs=None, meta=None) -> ActivationStats:
    K = len(positive)
    return ActivationStats(languages=langs or [f"l{k}" for k in range(K)],
                           positive=torch.tensor(positive, dtype=torch.int64),
                           tokens=torch.tensor(tokens, dtype=torch.int64), sums=None, meta=meta or {})


def as_set(mask: torch.Tensor) -> set:
    return {tuple(x) for x in mask.nonzero().tolist()}


def check_against_naive(est: Selector, naive: Naive, selected: set, scores: dict) -> None:
    assert est.tau_ == naive.tau
    assert as_set(est.selected_) == selected
    assert len(selected) == int(est.selected_.sum())
    for (l, n), s in scores.items():
        assert float(est.scores_[l, n]) == s, (l, n)
    for (l, n), a in naive.n_act.items():
        assert int(est.n_active_[l, n]) == a
    classes = naive.classes(selected)
    for (l, n), name in classes.items():
        assert int(est.classes_[l, n]) == CLASS_CODE[name], (l, n, name)
    assert est.appear_ == naive.appear(selected)
    nmap = est.neuron_map_
    for (l, n) in naive.neurons:
        keep = (l, n) in selected or naive.n_act[(l, n)] == naive.K
        for k in range(naive.K):
            assert bool(nmap.active[k, l, n]) == (keep and naive.p[k][l][n] > naive.tau)


CASES = [(K, seed, eq) for K in (2, 3, 5, 10) for seed in (0, 1) for eq in (False, True)]


# ======================================================================================
# (1) vectorised == naive
# ======================================================================================
@pytest.mark.parametrize("K,seed,equal_tokens", CASES)
@pytest.mark.parametrize("bar,top_rate", [(0.95, 0.1), (0.6, 0.25)])
def test_lape_matches_naive(K, seed, equal_tokens, bar, top_rate):
    positive, tokens = random_counts(K, 3, 41, seed, equal_tokens)
    naive = Naive(positive, tokens, bar, top_rate)
    selected, scores = naive.lape()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few-token warning
        if selected is None:
            with pytest.raises(IdentifyError, match="LAPE selects nothing"):
                Lape(top_rate=top_rate, bar=bar).fit(to_stats(positive, tokens))
            return
        est = Lape(top_rate=top_rate, bar=bar).fit(to_stats(positive, tokens))
    check_against_naive(est, naive, selected, scores)
    assert est.lambda_ is None


@pytest.mark.parametrize("K,seed,equal_tokens", CASES)
@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3])
def test_entropy_lambda_fixed_matches_naive(K, seed, equal_tokens, lam):
    positive, tokens = random_counts(K, 3, 41, seed, equal_tokens)
    naive = Naive(positive, tokens, 0.95, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = EntropyLambda(top_rate=0.1, bar=0.95, lam=lam).fit(to_stats(positive, tokens))
    selected, scores = naive.entropy_lambda(lam)
    check_against_naive(est, naive, selected, scores)
    assert est.lambda_ == lam


def test_random_cases_really_have_ties():
    """The comparisons above are only meaningful if ties occur at τ and at the selection cut."""
    tau_ties = cut_ties = 0
    for K, seed, eq in CASES:
        positive, tokens = random_counts(K, 3, 41, seed, eq)
        naive = Naive(positive, tokens, 0.95, 0.1)
        flat = [naive.p[k][l][n] for k in range(K) for l in range(3) for n in range(41)]
        tau_ties += flat.count(naive.tau) > 1
        for lam in (0.0, 0.05, 0.3):
            _, scores = naive.entropy_lambda(lam)
            ordered = sorted(scores.values())
            cut_ties += ordered[naive.k_sel - 1] == ordered[naive.k_sel]
    assert tau_ties >= len(CASES) // 2
    assert cut_ties >= 6


AUTO = [((0.0, 0.2), 0.1, 0.95), ((0.0, 1.0), 0.1, 0.95), ((0.0, 0.2), 0.4, 0.95), ((0.0, 1.0), 0.4, 0.6),
        ((0.0, 1.0), 0.25, 0.8)]


@pytest.mark.parametrize("K,seed,equal_tokens", CASES)
@pytest.mark.parametrize("lam_range,top_rate,bar", AUTO)
def test_auto_lambda_matches_naive(K, seed, equal_tokens, lam_range, top_rate, bar):
    positive, tokens = random_counts(K, 3, 41, seed, equal_tokens)
    naive = Naive(positive, tokens, bar, top_rate)
    best, trace = naive.auto_lambda(*lam_range, eps=1e-3)
    est = EntropyLambda(top_rate=top_rate, bar=bar, lam="auto", lam_range=lam_range)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if best == "error":
            with pytest.raises(LambdaSearchError):
                est.fit(to_stats(positive, tokens))
        else:
            est.fit(to_stats(positive, tokens))
    got = [(t["lambda"], t["appear_K"], t["passes"]) for t in est.lambda_trace_]
    assert got == trace
    if best != "error":
        assert est.lambda_ == best
        selected, scores = naive.entropy_lambda(best)
        check_against_naive(est, naive, selected, scores)
        assert est.neuron_map_.meta["lambda_trace"] == est.lambda_trace_


def test_auto_lambda_cases_cover_every_branch():
    """Over the random cases, the search must hit: a real bisection, saturation, and failure at lo."""
    outcomes = set()
    for K, seed, eq in CASES:
        positive, tokens = random_counts(K, 3, 41, seed, eq)
        for rng, rate, bar in AUTO:
            naive = Naive(positive, tokens, bar, rate)
            best, trace = naive.auto_lambda(*rng, eps=1e-3)
            if best == "error":
                outcomes.add("error")
            elif trace[1][2]:
                outcomes.add("saturated")
            else:
                outcomes.add("bisect")
    assert outcomes == {"bisect", "error", "saturated"}


def test_probabilities_use_the_published_float32_arithmetic():
    """float32(count) / float32(tokens): above 2**24 this differs from the correctly rounded ratio,
    and the published codes (hence τ and the activity test) use the former."""
    rng = random.Random(0)
    tokens = [2**24 + rng.randint(1, 2**22) for _ in range(3)]
    positive = [[[rng.randint(2**24, t) for _ in range(50)]] for t in tokens]
    probs = activation_probs(to_stats(positive, tokens))
    differs = 0
    for k in range(3):
        for n in range(50):
            c, t = positive[k][0][n], tokens[k]
            assert float(probs[k, 0, n]) == f32(f32(c) / f32(t))
            differs += f32(c / t) != f32(f32(c) / f32(t))
    assert differs > 0


@pytest.mark.filterwarnings("ignore:language .* counted tokens")
def test_rounding_is_pythons_round():
    """k = round(bar·M) (half to even) and round(top_rate·L·N): 2.5 -> 2, 3.5 -> 4."""
    positive = [[[1, 2, 3, 4, 5]], [[6, 7, 8, 9, 10]]]
    stats = to_stats(positive, [10, 10])
    assert Lape(top_rate=0.5, bar=0.25).fit(stats).tau_ == f32(0.2)  # k = round(2.5) = 2
    assert Lape(top_rate=0.5, bar=0.35).fit(stats).tau_ == f32(0.4)  # k = round(3.5) = 4
    est = EntropyLambda(top_rate=0.5, bar=0.25, lam=0.0).fit(stats)  # round(2.5) = 2 selected
    assert int(est.selected_.sum()) == 2
    est = EntropyLambda(top_rate=0.7, bar=0.25, lam=0.0).fit(stats)  # round(3.5) = 4 selected
    assert int(est.selected_.sum()) == 4


@pytest.mark.parametrize("kind", ["probs", "signed", "ties", "zeros_inf"])
def test_kth_smallest_equals_kthvalue(kind):
    g = torch.Generator().manual_seed(["probs", "signed", "ties", "zeros_inf"].index(kind))
    n = RADIX_MIN + 17
    if kind == "probs":
        x = (torch.randint(0, 300, (n,), generator=g).float() / 300.0)
    elif kind == "signed":
        x = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.25
    else:
        x = torch.randn(n, generator=g)
        x[::7] = 0.0
        x[1::7] = -0.0
        x[2::11] = math.inf
        x[3::13] = -math.inf
    ks = {1, 2, n // 3, n // 2, round(0.95 * n), n - 1, n}
    ks |= {int(torch.randint(1, n + 1, (1,), generator=g)) for _ in range(4)}
    for k in sorted(ks):
        got, want = kth_smallest(x, k), torch.kthvalue(x, k).values
        assert got.item() == want.item(), (kind, k)


def test_select_lowest_large_matches_stable_sort():
    """Above RADIX_MIN: same as taking the first k of a stable ascending sort (ties by index)."""
    g = torch.Generator().manual_seed(5)
    scores = (torch.randint(0, 50, (4, RADIX_MIN // 2 + 3), generator=g).float() - 25) / 7
    flat = scores.reshape(-1)
    for k in (1, 1000, flat.numel() // 2, flat.numel() - 5):
        ref = torch.zeros_like(flat, dtype=torch.bool)
        ref[torch.sort(flat, stable=True).indices[:k]] = True
        assert torch.equal(select_lowest(scores, k).reshape(-1), ref), k


def test_select_lowest_tie_rule():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0], [2.0, 0.5, 2.0, 9.0]])
    got = select_lowest(scores, 4)
    # 0.5, 1.0, then two of the four 2.0s: the lowest flat indices (0,2) and (0,3)
    assert as_set(got) == {(1, 1), (0, 1), (0, 2), (0, 3)}
    assert int(select_lowest(scores, 0).sum()) == 0
    assert bool(select_lowest(scores, 99).all())


# ======================================================================================
# (2) planted ground truth
# ======================================================================================
def planted(K: int, L: int = 2, N: int = 200, n_general: int = 3, seed: int = 0, empty_last: bool = False):
    """tokens 1000 each; background neurons fire with p = 0.1 everywhere (that is τ);
    specific: p = 0.9 in one language; related: 0.9 in two; general: 0.95 / 0.5 in all;
    unassigned candidates: p = 0.05 in one language (skewed but never above τ)."""
    T = 1000
    rng = random.Random(seed)
    spots = [(l, n) for l in range(L) for n in range(N)]
    rng.shuffle(spots)
    truth: dict[str, list] = {"specific": [], "related": [], "general": [], "unassigned": []}
    langs_with = range(K - 1) if empty_last else range(K)
    cols = {}

    def plant(cls, col, langs):
        pos = spots.pop()
        cols[pos] = col
        truth[cls].append((pos, langs))

    for k in langs_with:
        for _ in range(2):
            col = [0] * K
            col[k] = 900
            plant("specific", col, {k})
    if K >= 3:
        ring = K - 1 if empty_last else K
        for k in langs_with:
            j = (k + 1) % ring
            if j == k:
                continue
            col = [0] * K
            col[k] = col[j] = 900
            plant("related", col, {k, j})
    for _ in range(n_general):
        col = [500] * K
        col[0] = 950
        plant("general", col, set(range(K)))
    for k in (0, K - 1):
        col = [0] * K
        col[k] = 50
        plant("unassigned", col, set())
    positive = [[[100] * N for _ in range(L)] for _ in range(K)]
    for (l, n), col in cols.items():
        for k in range(K):
            positive[k][l][n] = col[k]
    return positive, [T] * K, truth


def check_planted(nmap: NeuronMap, truth: dict, expect_selected: set, K: int) -> None:
    names = {CLASS_CODE[c]: c for c in CLASS_CODE}
    expected_class = {}
    for cls, items in truth.items():
        for pos, langs in items:
            if cls == "general":
                expected_class[pos] = "general"
            elif pos in expect_selected:
                expected_class[pos] = cls
    for l in range(nmap.num_layers):
        for n in range(nmap.num_neurons):
            assert names[int(nmap.classes[l, n])] == expected_class.get((l, n), "none"), (l, n)
    for cls, items in truth.items():
        for pos, langs in items:
            if pos in expect_selected or cls == "general":
                assert {k for k in range(K) if nmap.active[k, pos[0], pos[1]]} == (langs if cls != "unassigned" else set())
    assert as_set(nmap.selected) == expect_selected


@pytest.mark.parametrize("K", [2, 3, 4, 7, 10])
def test_planted_entropy_lambda(K):
    positive, tokens, truth = planted(K)
    spec = {p for p, _ in truth["specific"]}
    rel = {p for p, _ in truth["related"]}
    una = {p for p, _ in truth["unassigned"]}
    L, N = 2, 200
    k = len(spec) + len(rel) + len(una)
    est = EntropyLambda(top_rate=k / (L * N), lam=0.0).fit(to_stats(positive, tokens))
    assert est.tau_ == f32(0.1)
    check_planted(est.neuron_map_, truth, spec | rel | una, K)
    appear = [0] * (K + 1)
    appear[0], appear[1] = len(una), len(spec)
    if K >= 3:
        appear[2] = len(rel)
    assert est.appear_ == appear
    assert est.neuron_map_.meta["num_unassigned"] == len(una)
    counts = est.neuron_map_.counts_per_language()
    for k in range(K):
        assert counts[f"l{k}"]["specific"] == 2
        assert counts[f"l{k}"]["general"] == 3


@pytest.mark.parametrize("K", [2, 3, 5, 10])
def test_planted_lape(K):
    positive, tokens, truth = planted(K)
    spec = {p for p, _ in truth["specific"]}
    rel = {p for p, _ in truth["related"]}
    gen = {p for p, _ in truth["general"]}
    L, N = 2, 200
    est = Lape(top_rate=(len(spec) + len(rel)) / (L * N)).fit(to_stats(positive, tokens))
    check_planted(est.neuron_map_, truth, spec | rel, K)
    # with room for more, LAPE takes the general neurons next (the skewed-but-inactive ones are prefiltered)
    est = Lape(top_rate=(len(spec) + len(rel) + len(gen)) / (L * N)).fit(to_stats(positive, tokens))
    check_planted(est.neuron_map_, truth, spec | rel | gen, K)
    assert est.appear_[K] == len(gen)
    assert est.neuron_map_.meta["num_unassigned"] == 0


# ======================================================================================
# (3) automatic λ: largest passing λ, saturation and widening, no λ works
# ======================================================================================
def _planted_auto(K=4, **kw):
    positive, tokens, truth = planted(K, **kw)
    k = len(truth["specific"]) + len(truth["related"]) + len(truth["unassigned"])
    return to_stats(positive, tokens), k / 400


def test_auto_lambda_is_largest_passing_lambda():
    stats, top_rate = _planted_auto()
    est = EntropyLambda(top_rate=top_rate, lam="auto", lam_range=(0.0, 4.0), eps=1e-3).fit(stats)
    lam = est.lambda_
    lo, hi = est.lambda_bracket_
    assert not est.lambda_saturated_
    assert lo == lam and 0 < hi - lam <= 1e-3
    assert est.appear_[4] == 0

    def passes(x):
        return EntropyLambda(top_rate=top_rate, lam=x).fit(stats).appear_[4] == 0

    assert passes(lam) and not passes(hi)
    # monotone planted data: everything below λ passes, everything at or above hi fails
    grid = [i * 0.05 for i in range(81)]
    for x in grid:
        if x <= lam:
            assert passes(x), x
        elif x >= hi:
            assert not passes(x), x
    # the trace is the published bisection: lo, hi, then mids with hi - lo halving down to eps
    steps = [t["step"] for t in est.lambda_trace_]
    assert steps[:2] == ["lo", "hi"] and set(steps[2:]) == {"bisect"}
    assert len(steps) == 2 + math.ceil(math.log2(4.0 / 1e-3))


def test_saturated_search_widens_and_reports():
    stats, top_rate = _planted_auto()
    est = EntropyLambda(top_rate=top_rate, lam="auto", lam_range=(0.0, 0.2)).fit(stats)
    assert est.lambda_saturated_
    widen = [t["lambda"] for t in est.lambda_trace_ if t["step"] == "widen"]
    assert widen[:2] == [0.4, 0.8]
    assert [t["passes"] for t in est.lambda_trace_ if t["step"] == "widen"][-1] is False
    ref = EntropyLambda(top_rate=top_rate, lam="auto", lam_range=(0.0, 4.0)).fit(stats)
    # same answer up to the bisection resolution
    assert abs(est.lambda_ - ref.lambda_) <= 1e-3
    lo, hi = est.lambda_bracket_
    assert hi - lo <= 1e-3 and est.lambda_ == lo
    meta = est.neuron_map_.meta
    assert meta["lambda_saturated"] is True and meta["lambda_trace"][0]["step"] == "lo"
    assert "SATURATED" in format_summary(est.neuron_map_)


def test_saturated_search_without_widening_is_published_behaviour():
    stats, top_rate = _planted_auto()
    with pytest.warns(UserWarning, match="saturated"):
        est = EntropyLambda(top_rate=top_rate, lam="auto", lam_range=(0.0, 0.2), widen=False).fit(stats)
    # best = hi, then every mid passes and overwrites it: 0.1, 0.15, ..., 0.2 - 0.2/2**8
    mids = [t["lambda"] for t in est.lambda_trace_[2:]]
    expected, lo, hi = [], 0.0, 0.2
    while hi - lo > 1e-3:
        lo = (lo + hi) / 2
        expected.append(lo)
    assert mids == expected
    assert est.lambda_ == expected[-1] == 0.2 - 0.2 / 2**8
    assert est.lambda_saturated_


def test_saturated_search_hits_the_cap():
    stats, top_rate = _planted_auto(n_general=0)  # nothing is ever active in all languages
    with pytest.warns(UserWarning, match="saturated"):
        est = EntropyLambda(top_rate=top_rate, lam="auto").fit(stats)
    lams = [t["lambda"] for t in est.lambda_trace_]
    assert lams == [0.0, 0.2] + [0.2 * 2**i for i in range(1, 9)]  # 51.2; 102.4 > lam_max=100
    assert est.lambda_ == 51.2 and est.lambda_saturated_
    with pytest.warns(UserWarning, match="saturated"):
        est = EntropyLambda(top_rate=top_rate, lam="auto", max_widen=3).fit(stats)
    assert est.lambda_ == pytest.approx(1.6) and len(est.lambda_trace_) == 5


def test_no_lambda_works_is_a_clear_error():
    stats, top_rate = _planted_auto()
    # one more place: at λ = 0 the next-lowest score is a general neuron
    with pytest.raises(LambdaSearchError, match="no λ in \\[0, 0.2\\] works") as info:
        EntropyLambda(top_rate=top_rate + 1 / 400, lam="auto").fit(stats)
    assert isinstance(info.value, LangNeuronsError)
    assert "\n" not in str(info.value)


# ======================================================================================
# (5) bad input
# ======================================================================================
def _ok_counts():
    positive, tokens, _ = planted(3, N=50)
    return torch.tensor(positive), torch.tensor(tokens)


@pytest.mark.parametrize("mutate,match", [
    (lambda p, t, l: (p[:1], t[:1], l[:1]), "at least 2 languages"),
    (lambda p, t, l: (p, torch.tensor([1000, 0, 1000]), l), "zero counted tokens"),
    (lambda p, t, l: (p, torch.tensor([1000, 10, 1000]), l), "more tokens"),
    (lambda p, t, l: (p - 200, t, l), "negative"),
    (lambda p, t, l: (p.double().index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([0])),
                                           torch.tensor([math.nan], dtype=torch.float64)), t, l), "NaN"),
    (lambda p, t, l: (p, t, l[:2]), "languages named"),
    (lambda p, t, l: (p, t[:2], l), "one count per language"),
    (lambda p, t, l: (p[0], t, l), "languages, layers, neurons"),
    (lambda p, t, l: (p, t, ["a", "a", "b"]), "duplicate"),
])
@pytest.mark.parametrize("cls", [Lape, EntropyLambda])
def test_bad_stats_give_clear_errors(cls, mutate, match):
    p, t = _ok_counts()
    p, t, langs = mutate(p, t, ["a", "b", "c"])
    stats = ActivationStats(languages=langs, positive=p, tokens=t)
    with pytest.raises(StatsError, match=match) as info:
        cls(top_rate=0.05).fit(stats)
    assert "\n" not in str(info.value)


def test_stats_of_different_shapes_cannot_be_combined():
    from langneurons.stats import LanguageStats

    a = LanguageStats("a", torch.zeros(2, 5, dtype=torch.int64), 10)
    b = LanguageStats("b", torch.zeros(2, 6, dtype=torch.int64), 10)
    with pytest.raises(StatsError, match="shapes differ"):
        ActivationStats.stack([a, b])
    p, t = _ok_counts()
    stats = ActivationStats(["a", "b", "c"], p, t, sums=torch.zeros(3, 2, 7, dtype=torch.float64))
    with pytest.raises(StatsError, match="'sums' shape"):
        EntropyLambda(top_rate=0.05).fit(stats)


def test_few_tokens_warn():
    p, t = _ok_counts()
    stats = ActivationStats(["a", "b", "c"], p // 10, t // 10)
    with pytest.warns(UserWarning, match="noisy"):
        EntropyLambda(top_rate=0.05, lam=0.0).fit(stats)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_rate": 0}, "top_rate"), ({"top_rate": 1.5}, "top_rate"), ({"bar": 0}, "bar"),
    ({"bar": 1.01}, "bar"), ({"lam": "abc"}, "lam must be"), ({"lam": math.nan}, "lam must be"),
    ({"lam_range": (0.2, 0.0)}, "lo < hi"), ({"lam_range": (0.0,)}, "two numbers"), ({"eps": 0}, "eps"),
    ({"top_rate": 1e-6}, "selects"), ({"max_widen": -1}, "max_widen"), ({"lam_max": 0.1}, "lam_max"),
])
def test_bad_parameters_give_clear_errors(kwargs, match):
    p, t = _ok_counts()
    with pytest.raises(IdentifyError, match=match):
        EntropyLambda(**kwargs).fit(ActivationStats(["a", "b", "c"], p, t))


def test_identify_function_and_registry():
    positive, tokens, truth = planted(3, N=50)
    stats = to_stats(positive, tokens)
    nmap = identify(stats, method="lape", top_rate=0.1)
    assert nmap.meta["method"] == "lape" and nmap.meta["params"]["top_rate"] == 0.1
    with pytest.raises(IdentifyError, match="unknown identification method"):
        identify(stats, method="nope")
    with pytest.raises(IdentifyError, match="bad parameters"):
        identify(stats, method="lape", lam=0.1)

    @register_method("max-prob")
    class MaxProb(Selector):
        def _select(self, probs, n_active, k):
            self.scores_ = -probs.amax(0)
            self.selected_ = select_lowest(self.scores_, k)

    try:
        nmap = identify(stats, method="max-prob", top_rate=0.02)
        assert nmap.meta["method"] == "max-prob" and int(nmap.selected.sum()) == 2
    finally:
        METHODS.pop("max-prob")


def test_neuron_map_meta_contract():
    positive, tokens, _ = planted(4)
    stats = to_stats(positive, tokens, meta={"model": "m", "model_fingerprint": "fp", "scope": "all"})
    nmap = EntropyLambda(top_rate=0.035, lam="auto", lam_range=(0.0, 4.0)).fit(stats).neuron_map_
    for key in ("method", "params", "tau", "lambda", "lambda_trace", "lambda_saturated", "appear", "model",
                "model_fingerprint", "stats_fingerprint", "scope", "num_selected", "num_unassigned"):
        assert key in nmap.meta, key
    assert set(nmap.meta["params"]) >= {"top_rate", "bar", "lam", "lam_range", "eps"}
    assert nmap.meta["stats_fingerprint"] == stats.fingerprint()
    assert nmap.meta["appear"] == nmap.appear()
    assert nmap.meta["num_selected"] == int(nmap.selected.sum())
    assert nmap.scores.dtype == torch.float32 and nmap.classes.dtype == torch.int8


# ======================================================================================
# (6) CLI
# ======================================================================================
@pytest.fixture()
def run_dir(tmp_path):
    positive, tokens, truth = planted(4)
    stats = to_stats(positive, tokens, langs=["en", "de", "zh", "ru"],
                     meta={"model": "tiny", "model_fingerprint": "abc", "scope": "all"})
    stats.save(tmp_path / "run")
    return tmp_path / "run", stats, truth


def test_cli_identify_export_import(run_dir, capsys, tmp_path):
    run, stats, truth = run_dir
    code, out, err = run_cli(["identify", str(run), "--top-rate", "0.035", "--lambda-range", "0,4"], capsys)
    assert code == 0, err
    expected = EntropyLambda(top_rate=0.035, lam_range=(0.0, 4.0)).fit(ActivationStats.load(run)).neuron_map_
    nmap = NeuronMap.load(run)
    assert torch.equal(nmap.classes, expected.classes) and torch.equal(nmap.active, expected.active)
    assert nmap.meta["lambda"] == expected.meta["lambda"] and nmap.meta["model"] == "tiny"
    assert f"lambda = {expected.meta['lambda']:.6g}" in out and "tau = " in out and "appear[c]" in out
    for lang in ("en", "de", "zh", "ru"):
        assert any(line.startswith(lang) for line in out.splitlines())
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["stages"]["identify"]["result"]
    assert entry["method"] == "entropy-lambda" and entry["path"] == "neurons.safetensors"
    assert entry["tau"] == expected.meta["tau"] and entry["lambda"] == expected.meta["lambda"]
    assert entry["params"]["lam_range"] == [0.0, 4.0]
    RunDir(run).verify_checksum(run / "neurons.safetensors")

    # LAPE on a language subset, to another file
    other = tmp_path / "lape.safetensors"
    code, out, err = run_cli(["identify", str(run / "stats"), "--method", "lape", "--top-rate", "0.05",
                               "--langs", "en,zh,ru", "--out", str(other)], capsys)
    assert code == 0, err
    lape = NeuronMap.load(other)
    assert lape.languages == ["en", "zh", "ru"] and lape.meta["method"] == "lape"
    ref = Lape(top_rate=0.05).fit(stats.subset(["en", "zh", "ru"])).neuron_map_
    assert torch.equal(lape.classes, ref.classes)

    # export -> published list format
    mask = tmp_path / "mask.pt"
    code, out, err = run_cli(["export", str(run), "--format", "lape", "--classes", "specific,related",
                               "--out", str(mask)], capsys)
    assert code == 0, err
    obj = torch.load(mask, weights_only=True)
    want = to_lape(nmap, "specific,related")
    assert len(obj) == 4 and all(len(x) == 2 for x in obj)
    assert all(torch.equal(a, b) for x, y in zip(obj, want) for a, b in zip(x, y))

    # import-neurons -> same specific/related neurons
    back = tmp_path / "imported"
    back.mkdir()
    code, out, err = run_cli(["import-neurons", str(mask), "--langs", "en,de,zh,ru", "--num-neurons", "200",
                               "--out", str(back)], capsys)
    assert code == 0, err
    imported = NeuronMap.load(back)
    assert torch.equal(imported.class_mask(["specific"]), nmap.class_mask(["specific"]))
    assert torch.equal(imported.class_mask(["related"]), nmap.class_mask(["related"]))


@pytest.mark.parametrize("args,match", [
    (["identify", "{missing}"], "does not exist"),
    (["identify", "{run}", "--lambda", "abc"], "--lambda"),
    (["identify", "{run}", "--lambda-range", "0.2"], "--lambda-range"),
    (["identify", "{run}", "--method", "foo"], "unknown --method"),
    (["identify", "{run}", "--langs", "en"], "at least 2 languages"),
    (["identify", "{run}", "--langs", "en,xx"], "not in the stats"),
    (["identify", "{run}", "--top-rate", "0.05"], "no λ in"),
    (["identify", "{run}", "--method", "lape", "--lambda", "0.1"], "entropy-lambda only"),
    (["export", "{run}", "--format", "csv", "--out", "{tmp}/m.pt"], "--format"),
    (["export", "{missing}", "--out", "{tmp}/m.pt"], "does not exist"),
    (["import-neurons", "{tmp}/nothing.pt", "--langs", "en,de", "--num-neurons", "5", "--out", "{tmp}/n"],
     "does not exist"),
])
def test_cli_bad_input_exit_2(run_dir, capsys, tmp_path, args, match):
    run, _, _ = run_dir
    if "export" in args and "{run}" in args:
        assert run_cli(["identify", str(run), "--top-rate", "0.035", "--lambda-range", "0,4"], capsys)[0] == 0
    args = [a.format(run=run, missing=tmp_path / "missing", tmp=tmp_path) for a in args]
    if args[0] == "identify" and "--top-rate" not in args:
        args += ["--top-rate", "0.02"]
    code, out, err = run_cli(args, capsys)
    lines = [x for x in err.splitlines() if not x.startswith("warning:")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err


# -- the meaningful range of λ and non-finite scores (issue 19, item 5) -----------------------
def _random_stats(seed: int = 0, K: int = 3, L: int = 4, N: int = 32) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 1000, (K, L, N), generator=g)
    return ActivationStats([f"l{k}" for k in range(K)], pos, torch.full((K,), 1000), None, {})


def test_lambda_outside_the_meaningful_range_is_refused():
    from langneurons.identify import LAMBDA_LIMIT

    stats = _random_stats()
    EntropyLambda(top_rate=0.05, lam=LAMBDA_LIMIT).fit(stats)  # the limit itself is accepted
    EntropyLambda(top_rate=0.05, lam=-LAMBDA_LIMIT).fit(stats)
    for kwargs in ({"lam": 1e308}, {"lam": -1e40}, {"lam": LAMBDA_LIMIT * 1.001},
                   {"lam_range": (0.0, 1e308)}, {"lam_range": (-2e3, 0.0)}, {"lam_max": 1e9}):
        with pytest.raises(IdentifyError, match="meaningful") as exc:
            EntropyLambda(top_rate=0.05, **kwargs).fit(stats)
        assert "\n" not in str(exc.value)


def test_non_finite_scores_are_an_error_not_a_selection(monkeypatch):
    """Without the range check, λ = 1e308 overflows every score with max p > 0 to -inf; the tie
    rule would then pick the first neurons of layer 0. The finite check must refuse that."""
    import langneurons.identify as ident

    monkeypatch.setattr(ident, "LAMBDA_LIMIT", math.inf)
    with pytest.raises(IdentifyError, match="not finite at λ = 1e\\+308"):
        EntropyLambda(top_rate=0.05, lam=1e308).fit(_random_stats())
    scores = torch.zeros(2, 5)
    scores[1, 3] = float("nan")
    with pytest.raises(IdentifyError, match="1 selection scores are not finite .* layer 1, neuron 3"):
        ident.check_finite_scores(scores, "test")
    ident.check_finite_scores(torch.zeros(2, 5), "test")  # finite: no error
