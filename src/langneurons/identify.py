"""Identification of language neurons: LAPE and the entropy-λ method with automatic λ.

Both selectors follow the published definitions exactly (see docs/identify.md and
shared/ARCHITECTURE.md, "Identification"); the numbers are meant to be compared with the
reference implementations on real data, so every threshold, rounding and tie rule matters:

* probabilities are float32, computed as ``float32(positive) / float32(tokens)`` -- the
  arithmetic of both published codes (CPU), so τ and the activity test agree bit for bit;
* τ = ``torch.kthvalue`` of all K·L·N probabilities with ``k = round(bar·K·L·N)`` (Python's
  ``round``, 1-indexed); a neuron is *active* in language k iff ``p[k] > τ`` (strict);
* scores are computed in float64 from the float32 probabilities and stored as float32 (the
  published codes keep their score tensors in float32); the ``round(top_rate·L·N)`` lowest
  float32 scores are selected, and among equal float32 scores at the cut the lower flat
  (layer-major, ``l·N + n``) index wins. Rounding to float32 makes the cut reproducible: scores
  that are mathematically equal (e.g. permuted probability vectors) but differ in the last bits
  of a float64 computation become the same float32 number and fall under the tie rule.

Everything is vectorised: one λ evaluation is one fused float64 expression over [L, N] plus a
``kthvalue`` selection, so the automatic λ search costs a few hundredths of a second per λ at
7B scale (the published per-neuron loop takes ~20 s per λ).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .errors import LangNeuronsError, StatsError
from .neurons import UNASSIGNED, NeuronMap, class_codes
from .stats import ActivationStats

__all__ = [
    "IdentifyError", "LambdaSearchError", "Selector", "Lape", "EntropyLambda", "METHODS",
    "register_method", "identify", "activation_probs", "activation_threshold", "select_lowest",
    "selection_size", "kth_smallest", "check_finite_scores", "LAMBDA_LIMIT", "harmonic_norm", "lape_entropy",
    "normalized_entropy", "classify", "format_summary", "SelectionFit", "kth_near",
]

#: |λ| above this is refused. The score is H/ln K (in [0, 1]) − λ·max_k p/c_K (1/c_K: 1.33 at
#: K = 2, 3.4 at K = 10, 19 at K = 100), stored as float32: at |λ| = 1000 a score's float32 spacing
#: is 1e-4..2e-3, so the entropy term still orders neurons; far beyond it the entropy vanishes
#: below the float32 resolution (the selection is just "highest max p", ties cut by index) and
#: near 1e38 the scores overflow to ±inf. Published range [0, 0.2]; the widened search stops at
#: lam_max = 100. See docs/identify.md, "The range of λ".
LAMBDA_LIMIT = 1000.0
#: floor applied to the normalised distribution before the entropy (as the authors' code does)
Q_FLOOR = 1e-12
TIE_RULE = "lowest float32 score first; equal scores at the cut: lower flat index l*N+n (layer-major) first"


class IdentifyError(LangNeuronsError, ValueError):
    """Bad identification parameters, or stats that give no usable selection."""


class LambdaSearchError(IdentifyError):
    """No λ in the search range gives a selection without neurons active in all K languages."""


# -- the exact building blocks ------------------------------------------------------------
def selection_size(rate: float, total: int) -> int:
    """``round(total · rate)`` with Python's round (half to even), in the published order."""
    return round(total * float(rate))


def activation_probs(stats: ActivationStats) -> torch.Tensor:
    """float32 [K, L, N] = float32(positive) / float32(tokens).

    This is the arithmetic of both published codes (LAPE: ``over_zero / n`` on integer tensors,
    which PyTorch evaluates in float32; the authors: ``oz.to(float32) / float(tokens)``). For
    counts below 2**24 it equals the correctly rounded positive/tokens.
    """
    tokens = stats.tokens.to(torch.float32).view(-1, 1, 1)
    return stats.positive.to(torch.float32) / tokens


