"""The public per-method fast path: Selector.fit_probs / fit_many, used by confidence.py, so a
method added through register_method gets the batched resampling (and equals fit())."""

from __future__ import annotations

import warnings

import pytest
import torch

from langneurons import confidence as conf
from langneurons.identify import (
    METHODS,
    EntropyLambda,
    IdentifyError,
    LambdaSearchError,
    Lape,
    Selector,
    SelectionFit,
    register_method,
    select_lowest,
)
from langneurons.stats import ActivationStats


class MaxProb(Selector):
    """A user method: the neurons with the highest max_k p (lowest -max p)."""

    method = "test-max-prob"

    def _select(self, probs, n_active, k):
        self.scores_ = -probs.amax(0)
        self.selected_ = select_lowest(self.scores_, k)


@pytest.fixture
def registered():
    register_method("test-max-prob")(MaxProb)

    class Widened(EntropyLambda):  # a registered variant of a built-in: inherits its fast path
        method = "test-widened"

    register_method("test-widened")(Widened)
    yield
    METHODS.pop("test-max-prob", None)
    METHODS.pop("test-widened", None)


def stats_with_buckets(seed: int = 0, K: int = 4, B: int = 6, L: int = 3, N: int = 400) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(K, L, N, generator=g, dtype=torch.float64) ** 3
    p[torch.randint(0, K, (L * N // 20,), generator=g), torch.randint(0, L, (L * N // 20,), generator=g),
      torch.randint(0, N, (L * N // 20,), generator=g)] = 0.9
    bt = torch.randint(500, 900, (K, B), generator=g, dtype=torch.int64)
    bp = torch.binomial(bt.view(K, B, 1, 1).expand(K, B, L, N).double(), p.unsqueeze(1).expand(K, B, L, N),
                        generator=g).to(torch.int64)
    st = ActivationStats([f"l{k}" for k in range(K)], bp.sum(1), bt.sum(1), None, {})
    st.bucket_positive, st.bucket_tokens, st.bucket_docs = bp, bt, torch.full((K, B), 3, dtype=torch.int64)
    return st


def reference(stats: ActivationStats, method: str, params: dict) -> Selector | IdentifyError:
    sel = METHODS[method](**params)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sel.fit(stats)
    except IdentifyError as exc:
        return exc


def assert_fit_equals(fit: SelectionFit, sel: Selector) -> None:
    assert torch.equal(fit.selected, sel.selected_)
    assert torch.equal(fit.classes, sel.classes_)
    assert torch.equal(fit.active, sel.active_)
    assert torch.equal(fit.n_active.to(torch.int64), sel.n_active_.to(torch.int64))
    assert fit.tau == sel.tau_ and fit.lam == sel.lambda_


@pytest.mark.parametrize("method,params", [("lape", {}), ("entropy-lambda", {}), ("entropy-lambda", {"lam": 0.1}),
                                           ("test-max-prob", {"top_rate": 0.05}), ("test-widened", {"top_rate": 0.02})])
def test_fit_many_equals_looping_fit(registered, method, params):
    st = stats_with_buckets()
    W = conf.bootstrap_design(st, 5, seed=1)
    pos, tok = conf.design_counts(st, W)
    fits = METHODS[method](**params).fit_many(pos, tok)
    assert len(fits) == 5
    for c, fit in enumerate(fits):
        ref = reference(ActivationStats(st.languages, pos[c].to(torch.int64), tok[c].to(torch.int64), None, {}),
                        method, params)
        if isinstance(ref, IdentifyError):
            assert isinstance(fit, IdentifyError)
        else:
            assert_fit_equals(fit, ref)


@pytest.mark.parametrize("method,fast", [("test-max-prob", False), ("test-widened", True)])
def test_a_registered_method_gets_the_batched_bootstrap(registered, method, fast):
    st = stats_with_buckets(seed=2)
    spec = conf.IdentifySpec(method, {"top_rate": 0.03})
    W = conf.bootstrap_design(st, 6, seed=0)
    fits: dict[int, conf.ResampleFit | None] = {}
    info = conf.fit_design(st, W, spec, lambda r, fit, err: fits.__setitem__(r, fit), chunk=4)
    assert info["batched"] is fast  # its own fast override, or the generic per-probs path
    for r in range(6):
        ref = reference(conf.resampled_stats(st, W[r]), method, {"top_rate": 0.03})
        assert not isinstance(ref, IdentifyError) and fits[r] is not None
        assert torch.equal(fits[r].selected, ref.selected_) and torch.equal(fits[r].classes, ref.classes_)
        assert fits[r].tau == ref.tau_


def test_fit_probs_leaves_the_selector_alone_and_fit_many_reports_errors():
    st = stats_with_buckets(seed=3)
    sel = Lape().fit(st)
    before = sel.selected_.clone()
    other = stats_with_buckets(seed=4)
    sel.fit_many(other.positive, other.tokens)
    assert torch.equal(sel.selected_, before)
    # every high-λ selection is busy in all languages: no λ passes -> the error, in place
    g = torch.Generator().manual_seed(0)
    pos = (torch.rand(4, 1, 1000, generator=g) * 500).to(torch.int64)
    pos[:, :, :30] = 990
    tok = torch.full((4,), 1000, dtype=torch.int64)
    ok, err = EntropyLambda().fit_many(torch.stack([st.positive, st.positive]), torch.stack([st.tokens, st.tokens])), \
        EntropyLambda(lam_range=(5.0, 6.0)).fit_many(pos, tok)
    assert all(isinstance(f, SelectionFit) for f in ok) and isinstance(err[0], LambdaSearchError)
    with pytest.raises(LambdaSearchError):
        EntropyLambda(lam_range=(5.0, 6.0)).fit(ActivationStats(["a", "b", "c", "d"], pos[0:4], tok, None, {}))
    with pytest.raises(IdentifyError, match="bar"):
        Lape(bar=1e-9).fit_many(st.positive, st.tokens)