#: below this size `kth_smallest` simply calls torch.kthvalue
RADIX_MIN = 1 << 16


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest element (1-indexed): exactly ``torch.kthvalue(values.flatten(), k).values``.

    For large float32 inputs (no NaN) a one-pass radix step first: float32 bit patterns, with the
    low 31 bits flipped for negative numbers, order like the values, so a histogram of their
    top 16 bits finds the bucket holding the k-th value, and ``kthvalue`` runs on that bucket
    only (~4x faster on the 4.6M probabilities of a 7B model).
    """
    flat = values.reshape(-1)
    if flat.dtype != torch.float32 or flat.numel() < RADIX_MIN:
        return torch.kthvalue(flat, k).values
    bits = flat.view(torch.int32)
    bucket = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 16  # order-preserving, in [-32768, 32767]
    counts = torch.bincount(bucket + 32768, minlength=1 << 16)
    cumulative = counts.cumsum(0)
    b = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=cumulative.dtype)))
    below = int(cumulative[b - 1]) if b > 0 else 0
    return torch.kthvalue(flat[bucket == b - 32768], k - below).values


def activation_threshold(probs: torch.Tensor, bar: float) -> torch.Tensor:
    """τ: the k-th smallest probability (1-indexed, as ``torch.kthvalue``), k = round(bar·numel)."""
    k = selection_size(bar, probs.numel())
    if not 1 <= k <= probs.numel():
        raise IdentifyError(f"bar={bar} gives k={k} for {probs.numel()} probabilities; use 0 < bar <= 1")
    return kth_smallest(probs, k)


def select_lowest(scores: torch.Tensor, k: int, kth: torch.Tensor | None = None) -> torch.Tensor:
    """bool mask (shape of ``scores``) of the k lowest scores; ties at the cut -> lower flat index.

    O(numel): one ``kthvalue``, then every score strictly below the k-th value, then the
    remaining places filled with the scores equal to it in increasing flat-index order.
    ``kth`` (optional) is the k-th smallest score when the caller already has it.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = kth_smallest(flat, k) if kth is None else kth
    chosen = flat < kth
    missing = k - int(torch.count_nonzero(chosen))
    if missing > 0:
        ties = torch.nonzero(flat == kth).flatten()[:missing]  # nonzero lists indices in increasing order
        chosen[ties] = True
    return chosen.view(scores.shape)


def check_finite_scores(scores: torch.Tensor, what: str) -> None:
    """Refuse NaN/±inf scores: the tie rule would otherwise "select" the first neurons of layer 0
    (equal -inf scores) and report them as language neurons."""
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        num_neurons = scores.shape[-1]
        raise IdentifyError(f"{int(bad.sum())} selection scores are not finite at {what} (first: layer "
                            f"{first // num_neurons}, neuron {first % num_neurons}); the stats or λ overflow float32, "
                            f"keep |λ| <= {LAMBDA_LIMIT:g}")


def _kth_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-indexed) as the largest of the k smallest (``topk``: ~2x
    faster than ``kthvalue`` for the small k of a selection)."""
    return torch.topk(flat, k, largest=False, sorted=False).values.max()


def _select_lowest_topk(scores: torch.Tensor, k: int, kth: torch.Tensor | None = None) -> torch.Tensor:
    """`select_lowest`, with the k-th value found by the ``topk`` path."""
    if kth is None and 0 < k < scores.numel():
        kth = _kth_lowest(scores.reshape(-1), k)
    return select_lowest(scores, k, kth)


def kth_near(values: torch.Tensor, k: int, guess: float | None, rel: float = 0.01) -> torch.Tensor:
    """Exactly ``torch.kthvalue(values.flatten(), k).values``, fast when the k-th value lies
    within ±rel of ``guess`` (a resample's τ is close to the full data's): count the values
    below the window; if the k-th one falls inside it, select among the window's values only."""
    flat = values.reshape(-1)
    if guess is not None and math.isfinite(guess) and guess > 0:
        lo = torch.tensor(guess * (1 - rel), dtype=flat.dtype)
        hi = torch.tensor(guess * (1 + rel), dtype=flat.dtype)
        below = int(torch.count_nonzero(flat < lo))
        window = (flat >= lo) & (flat <= hi)
        inside = int(torch.count_nonzero(window))
        if below < k <= below + inside:
            return torch.kthvalue(flat[window], k - below).values
    return kth_smallest(flat, k)


def harmonic_norm(num_languages: int) -> float:
    """c_K = (1/K)·Σ_{j=1..K} 1/j, summed in the published order."""
    return sum(1 / j for j in range(1, num_languages + 1)) / num_languages


def lape_entropy(probs: torch.Tensor) -> torch.Tensor:
    """float64 [L, N]: H(q), q = p / Σ_k p (q = 0 where the sum is 0; 0·ln 0 = 0)."""
    p = probs.to(torch.float64)
    total = p.sum(0, keepdim=True)
    q = torch.where(total > 0, p / total.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(p))
    logq = torch.where(q > 0, q.log(), torch.zeros_like(q))
    return -(q * logq).sum(0)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """float64 [L, N]: H(q) / ln K with the authors' normalisation.

    q = p / Σ_k p, uniform where the sum is 0, clamped to >= 1e-12 and renormalised.
    (Their extra ``+1e-30`` inside the log cannot change a float64 q >= 5e-13, so it is omitted.)
    """
    num_languages = probs.shape[0]
    q = probs.to(torch.float64, copy=True)  # a fresh float64 copy, normalised in place (memory: one [K, L, N] buffer)
    total = q.sum(0, keepdim=True)
    empty = total == 0
    q.div_(total.masked_fill_(empty, 1.0))
    if bool(empty.any()):
        q.masked_fill_(empty.expand_as(q), 1.0 / num_languages)
    q.clamp_(min=Q_FLOOR)
    q.div_(q.sum(0, keepdim=True))
    return q.log().mul_(q).sum(0).neg_().div_(math.log(num_languages))


def classify(selected: torch.Tensor, n_active: torch.Tensor, num_languages: int) -> torch.Tensor:
    """int8 [L, N] class codes (neurons.py): specific / related / general / unassigned / none."""
    return class_codes(selected, n_active, num_languages)


def _check_stats(stats: ActivationStats) -> None:
    """Shape checks that `ActivationStats.validate` leaves to its constructors, then validate."""
    if not isinstance(stats, ActivationStats):
        raise StatsError(f"expected ActivationStats, got {type(stats).__name__}; load them with ActivationStats.load")
    pos, tok = stats.positive, stats.tokens
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3:
        raise StatsError(f"'positive' must be a [languages, layers, neurons] tensor, got shape "
                         f"{tuple(getattr(pos, 'shape', ()))}")
    if not isinstance(tok, torch.Tensor) or tok.dim() != 1 or tok.numel() != pos.shape[0]:
        raise StatsError(f"'tokens' must hold one count per language ({pos.shape[0]}), got shape "
                         f"{tuple(getattr(tok, 'shape', ()))}")
    if len(stats.languages) != pos.shape[0]:
        raise StatsError(f"{len(stats.languages)} languages named but counts for {pos.shape[0]}; "
                         "the stats are inconsistent")
    if stats.sums is not None and tuple(stats.sums.shape) != tuple(pos.shape):
        raise StatsError(f"'sums' shape {tuple(stats.sums.shape)} differs from 'positive' {tuple(pos.shape)}")
    if pos.shape[1] == 0 or pos.shape[2] == 0:
        raise StatsError(f"stats have no neurons (shape {tuple(pos.shape)})")
    if tok.dtype.is_floating_point and torch.isnan(tok).any():
        raise StatsError("token counts contain NaN")
    stats.validate(buckets=False)  # identification never reads the per-bucket counts


@dataclass
class _Evaluation:
    lam: float
    selected: torch.Tensor
    scores: torch.Tensor
    appear_k: int

    @property
    def passes(self) -> bool:
        return self.appear_k == 0


@dataclass
class SelectionFit:
    """What one identification gives, without the NeuronMap (`Selector.fit_probs` / `fit_many`)."""

    selected: torch.Tensor  # bool [L, N]
    classes: torch.Tensor  # int8 [L, N]
    active: torch.Tensor  # bool [K, L, N]: p > τ
    n_active: torch.Tensor  # [L, N] number of languages with p > τ (integer dtype)
    tau: float
    lam: float | None = None
    saturated: bool = False
    evaluations: int = 1  # λ evaluations (1 for a fixed λ or a method without λ)


def _n_active(active: torch.Tensor) -> torch.Tensor:
    # the same integers as active.sum(0), ~20x faster in uint8 (fits: K < 256)
    return active.view(torch.uint8).sum(0, dtype=torch.uint8) if active.shape[0] < 256 else active.sum(0)


# -- estimators ---------------------------------------------------------------------------
class Selector:
    """Base class of the neuron selectors (scikit-learn style: ``fit(stats)`` returns self).

    Fitted attributes (after ``fit``): ``languages_``, ``tau_`` (float), ``lambda_`` (float or
    None), ``scores_`` float32 [L, N] (lower = more language-specific), ``selected_`` bool [L, N],
    ``n_active_`` int64 [L, N] (number of languages with p > τ, for every neuron), ``active_``
    bool [K, L, N] (p > τ for every neuron; the NeuronMap keeps it only for selected or general
    neurons), ``classes_`` int8 [L, N], ``appear_`` (K+1 ints over the selection),
    ``lambda_trace_``, ``lambda_saturated_``, ``neuron_map_`` (NeuronMap).
    """

    method: ClassVar[str] = ""

    def __init__(self, top_rate: float = 0.01, bar: float = 0.95):
        self.top_rate = top_rate
        self.bar = bar

    # -- public --------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {"top_rate": self.top_rate, "bar": self.bar}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def fit(self, stats: ActivationStats) -> "Selector":
        self._check_params()
        _check_stats(stats)
        probs = activation_probs(stats)
        tau = activation_threshold(probs, self.bar)
        self._fit_state(probs, tau)
        self.languages_ = list(stats.languages)
        self.neuron_map_ = self._neuron_map(stats, probs.numel())
        return self

    def _fit_state(self, probs: torch.Tensor, tau: torch.Tensor) -> None:
        """Every fitted attribute but ``languages_`` and ``neuron_map_``, from p and τ."""
        num_languages, num_layers, num_neurons = probs.shape
        active = probs > tau
        n_active = active.sum(0)
        k = selection_size(self.top_rate, num_layers * num_neurons)
        if k < 1:
            raise IdentifyError(f"top_rate={self.top_rate} selects round({self.top_rate}·{num_layers * num_neurons}) = 0 "
                                "neurons; raise --top-rate")
        self.tau_ = float(tau.item())
        self.n_active_ = n_active
        self.active_ = active
        self.k_select_ = k
        self.lambda_: float | None = None
        self.lambda_trace_: list[dict[str, Any]] = []
        self.lambda_saturated_ = False
        self.lambda_bracket_: tuple[float, float] | None = None
        self._select(probs, n_active, k)  # sets selected_, scores_ (and λ fields)
        self.classes_ = classify(self.selected_, n_active, num_languages)
        self.appear_ = torch.bincount(n_active[self.selected_].flatten(), minlength=num_languages + 1).tolist()

    # -- many fits (resampling: confidence.py) ---------------------------------------------
    def fit_probs(self, probs: torch.Tensor, tau: torch.Tensor) -> SelectionFit:
        """Identify from float32 probabilities [K, L, N] and τ: the selection `fit` makes on
        stats with these probabilities, without building a NeuronMap (no stats checks, no
        fingerprint, no copies). Leaves this selector's fitted attributes alone.

        Subclasses may override it with a faster exact path (Lape and EntropyLambda do); the
        default runs the method's own selection, so every registered method gets the batched
        resampling of `fit_many`."""
        self._check_params()
        sel = copy.copy(self)
        sel._fit_state(probs, tau)
        return SelectionFit(sel.selected_, sel.classes_, sel.active_, sel.n_active_, sel.tau_, sel.lambda_,
                            bool(sel.lambda_saturated_), max(1, len(sel.lambda_trace_)))

    def fit_many(self, positive: torch.Tensor, tokens: torch.Tensor, *,
                 tau_guess: float | None = None) -> list[SelectionFit | IdentifyError]:
        """Identify every c of ``positive`` [C, K, L, N] (integer counts, int64 or exactly held
        in float64) and ``tokens`` [C, K]; item c equals fitting
        ``ActivationStats(languages, positive[c], tokens[c])`` (tested for every built-in and a
        registered method). The probabilities of all C are built in one tensor op; τ is found
        near ``tau_guess`` (e.g. the full data's τ) when it lies there. A failed
        identification (e.g. no λ passes) is returned as its `IdentifyError`, in place."""
        self._check_params()
        if positive.dim() == 3:
            positive, tokens = positive.unsqueeze(0), tokens.unsqueeze(0)
        C, K = int(positive.shape[0]), int(positive.shape[1])
        # float64 -> float32 rounds an exactly held integer as int64 -> float32 does
        probs = positive.to(torch.float32, copy=True).div_(tokens.to(torch.float32).view(C, K, 1, 1))
        k_tau = selection_size(self.bar, probs[0].numel())
        if not 1 <= k_tau <= probs[0].numel():
            raise IdentifyError(f"bar={self.bar} gives k={k_tau} for {probs[0].numel()} probabilities; "
                                "use 0 < bar <= 1")
        out: list[SelectionFit | IdentifyError] = []
        for c in range(C):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # saturation and few-neuron warnings, once per resample
                    out.append(self.fit_probs(probs[c], kth_near(probs[c], k_tau, tau_guess)))
            except IdentifyError as exc:
                out.append(exc)
        return out

    def check_params(self) -> "Selector":
        """Validate the hyper-parameters (one-line `IdentifyError`); returns ``self``. `fit` calls
        it too; callers that build selectors for later use (bootstrap specs) call it up front."""
        self._check_params()
        return self

    # -- subclass hooks ------------------------------------------------------------------
    def _select(self, probs: torch.Tensor, n_active: torch.Tensor, k: int) -> None:
        raise NotImplementedError

    def _check_params(self) -> None:
        for name in ("top_rate", "bar"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
                raise IdentifyError(f"{name} must be a number in (0, 1], got {value!r}")

    def _params_meta(self) -> dict[str, Any]:
        return {"top_rate": float(self.top_rate), "bar": float(self.bar), "lam": None, "lam_range": None, "eps": None}

    # -- result --------------------------------------------------------------------------
    def _neuron_map(self, stats: ActivationStats, num_probs: int) -> NeuronMap:
        num_languages = len(self.languages_)
        general = self.n_active_ == num_languages
        keep = self.selected_ | general
        meta = {
            "method": self.method,
            "params": self._params_meta(),
            "tau": self.tau_,
            "lambda": self.lambda_,
            "lambda_trace": [dict(t) for t in self.lambda_trace_],
            "lambda_saturated": self.lambda_saturated_,
            "lambda_bracket": list(self.lambda_bracket_) if self.lambda_bracket_ else None,
            "appear": self.appear_,
            "model": stats.meta.get("model"),
            "model_fingerprint": stats.meta.get("model_fingerprint"),
            "revision": stats.meta.get("revision"),  # the hub commit of the weights (None: local files)
            "hook_point": stats.meta.get("hook_point"),
            "stats_fingerprint": stats.fingerprint(),
            "scope": stats.meta.get("scope"),
            "num_selected": int(self.selected_.sum()),
            "num_unassigned": int((self.classes_ == UNASSIGNED).sum()),
            "num_general": int(general.sum()),
            "k_tau": selection_size(self.bar, num_probs),
            "k_select": self.k_select_,
            "prob_dtype": "float32",
            "tie_rule": TIE_RULE,
        }
        return NeuronMap(list(self.languages_), self.classes_.clone(), self.active_ & keep.unsqueeze(0),
                         self.selected_.clone(), self.scores_.clone(), meta)


class Lape(Selector):
    """Language Activation Probability Entropy (Tang et al., 2024).

    H = −Σ q ln q with q = p / Σ_k p (0 where the sum is 0); neurons active in no language are
    excluded (score +inf); the round(top_rate·L·N) lowest H are selected.
    """

    method = "lape"

    def _select(self, probs: torch.Tensor, n_active: torch.Tensor, k: int) -> None:
        scores = lape_entropy(probs).to(torch.float32)
        eligible = n_active > 0
        scores[~eligible] = math.inf
        num_eligible = int(eligible.sum())
        if num_eligible == 0:
            raise IdentifyError(f"no neuron has a probability above τ={self.tau_:g} "
                                "in any language, so LAPE selects nothing; lower --bar")
        if num_eligible < k:
            warnings.warn(f"only {num_eligible} neurons are active above τ in some language, fewer than the "
                          f"{k} that top_rate asks for; LAPE selects those {num_eligible}", stacklevel=3)
            k = num_eligible
        self.selected_ = select_lowest(scores, k)
        self.scores_ = scores

    def fit_probs(self, probs: torch.Tensor, tau: torch.Tensor) -> SelectionFit:
        """`Selector.fit_probs`, with the top-k selection on the fast ``topk`` path."""
        self._check_params()
        K, L, N = probs.shape
        active = probs > tau
        n_active = _n_active(active)
        k = selection_size(self.top_rate, L * N)
        if k < 1:
            raise IdentifyError(f"top_rate={self.top_rate} selects no neuron; raise --top-rate")
        scores = lape_entropy(probs).to(torch.float32)
        eligible = n_active > 0
        scores[~eligible] = math.inf
        num_eligible = int(eligible.sum())
        if num_eligible == 0:
            raise IdentifyError("no neuron is active above τ in any language, so LAPE selects nothing")
        selected = _select_lowest_topk(scores, min(k, num_eligible))
        return SelectionFit(selected, classify(selected, n_active, K), active, n_active, float(tau))


class EntropyLambda(Selector):
    """The entropy-λ method (arXiv:2505.21505, Eq. 5), with the authors' automatic λ.

    score = H(q)/ln K − λ·max_k p[k] / c_K (see `normalized_entropy`, `harmonic_norm`); no
    prefilter: selected neurons active in no language are *unassigned*.

    ``lam="auto"`` searches the largest λ in ``lam_range`` whose selection has no neuron active
    in all K languages (appear[K] == 0), by the published bisection. If the range's top already
    passes (the search is *saturated*) and ``widen`` is set, the range is doubled (hi ← lo +
    2·(hi − lo)) until a λ fails, at most ``max_widen`` times and never beyond ``lam_max``; then
    the bisection runs on the last passing / first failing pair. If even ``lo`` fails,
    `LambdaSearchError` is raised.
    """

    method = "entropy-lambda"

    def __init__(self, top_rate: float = 0.01, bar: float = 0.95, lam: float | str = "auto",
                 lam_range: tuple[float, float] = (0.0, 0.2), eps: float = 1e-3, widen: bool = True,
                 max_widen: int = 10, lam_max: float = 100.0):
        super().__init__(top_rate=top_rate, bar=bar)
        self.lam = lam
        self.lam_range = lam_range
        self.eps = eps
        self.widen = widen
        self.max_widen = max_widen
        self.lam_max = lam_max

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "lam": self.lam, "lam_range": self.lam_range, "eps": self.eps,
                "widen": self.widen, "max_widen": self.max_widen, "lam_max": self.lam_max}

    def _params_meta(self) -> dict[str, Any]:
        auto = self._is_auto()
        return {"top_rate": float(self.top_rate), "bar": float(self.bar),
                "lam": "auto" if auto else float(self.lam),  # type: ignore[arg-type]
                "lam_range": [float(x) for x in self.lam_range], "eps": float(self.eps),
                "widen": bool(self.widen), "max_widen": int(self.max_widen), "lam_max": float(self.lam_max)}

    def _is_auto(self) -> bool:
        return isinstance(self.lam, str) and self.lam.strip().lower() == "auto"

    def _check_params(self) -> None:
        super()._check_params()
        if not self._is_auto():
            if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
                raise IdentifyError(f"lam must be 'auto' or a finite number, got {self.lam!r}")
            if abs(float(self.lam)) > LAMBDA_LIMIT:
                raise IdentifyError(f"λ (--lambda) = {float(self.lam):g} is outside the meaningful range "
                                    f"[-{LAMBDA_LIMIT:g}, {LAMBDA_LIMIT:g}]: beyond it the entropy no longer counts "
                                    "in the float32 score (docs/identify.md, 'The range of λ')")
        try:
            lo, hi = (float(x) for x in self.lam_range)
        except (TypeError, ValueError):
            raise IdentifyError(f"lam_range must be two numbers (lo, hi), got {self.lam_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise IdentifyError(f"lam_range must satisfy lo < hi (finite), got {self.lam_range!r}")
        if max(abs(lo), abs(hi)) > LAMBDA_LIMIT:
            raise IdentifyError(f"λ range (--lambda-range) {lo:g},{hi:g} leaves the meaningful range "
                                f"[-{LAMBDA_LIMIT:g}, {LAMBDA_LIMIT:g}] (docs/identify.md, 'The range of λ')")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise IdentifyError(f"eps must be > 0, got {self.eps!r}")
        if not (isinstance(self.max_widen, int) and self.max_widen >= 0):
            raise IdentifyError(f"max_widen must be an int >= 0, got {self.max_widen!r}")
        if not (isinstance(self.lam_max, (int, float)) and hi <= self.lam_max <= LAMBDA_LIMIT):
            raise IdentifyError(f"lam_max must be in [{hi:g}, {LAMBDA_LIMIT:g}] (the range top .. the meaningful "
                                f"limit of λ), got {self.lam_max!r}")

    def _select(self, probs: torch.Tensor, n_active: torch.Tensor, k: int) -> None:
        num_languages = probs.shape[0]
        # λ-independent parts, computed once; each λ is then one fused expression + a selection.
        entropy = normalized_entropy(probs)
        max_prob = probs.amax(0).to(torch.float64)
        norm = harmonic_norm(num_languages)
        general_idx = torch.nonzero((n_active == num_languages).reshape(-1)).flatten()

        def evaluate(lam: float) -> _Evaluation:
            # published order: e − max_act·λ / norm_max, in float64, stored as float32
            scores = (entropy - max_prob * lam / norm).to(torch.float32)
            check_finite_scores(scores, f"λ = {lam:g}")
            selected = select_lowest(scores, k)
            appear_k = int(torch.count_nonzero(selected.reshape(-1)[general_idx]))
            return _Evaluation(lam, selected, scores, appear_k)

        if self._is_auto():
            best = self._search(evaluate, num_languages)
        else:
            best = evaluate(float(self.lam))  # type: ignore[arg-type]
            self.lambda_trace_ = [self._trace_entry(best, "fixed")]
        self.lambda_ = float(best.lam)
        self.selected_ = best.selected
        self.scores_ = best.scores

    def fit_probs(self, probs: torch.Tensor, tau: torch.Tensor) -> SelectionFit:
        """`Selector.fit_probs` with the λ search on candidate subsets (`_lambda_evaluator`):
        the same bisection (`_search`), each λ bit for bit as `fit` evaluates it."""
        self._check_params()
        K, L, N = probs.shape
        active = probs > tau
        n_active = _n_active(active)
        k = selection_size(self.top_rate, L * N)
        if k < 1:
            raise IdentifyError(f"top_rate={self.top_rate} selects no neuron; raise --top-rate")
        evaluate = _lambda_evaluator(probs, n_active, k)
        sel = copy.copy(self)
        sel.lambda_trace_, sel.lambda_saturated_, sel.lambda_bracket_ = [], False, None
        evaluations = 1
        if sel._is_auto():
            best = sel._search(evaluate, K)  # the published bisection (+ widening), exactly as fit()
            evaluations = len(sel.lambda_trace_)
        else:
            best = evaluate(float(sel.lam))  # type: ignore[arg-type]
        return SelectionFit(best.selected, classify(best.selected, n_active, K), active, n_active, float(tau),
                            float(best.lam), bool(sel.lambda_saturated_), evaluations)

    @staticmethod
    def _trace_entry(ev: _Evaluation, step: str) -> dict[str, Any]:
        return {"lambda": float(ev.lam), "appear_K": ev.appear_k, "passes": ev.passes, "step": step}

    def _search(self, evaluate: Callable[[float], _Evaluation], num_languages: int) -> _Evaluation:
        lo0, hi0 = (float(x) for x in self.lam_range)
        trace: list[dict[str, Any]] = []
        self.lambda_trace_ = trace

        def run(lam: float, step: str) -> _Evaluation:
            ev = evaluate(lam)
            trace.append(self._trace_entry(ev, step))
            return ev

        at_lo = run(lo0, "lo")
        at_hi = run(hi0, "hi")
        if not at_lo.passes:
            raise LambdaSearchError(
                f"no λ in [{lo0:g}, {hi0:g}] works: already at λ={lo0:g} the selection has {at_lo.appear_k} "
                f"neuron(s) active in all {num_languages} languages; use a fixed --lambda, a lower --top-rate, "
                "a higher --bar, or a range starting lower (negative λ penalises always-firing neurons)")
        lo, hi = lo0, hi0
        best = at_lo
        self.lambda_saturated_ = at_hi.passes
        if at_hi.passes:
            best = at_hi  # published: best = hi when hi passes (the bisection below may overwrite it)
            if self.widen:
                widened = 0
                while at_hi.passes and widened < self.max_widen:
                    new_hi = lo0 + 2.0 * (hi - lo0)
                    if new_hi > self.lam_max:
                        break
                    lo, hi = hi, new_hi
                    widened += 1
                    at_hi = run(hi, "widen")
                    if at_hi.passes:
                        best = at_hi
                if at_hi.passes:
                    self.lambda_bracket_ = (lo0, hi)
                    warnings.warn(
                        f"λ search saturated: even λ={hi:g} (after {widened} widening steps, cap "
                        f"lam_max={self.lam_max:g}, max_widen={self.max_widen}) leaves no selected neuron active in "
                        f"all {num_languages} languages; reporting λ={hi:g}", stacklevel=4)
                    return best
            else:
                warnings.warn(
                    f"λ search saturated: λ={hi0:g}, the top of the range, already passes; the published bisection "
                    "then returns a λ just below it (widen=True or --widen searches beyond the range)", stacklevel=4)
        while hi - lo > self.eps:
            mid = (lo + hi) / 2.0
            if not lo < mid < hi:  # float resolution exhausted (tiny eps)
                break
            at_mid = run(mid, "bisect")
            if at_mid.passes:
                best = at_mid
                lo = mid
            else:
                hi = mid
        self.lambda_bracket_ = (lo, hi)
        return best


def _lambda_evaluator(probs: torch.Tensor, n_active: torch.Tensor, k: int) -> Callable[[float], _Evaluation]:
    """``evaluate(λ)`` of `EntropyLambda._select`, bit for bit, evaluated on a candidate subset
    when λ lies between two λ's already evaluated on all neurons.

    Why the subset is exact: the computed score s_n(λ) = fl(e_n − fl(fl(m_n·λ)/c)) never rises
    with λ (m_n = max_k p >= 0 and every rounding step is monotone), nor does its float32
    rounding f. For a <= λ <= b, a selected neuron has f(s_n(λ)) <= F_λ (the k-th smallest
    at λ) <= F_a, and f(s_n(b)) <= f(s_n(λ)); so every neuron the selection can reach is in
    C = {n : f(s_n(b)) <= F_a}. The k lowest over C (kept in flat-index order, so ties break
    the same way) are the k lowest over all neurons. The bisection of the automatic λ search
    evaluates only such λ's, on a C that is usually a few times k instead of L·N."""
    K, L, N = probs.shape
    entropy = normalized_entropy(probs).reshape(-1)
    max_prob = probs.amax(0).to(torch.float64).reshape(-1)
    norm = harmonic_norm(K)
    general = (n_active == K).reshape(-1)
    full: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # λ -> (float32 scores, k-th smallest)
    subsets: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def on_all(value: float) -> _Evaluation:
        # published order: e − max_act·λ / norm_max, in float64, stored as float32
        scores = (entropy - max_prob * value / norm).to(torch.float32)
        kth = _kth_lowest(scores, k) if k < scores.numel() else scores.max()
        full[value] = (scores, kth)
        chosen = _select_lowest_topk(scores, k, kth)
        return _Evaluation(value, chosen.view(L, N), scores.view(L, N), int(torch.count_nonzero(chosen & general)))

    def evaluate(value: float) -> _Evaluation:
        lower = [x for x in full if x <= value]
        upper = [x for x in full if x >= value]
        if not lower or not upper:
            return on_all(value)
        a, b = max(lower), min(upper)
        if (a, b) not in subsets:
            idx = torch.nonzero(full[b][0] <= full[a][1]).flatten()
            subsets[(a, b)] = (idx, entropy[idx], max_prob[idx], general[idx])
        idx, ent, mp, gen = subsets[(a, b)]
        if idx.numel() < k:  # cannot happen (see above); never trust a shortcut silently
            return on_all(value)
        scores = (ent - mp * value / norm).to(torch.float32)
        chosen = _select_lowest_topk(scores, k)
        selected = torch.zeros(L * N, dtype=torch.bool)
        selected[idx[chosen]] = True
        return _Evaluation(value, selected.view(L, N), None, int(torch.count_nonzero(chosen & gen)))  # type: ignore[arg-type]

    return evaluate


# -- registry -----------------------------------------------------------------------------
#: method name -> selector class; register your own with `register_method`.
METHODS: dict[str, type[Selector]] = {"lape": Lape, "entropy-lambda": EntropyLambda}


def register_method(name: str) -> Callable[[type[Selector]], type[Selector]]:
    """Class decorator: ``@register_method("my-method") class Mine(Selector): ...``."""

    def deco(cls: type[Selector]) -> type[Selector]:
        METHODS[name] = cls
        if not getattr(cls, "method", ""):
            cls.method = name
        return cls

    return deco


def identify(stats: ActivationStats, method: str = "entropy-lambda", **params: Any) -> NeuronMap:
    """Fit the named selector on ``stats`` and return its NeuronMap."""
    cls = METHODS.get(method)
    if cls is None:
        raise IdentifyError(f"unknown identification method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    try:
        selector = cls(**params)
    except TypeError as exc:
        raise IdentifyError(f"bad parameters for method {method!r}: {exc}") from None
    return selector.fit(stats).neuron_map_


# -- reporting ----------------------------------------------------------------------------
def format_summary(nmap: NeuronMap) -> str:
    """A compact plain-text table of a NeuronMap (what `langneurons identify` prints)."""
    meta = nmap.meta
    summary = nmap.summary()
    per_lang = summary["per_language"]
    totals = summary["totals"]
    width = max([8] + [len(x) for x in nmap.languages])
    lines = []
    params = meta.get("params") or {}
    head = f"method {meta.get('method', '?')}"
    if params.get("top_rate") is not None:
        head += f"  top_rate {params['top_rate']:g}  bar {params.get('bar', 0):g}"
    lines.append(head)
    tau = meta.get("tau")
    if tau is not None:
        lines.append(f"tau = {tau:.6g}  (active: p > tau)")
    lam = meta.get("lambda")
    if lam is not None:
        trace = meta.get("lambda_trace") or []
        auto = params.get("lam") == "auto"
        note = f"auto, {len(trace)} evaluations" if auto else "fixed"
        if meta.get("lambda_saturated"):
            rng = params.get("lam_range")
            note += f"; SATURATED: the range top {rng[1]:g} already passed" if rng else "; SATURATED"
            widened = [t["lambda"] for t in trace if t.get("step") == "widen"]
            if widened:
                failed = not trace[-1]["passes"] or any(not t["passes"] for t in trace if t.get("step") == "widen")
                note += f", widened to {max(widened):g}" + ("" if failed else " (cap reached, still passing)")
            elif auto:
                note += ", no widening (published behaviour)"
        lines.append(f"lambda = {lam:.6g}  ({note})")
    lines.append(f"{'lang':<{width}}  {'specific':>9}  {'related':>9}  {'general':>9}")
    for lang in nmap.languages:
        c = per_lang[lang]
        lines.append(f"{lang:<{width}}  {c['specific']:>9,}  {c['related']:>9,}  {c['general']:>9,}")
    lines.append(f"{'neurons':<{width}}  {totals['specific']:>9,}  {totals['related']:>9,}  {totals['general']:>9,}"
                 "   (distinct neurons per class)")
    selected = summary["selected"]
    unassigned = totals["unassigned"]
    share = 100.0 * unassigned / selected if selected else 0.0
    lines.append(f"selected {selected:,}; unassigned {unassigned:,} ({share:.1f}% of the selection: "
                 "active in no language, never ablated)")
    appear = summary["appear"]
    lines.append("appear[c] (selected neurons active in c languages): "
                 + "  ".join(f"{c}:{n:,}" for c, n in enumerate(appear)))
    return "\n".join(lines)
