"""Confidence in every number: how stable the neuron sets are, how many "language neurons"
chance alone gives, and which intervention effects stand out from their random control.

Everything here works on the per-bucket counts that `record` keeps (stats.py: document j of
a language -> bucket j mod B). A *design* says, for every resample, how much of each bucket
goes into each language:

    W[r, k, k', b]  = how many times bucket b of language k' is counted for language k

so the resampled counts are ``positive[r, k] = Σ_{k', b} W[r, k, k', b] · bucket_positive[k', b]``
(and the same for tokens) -- exact integer sums, computed as float64 matrix products (every
partial sum is an integer far below 2**53, so the products are exact whatever the BLAS order).

Designs
    * bootstrap (`bootstrap_design`): per language, its n_k non-empty buckets are drawn n_k
      times with replacement (W block diagonal, multiplicities). Resample r depends only on
      (seed, r): the first 50 resamples of a 200-resample run are those of a 50-resample run.
    * split half (`split_half_design`): per language, a seeded random half of its non-empty
      buckets against the other half (the quick mode). Each half has half the data, so its
      agreement is a LOWER bound on the full data's stability.
    * permutation null (`permutation_design`): every language's non-empty buckets are pooled
      and dealt back at random, each language keeping its number of buckets: language labels
      are exchanged between document groups, which destroys any language structure while
      keeping the documents (and their within-document dependence) intact.

Identification of every resample is exactly `identify()` on the resampled stats (tested):
it goes through the public `Selector.fit_many` of the method (the same float32
probabilities, τ, scores, selection rule, tie order and λ search as `Selector.fit`). What is
batched: the resampled counts and probabilities of a chunk of resamples are built in one
tensor op each ([C, K, L, N]) and τ is searched near the full data's τ; LAPE and
entropy-λ override `Selector.fit_probs` with exact fast paths (``topk`` selection, the λ
bisection on candidate subsets). A method registered by a user gets the batched chunks and
its own selection without the stats checks and NeuronMap of `fit` (tested: equal to fit()).

Summaries
    * selection frequency of a neuron: share of the resamples that select it; class frequency:
      share in which it is specific / related / general / unassigned;
    * a language's set in one resample: its specific and related neurons (what an ablation
      of that language deactivates); per language, the EXPECTED JACCARD overlap of two
      resamples' sets is estimated by the average of J(A_r, A_q) over all pairs r < q of the
      R resamples (an unbiased U-statistic for E[J(A, A')] of two independent resamples; pairs
      where both sets are empty are left out); the Jaccard of every resample with the
      full-data set is reported as mean and 2.5 / 97.5 percentiles;
    * stable core: neurons selected in >= 90 % of the resamples (``core`` to change it).

Null summaries: for each count (specific, related, language = specific + related,
selected_active = selected with N_act >= 1, unassigned, general) the observed value on the
real labels, the null distribution's mean / sd / 95th percentile, the empirical p-value
(1 + #{null >= observed}) / (1 + n) and a false-discovery estimate mean(null) / observed
(the share of the observed count that chance alone produces; capped at 1).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import LangNeuronsError
from .identify import METHODS, IdentifyError, SelectionFit, Selector, selection_size
from .neurons import CLASS_NAMES, GENERAL, RELATED, SPECIFIC, UNASSIGNED, NeuronMap
from .runs import RunDir
from .stats import ActivationStats

__all__ = [
    "ConfidenceError", "IdentifySpec", "ResampleFit", "StabilityResult", "SplitHalfResult", "NullResult",
    "require_buckets", "bootstrap_design", "split_half_design", "permutation_design", "design_counts",
    "resampled_stats", "fit_counts", "fit_design", "stability", "split_half", "null_distribution",
    "interval_cells", "pairwise_jaccard", "expected_pairwise_jaccard", "run_spec", "load_run_stats",
    "run_stability", "run_split_half", "run_null",
    "STABILITY_FILE", "STABILITY_LANG_FILE", "SPLIT_HALF_FILE", "NULL_FILE", "NULL_STATS",
]

STABILITY_FILE = "stability.parquet"
STABILITY_LANG_FILE = "stability_languages.parquet"
SPLIT_HALF_FILE = "stability_split_half.parquet"
NULL_FILE = "null.parquet"
#: the counts compared with the permutation null
NULL_STATS = ("specific", "related", "language", "selected_active", "unassigned", "general")
#: the rows of the per-language tables besides the languages themselves
ALL_LANGS, SELECTION = "(all languages)", "(selection)"
#: memory for one chunk of resamples (counts, probabilities); sets the chunk size
CHUNK_BYTES = 1 << 30


class ConfidenceError(LangNeuronsError, ValueError):
    """The stats or options cannot give a stability / null analysis."""


# -- what to identify with --------------------------------------------------------------------
@dataclass
class IdentifySpec:
    """A selector method and its keyword parameters (as `identify(stats, method, **params)`)."""

    method: str = "entropy-lambda"
    params: dict[str, Any] = field(default_factory=dict)

    def selector(self) -> Any:
        cls = METHODS.get(self.method)
        if cls is None:
            raise ConfidenceError(f"unknown identification method {self.method!r}; choose one of "
                                  f"{', '.join(sorted(METHODS))}")
        try:
            sel = cls(**self.params)
        except TypeError as exc:
            raise ConfidenceError(f"bad parameters for method {self.method!r}: {exc}") from None
        return sel.check_params()

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "params": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in self.params.items()}}


def run_spec(run_dir: str | Path, method: str | None = None, lam: str | float = "run",
             nmap: NeuronMap | None = None) -> IdentifySpec:
    """The identification parameters of a run: from its neuron map's metadata, else from
    the ``identify`` stage record, else the defaults. ``method`` overrides the run's method (then only
    top_rate and bar are taken from the run). ``lam`` (entropy-lambda only): ``"run"`` -- what
    the run did (auto λ when it searched, its fixed λ when it had one); ``"auto"`` -- search λ
    again in every resample; ``"fixed"`` -- keep the λ the run found; or a number."""
    run = RunDir(run_dir)
    if nmap is None and run.neurons_path.is_file():
        nmap = NeuronMap.load(run.neurons_path)
    ident = run.stage_result("identify") if run.manifest_path.exists() else {}
    run_method, params, found_lam = None, {}, None
    if nmap is not None and nmap.meta.get("method") in METHODS:
        run_method = nmap.meta["method"]
        params = dict(nmap.meta.get("params") or {})
        found_lam = nmap.meta.get("lambda")
    elif ident:
        run_method = ident.get("method")
        params = dict(ident.get("params") or {})
        found_lam = ident.get("lambda")
    use = method or run_method or "entropy-lambda"
    if use not in METHODS:
        raise ConfidenceError(f"unknown --method {use!r}; choose one of {', '.join(sorted(METHODS))}")
    same = use == run_method
    kwargs: dict[str, Any] = {k: params[k] for k in ("top_rate", "bar") if params.get(k) is not None}
    if use == "entropy-lambda":
        if same:
            for key in ("lam", "lam_range", "eps", "widen", "max_widen", "lam_max"):
                if params.get(key) is not None:
                    kwargs[key] = tuple(params[key]) if key == "lam_range" else params[key]
        run_lam = kwargs.get("lam", "auto")
        if isinstance(lam, str) and lam.strip().lower() in ("run", ""):
            kwargs["lam"] = run_lam
        elif isinstance(lam, str) and lam.strip().lower() == "auto":
            kwargs["lam"] = "auto"
        elif isinstance(lam, str) and lam.strip().lower() == "fixed":
            value = found_lam if same else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfidenceError("--lambda fixed keeps the λ the run found, but the run records none for "
                                      f"method {use}; run `langneurons identify` first or give a number")
            kwargs["lam"] = float(value)
        else:
            try:
                kwargs["lam"] = float(lam)
            except (TypeError, ValueError):
                raise ConfidenceError(f"--lambda must be run, auto, fixed or a number, got {lam!r}") from None
            if not math.isfinite(kwargs["lam"]):
                raise ConfidenceError(f"--lambda must be finite, got {lam!r}")
    elif not (isinstance(lam, str) and lam.strip().lower() in ("run", "", "auto")):
        raise ConfidenceError(f"--lambda applies to entropy-lambda only, not to --method {use}")
    return IdentifySpec(use, kwargs)


# -- buckets and designs ----------------------------------------------------------------------
def require_buckets(stats: ActivationStats, where: str = "", min_buckets: int = 2) -> None:
    """One clear error when the stats cannot be resampled: no per-bucket counts (older runs,
    ``--buckets 0``, imports, merges of inputs without them) or too few non-empty buckets."""
    where = f"{where}: " if where else ""
    if not stats.has_buckets:
        raise ConfidenceError(f"{where}the stats carry no per-bucket counts, so documents cannot be resampled; "
                              "record the run again with `langneurons record ... --force` (per-bucket counts are "
                              "on by default, --buckets 16)")
    nonempty = (stats.bucket_docs > 0).sum(1)  # type: ignore[union-attr]
    few = [f"{lang} ({int(n)})" for lang, n in zip(stats.languages, nonempty.tolist()) if n < min_buckets]
    if few:
        raise ConfidenceError(f"{where}languages {', '.join(few)} have fewer than {min_buckets} non-empty document "
                              "buckets; give them more documents (or record with more --buckets)")


#: fewer non-empty buckets than this in a language: its resampling variability is coarse (warned)
FEW_BUCKETS = 8


def _warn_few_buckets(stats: ActivationStats) -> None:
    nonempty = (stats.bucket_docs > 0).sum(1).tolist()  # type: ignore[union-attr]
    few = [f"{lang} ({n})" for lang, n in zip(stats.languages, nonempty) if n < FEW_BUCKETS]
    if few:
        warnings.warn(f"languages {', '.join(few)} have fewer than {FEW_BUCKETS} non-empty document buckets; "
                      "resampling so few document groups shows little of the variability (give them more "
                      "documents, or record with more --buckets)", stacklevel=3)


def _nonempty(stats: ActivationStats) -> list[torch.Tensor]:
    return [torch.nonzero(stats.bucket_docs[k] > 0).flatten() for k in range(len(stats.languages))]  # type: ignore[index]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def bootstrap_design(stats: ActivationStats, resamples: int, seed: int = 0) -> torch.Tensor:
    """int64 [R, K, K, B]: per resample and language, its non-empty buckets drawn with
    replacement as many times as it has them. Resample r depends on (seed, r) only."""
    require_buckets(stats)
    K, B = len(stats.languages), stats.num_buckets
    pools = _nonempty(stats)
    W = torch.zeros(resamples, K, K, B, dtype=torch.int64)
    g = _generator(seed)
    for r in range(resamples):
        for k, pool in enumerate(pools):
            draws = pool[torch.randint(0, pool.numel(), (pool.numel(),), generator=g)]
            W[r, k, k].index_add_(0, draws, torch.ones_like(draws))
    return W


def split_half_design(stats: ActivationStats, seed: int = 0) -> torch.Tensor:
    """int64 [2, K, K, B]: per language a random half of its non-empty buckets (floor(n/2))
    against the rest."""
    require_buckets(stats)
    K, B = len(stats.languages), stats.num_buckets
    W = torch.zeros(2, K, K, B, dtype=torch.int64)
    g = _generator(seed)
    for k, pool in enumerate(_nonempty(stats)):
        perm = pool[torch.randperm(pool.numel(), generator=g)]
        half = pool.numel() // 2
        W[0, k, k, perm[:half]] = 1
        W[1, k, k, perm[half:]] = 1
    return W


def permutation_design(stats: ActivationStats, permutations: int, seed: int = 0) -> torch.Tensor:
    """int64 [P, K, K, B] 0/1: all languages' non-empty buckets pooled and dealt back at
    random, each language keeping its number of non-empty buckets."""
    require_buckets(stats)
    K, B = len(stats.languages), stats.num_buckets
    pools = _nonempty(stats)
    src_lang = torch.cat([torch.full((p.numel(),), k, dtype=torch.int64) for k, p in enumerate(pools)])
    src_bucket = torch.cat(pools)
    sizes = [p.numel() for p in pools]
    target = torch.repeat_interleave(torch.arange(K), torch.tensor(sizes))
    W = torch.zeros(permutations, K, K, B, dtype=torch.int64)
    g = _generator(seed)
    for r in range(permutations):
        perm = torch.randperm(src_lang.numel(), generator=g)
        W[r, target, src_lang[perm], src_bucket[perm]] = 1
    return W


def design_counts(stats: ActivationStats, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampled counts of a design chunk: (positive [C, K, L, N] float, tokens int64 [C, K]).

    ``positive`` holds the integer counts exactly: as float32 when every resampled language has
    fewer than 2**24 tokens (then every partial sum of the products is an integer below 2**24,
    exactly representable), else as float64 (integers below 2**53). Bootstrap-like designs
    (each language drawn from its own buckets) take one matrix product per language; designs
    that move buckets between languages (the permutation null) add each bucket to the rows
    that use it (index_add: the useful work only, ~2K times less than a dense product)."""
    require_buckets(stats)
    C, K, K2, B = W.shape
    if K2 != K or K != len(stats.languages) or B != stats.num_buckets:
        raise ConfidenceError(f"design of shape {tuple(W.shape)} does not fit {len(stats.languages)} languages x "
                              f"{stats.num_buckets} buckets")
    L, N = stats.num_layers, stats.num_neurons
    LN = L * N
    tokens = (W * stats.bucket_tokens.view(1, 1, K, B)).sum((2, 3))  # type: ignore[union-attr]
    dtype = torch.float32 if tokens.numel() == 0 or int(tokens.max()) < 2**24 else torch.float64
    bp = stats.bucket_positive  # [K, B, L, N]
    acc = torch.zeros(C, K, LN, dtype=dtype)
    flat_acc = acc.view(C * K, LN)
    for src in range(K):
        w = W[:, :, src, :]  # [C, K, B]
        used = w != 0
        targets = torch.nonzero(used.any(2).any(0)).flatten()
        if not targets.numel():
            continue
        if targets.tolist() == [src]:
            counts = bp[src].reshape(B, LN).to(dtype)  # type: ignore[index]
            acc[:, src] += w[:, src, :].to(dtype) @ counts
            continue
        for b in torch.nonzero(used.any(1).any(0)).flatten().tolist():
            c_idx, k_idx = torch.nonzero(w[:, :, b], as_tuple=True)
            mult = w[c_idx, k_idx, b].to(dtype)
            row = bp[src, b].reshape(1, LN).to(dtype)  # type: ignore[index]
            source = row.expand(c_idx.numel(), LN) if bool((mult == 1).all()) else row * mult.view(-1, 1)
            flat_acc.index_add_(0, c_idx * K + k_idx, source)
    return acc.view(C, K, L, N), tokens


def resampled_stats(stats: ActivationStats, W: torch.Tensor) -> ActivationStats:
    """The ActivationStats of ONE resample (``W`` [K, K, B]), with integer counts, for
    `identify()` -- the reference that the batched path must equal."""
    pos, tok = design_counts(stats, W.unsqueeze(0))
    return ActivationStats(list(stats.languages), pos[0].to(torch.int64), tok[0].clone(), None, dict(stats.meta))


# -- identification of one resample -------------------------------------------------------------
@dataclass
class ResampleFit:
    """What one identification gives (the parts the summaries need)."""

    selected: torch.Tensor  # bool [L, N]
    classes: torch.Tensor  # int8 [L, N]
    n_active: torch.Tensor  # [L, N] number of languages with p > τ (every neuron)
    sel_index: torch.Tensor  # int64 [S]: flat indices (l·N + n) of the selected neurons, increasing
    sel_languages: torch.Tensor  # bool [K, S]: the languages whose set holds each selected neuron
    tau: float
    lam: float | None
    saturated: bool
    evaluations: int  # λ evaluations (1 for a fixed λ or LAPE)

    @classmethod
    def build(cls, selected: torch.Tensor, classes: torch.Tensor, active: torch.Tensor, n_active: torch.Tensor,
              tau: float, lam: float | None, saturated: bool, evaluations: int) -> "ResampleFit":
        K = active.shape[0]
        sel_index = torch.nonzero(selected.reshape(-1)).flatten()
        cls_sel = classes.reshape(-1)[sel_index]
        in_language = (cls_sel == SPECIFIC) | (cls_sel == RELATED)
        sel_languages = active.reshape(K, -1)[:, sel_index] & in_language.unsqueeze(0)
        return cls(selected, classes, n_active, sel_index, sel_languages, tau, lam, saturated, evaluations)

    @property
    def lang_sets(self) -> torch.Tensor:
        """bool [K, L, N]: the specific and related neurons of each language."""
        K = self.sel_languages.shape[0]
        out = torch.zeros(K, self.selected.numel(), dtype=torch.bool)
        out[:, self.sel_index] = self.sel_languages
        return out.view(K, *self.selected.shape)

    def sets(self) -> list[torch.Tensor]:
        """Flat indices of each language's set, of their union, and of the whole selection."""
        out = [self.sel_index[self.sel_languages[k]] for k in range(self.sel_languages.shape[0])]
        out.append(self.sel_index[self.sel_languages.any(0)])
        out.append(self.sel_index)
        return out

    def counts(self) -> dict[str, int]:
        c = self.classes
        n_sel = self.n_active.reshape(-1)[self.sel_index]
        return {"specific": int((c == SPECIFIC).sum()), "related": int((c == RELATED).sum()),
                "language": int(((c == SPECIFIC) | (c == RELATED)).sum()),
                "selected_active": int((n_sel >= 1).sum()),
                "unassigned": int((c == UNASSIGNED).sum()), "general": int((c == GENERAL).sum()),
                "selected": int(self.sel_index.numel())}


def _resample_fit(fit: SelectionFit) -> ResampleFit:
    return ResampleFit.build(fit.selected, fit.classes, fit.active, fit.n_active, fit.tau, fit.lam, fit.saturated,
                             fit.evaluations)


def fit_counts(positive: torch.Tensor, tokens: torch.Tensor, spec: IdentifySpec,
               languages: Sequence[str] | None = None, tau_guess: float | None = None) -> ResampleFit:
    """Identify from counts ([K, L, N] integers, possibly as float64, and [K] tokens); equals
    ``identify(ActivationStats(..., positive, tokens), spec.method, **spec.params)``."""
    [fit] = spec.selector().fit_many(positive.unsqueeze(0), tokens.unsqueeze(0), tau_guess=tau_guess)
    if isinstance(fit, IdentifyError):
        raise fit
    return _resample_fit(fit)


def _chunk_size(stats: ActivationStats, total: int, budget: int = CHUNK_BYTES) -> int:
    # per resample: float64 (at most) counts (8 B) + float32 probabilities (4 B) per K·L·N element
    per = max(1, len(stats.languages) * stats.num_layers * stats.num_neurons * 12)
    return max(1, min(total, budget // per, 64))


def fit_design(stats: ActivationStats, W: torch.Tensor, spec: IdentifySpec,
               consume: Callable[[int, ResampleFit | None, str | None], None], *, progress: bool = False,
               desc: str = "resamples", chunk: int | None = None, tau_guess: float | None = None) -> dict[str, Any]:
    """Identify every resample of the design ``W`` [R, K, K, B]; ``consume(r, fit, error)``
    receives each result (``fit`` None and ``error`` the message when identification failed,
    e.g. no λ passes). Chunks of resamples share one count product and one probability
    tensor; τ is found near ``tau_guess`` (the full data's τ) when it lies there. Returns
    timing facts."""
    from tqdm.auto import tqdm

    R = int(W.shape[0])
    chunk = chunk or _chunk_size(stats, R)
    sel = spec.selector()
    batched = type(sel).fit_probs is not Selector.fit_probs  # a method-specific fast path
    bar = tqdm(total=R, desc=desc, unit="fit", disable=not progress, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    failed = 0
    try:
        for start in range(0, R, chunk):
            pos, tok = design_counts(stats, W[start:start + chunk])
            fits = sel.fit_many(pos, tok, tau_guess=tau_guess)
            del pos
            for c, fit in enumerate(fits):
                if isinstance(fit, IdentifyError):
                    failed += 1
                    consume(start + c, None, str(fit))
                else:
                    consume(start + c, _resample_fit(fit), None)
                bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"resamples": R, "failed": failed, "seconds": round(seconds, 3),
            "seconds_per_resample": round(seconds / max(R, 1), 4), "chunk": chunk, "batched": batched}


# -- summaries ------------------------------------------------------------------------------------
def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = int(torch.isin(a, b).sum())
    union = int(a.numel() + b.numel() - inter)
    return float("nan") if union == 0 else inter / union


def pairwise_jaccard(sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 [R, R]: J(A_r, A_q) of sets given as flat index tensors (NaN where both are empty)."""
    R = len(sets)
    if R == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    universe = torch.unique(torch.cat([s.reshape(-1) for s in sets])) if R else torch.zeros(0, dtype=torch.int64)
    X = torch.zeros(R, universe.numel(), dtype=torch.float32)
    for r, s in enumerate(sets):
        if s.numel():
            X[r, torch.searchsorted(universe, s)] = 1.0
    inter = (X @ X.T).to(torch.float64)  # exact: counts below 2**24
    size = X.sum(1).to(torch.float64)
    union = size.view(-1, 1) + size.view(1, -1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))


def expected_pairwise_jaccard(sets: Sequence[torch.Tensor]) -> float:
    """Mean of J over all pairs r < q (pairs of two empty sets left out); NaN with < 2 sets."""
    if len(sets) < 2:
        return float("nan")
    J = pairwise_jaccard(sets)
    iu = torch.triu_indices(len(sets), len(sets), offset=1)
    vals = J[iu[0], iu[1]]
    vals = vals[~torch.isnan(vals)]
    return float(vals.mean()) if vals.numel() else float("nan")


def _set_names(languages: Sequence[str]) -> list[str]:
    return list(languages) + [ALL_LANGS, SELECTION]


@dataclass
class StabilityResult:
    """Bootstrap stability of a selection; see the module docstring for the definitions."""

    languages: list[str]
    spec: IdentifySpec
    resamples: int  # requested
    valid: int  # identified without error
    seed: int
    num_buckets: int
    buckets_used: list[int]  # non-empty buckets per language
    core: float
    full: ResampleFit  # identification of the full data
    selection_freq: torch.Tensor  # float32 [L, N]
    class_freq: dict[str, torch.Tensor]  # specific / related / general / unassigned -> float32 [L, N]
    language_freq: torch.Tensor  # float32 [K, L, N]: share of resamples with the neuron in the language's set
    per_set: dict[str, dict[str, float]]  # per language (+ all, selection): Jaccard summaries and sizes
    per_resample: list[dict[str, Any]]  # counts, λ, τ per resample (error when it failed)
    timing: dict[str, Any]

    @property
    def stable_core(self) -> torch.Tensor:
        return self.selection_freq >= self.core

    def neuron_table(self) -> Any:
        """One row per neuron selected in the full data or in any resample (stability.parquet)."""
        import pandas as pd

        L, N = self.selection_freq.shape
        keep = (self.selection_freq > 0) | self.full.selected
        idx = torch.nonzero(keep.reshape(-1)).flatten()
        layer, neuron = (idx // N), (idx % N)
        flat = lambda t: t.reshape(-1)[idx].numpy()  # noqa: E731
        lang_freq = self.language_freq.reshape(len(self.languages), -1)[:, idx]
        top = lang_freq.argmax(0)
        top_freq = lang_freq.gather(0, top.view(1, -1)).reshape(-1)
        full_classes = self.full.classes.reshape(-1)[idx]
        return pd.DataFrame({
            "layer": layer.numpy().astype("int32"), "neuron": neuron.numpy().astype("int32"),
            "selection_freq": flat(self.selection_freq).astype("float32"),
            "freq_specific": flat(self.class_freq["specific"]).astype("float32"),
            "freq_related": flat(self.class_freq["related"]).astype("float32"),
            "freq_general": flat(self.class_freq["general"]).astype("float32"),
            "freq_unassigned": flat(self.class_freq["unassigned"]).astype("float32"),
            "in_full_selection": flat(self.full.selected).astype(bool),
            "full_class": [CLASS_NAMES[int(c)] for c in full_classes],
            "stable": flat(self.stable_core).astype(bool),
            # the language whose set holds the neuron most often (None: in no language's set)
            "top_language": [self.languages[int(t)] if float(f) > 0 else None for t, f in zip(top, top_freq)],
            "top_language_freq": top_freq.numpy().astype("float32"),
        })

    def language_table(self) -> Any:
        import pandas as pd

        rows = []
        for name, d in self.per_set.items():
            rows.append({"set": name, **d})
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        full_sel = int(self.full.selected.sum())
        core = int(self.stable_core.sum())
        return {
            "mode": "bootstrap", "resamples": self.resamples, "valid": self.valid, "seed": self.seed,
            "buckets": self.num_buckets, "buckets_used": dict(zip(self.languages, self.buckets_used)),
            "core_threshold": self.core, "stable_core": core, "full_selected": full_sel,
            "stable_core_in_full": int((self.stable_core & self.full.selected).sum()),
            "ever_selected": int((self.selection_freq > 0).sum()),
            "identify": self.spec.describe(),
            "expected_jaccard": {k: _num(v["expected_jaccard"]) for k, v in self.per_set.items()},
            "jaccard_full": {k: _num(v["jaccard_full_mean"]) for k, v in self.per_set.items()},
            "lambda_saturated": sum(1 for r in self.per_resample if r.get("saturated")),
            **{k: v for k, v in self.timing.items() if k in ("seconds", "seconds_per_resample", "chunk")},
        }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _resample_row(r: int, fit: ResampleFit | None, error: str | None) -> dict[str, Any]:
    if fit is None:
        return {"resample": r, "error": error}
    return {"resample": r, **fit.counts(), "tau": fit.tau, "lambda": fit.lam, "saturated": fit.saturated,
            "evaluations": fit.evaluations}


def stability(stats: ActivationStats, spec: IdentifySpec | None = None, *, resamples: int = 200, seed: int = 0,
              core: float = 0.9, progress: bool = False, chunk: int | None = None) -> StabilityResult:
    """Bootstrap the documents (buckets) of every language ``resamples`` times and identify each
    resample with ``spec``; selection / class frequencies, Jaccard overlaps, the stable core."""
    spec = spec or IdentifySpec()
    stats.validate()
    require_buckets(stats)
    if resamples < 2:
        raise ConfidenceError(f"--resamples must be >= 2 (200 is a good default), got {resamples}")
    if not 0 < core <= 1:
        raise ConfidenceError(f"the stable-core threshold must be in (0, 1], got {core}")
    _warn_few_buckets(stats)
    K, L, N = len(stats.languages), stats.num_layers, stats.num_neurons
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fit_counts(stats.positive, stats.tokens, spec, stats.languages)
    full_sets = full.sets()
    W = bootstrap_design(stats, resamples, seed)
    sel_count = torch.zeros(L, N, dtype=torch.int32)
    class_count = {name: torch.zeros(L, N, dtype=torch.int32) for name in ("specific", "related", "general",
                                                                           "unassigned")}
    codes = {"specific": SPECIFIC, "related": RELATED, "general": GENERAL, "unassigned": UNASSIGNED}
    lang_count = torch.zeros(K, L, N, dtype=torch.int32)
    lang_flat = lang_count.view(K, L * N)
    sets: list[list[torch.Tensor]] = []
    rows: list[dict[str, Any]] = []

    def consume(r: int, fit: ResampleFit | None, error: str | None) -> None:
        rows.append(_resample_row(r, fit, error))
        if fit is None:
            return
        sel_count.add_(fit.selected.view(torch.uint8))
        for name, code in codes.items():
            class_count[name].add_((fit.classes == code).view(torch.uint8))
        # only selected neurons can be in a language's set: add on those columns
        lang_flat.index_add_(1, fit.sel_index, fit.sel_languages.to(torch.int32))
        sets.append(fit.sets())

    timing = fit_design(stats, W, spec, consume, progress=progress, desc="stability", chunk=chunk, tau_guess=full.tau)
    valid = len(sets)
    if valid < 2:
        errors = sorted({r["error"] for r in rows if r.get("error")})
        raise ConfidenceError(f"identification failed on {resamples - valid} of {resamples} resamples "
                              f"({errors[0] if errors else 'unknown'}); check the identification parameters")
    denom = float(valid)
    per_set: dict[str, dict[str, float]] = {}
    for i, name in enumerate(_set_names(stats.languages)):
        group = [s[i] for s in sets]
        with_full = torch.tensor([_jaccard(s, full_sets[i]) for s in group], dtype=torch.float64)
        finite = with_full[~torch.isnan(with_full)]
        sizes = torch.tensor([float(s.numel()) for s in group], dtype=torch.float64)
        if i < K:
            freq = lang_count[i].to(torch.float32) / denom
        elif name == ALL_LANGS:
            freq = None
        else:
            freq = sel_count.to(torch.float32) / denom
        per_set[name] = {
            "expected_jaccard": expected_pairwise_jaccard(group),
            "jaccard_full_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "jaccard_full_low": float(torch.quantile(finite, 0.025)) if finite.numel() else float("nan"),
            "jaccard_full_high": float(torch.quantile(finite, 0.975)) if finite.numel() else float("nan"),
            "full_size": float(full_sets[i].numel()),
            "mean_size": float(sizes.mean()),
            "sd_size": float(sizes.std()) if valid > 1 else 0.0,
            "stable_core": float((freq >= core).sum()) if freq is not None else
            float(((lang_count.to(torch.float32) / denom) >= core).any(0).sum()),
        }
    return StabilityResult(
        languages=list(stats.languages), spec=spec, resamples=resamples, valid=valid, seed=seed,
        num_buckets=stats.num_buckets, buckets_used=[int(p.numel()) for p in _nonempty(stats)], core=core,
        full=full, selection_freq=sel_count.to(torch.float32) / denom,
        class_freq={k: v.to(torch.float32) / denom for k, v in class_count.items()},
        language_freq=lang_count.to(torch.float32) / denom, per_set=per_set,
        per_resample=sorted(rows, key=lambda r: r["resample"]), timing=timing)


def _full_tau(stats: ActivationStats, spec: IdentifySpec) -> float | None:
    probs = stats.positive.to(torch.float32) / stats.tokens.to(torch.float32).view(-1, 1, 1)
    k = selection_size(spec.selector().bar, probs.numel())
    return float(torch.kthvalue(probs.reshape(-1), k).values) if 1 <= k <= probs.numel() else None


@dataclass
class SplitHalfResult:
    languages: list[str]
    spec: IdentifySpec
    seed: int
    jaccard: dict[str, float]  # per language, all languages, selection
    sizes: dict[str, tuple[int, int]]
    halves: list[ResampleFit]

    def table(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{"set": k, "jaccard": v, "size_a": self.sizes[k][0], "size_b": self.sizes[k][1]}
                             for k, v in self.jaccard.items()])

    def summary(self) -> dict[str, Any]:
        return {"mode": "split-half", "seed": self.seed, "identify": self.spec.describe(),
                "jaccard": {k: _num(v) for k, v in self.jaccard.items()}}


def split_half(stats: ActivationStats, spec: IdentifySpec | None = None, *, seed: int = 0) -> SplitHalfResult:
    """Quick mode: identify on two disjoint random halves of every language's buckets and
    compare their sets (each half has half the data: a lower bound on the full data's stability)."""
    spec = spec or IdentifySpec()
    stats.validate()
    require_buckets(stats)
    W = split_half_design(stats, seed)
    fits: list[ResampleFit | None] = [None, None]
    errors: list[str] = []

    def consume(r: int, fit: ResampleFit | None, error: str | None) -> None:
        fits[r] = fit
        if error:
            errors.append(error)

    fit_design(stats, W, spec, consume, tau_guess=_full_tau(stats, spec))
    if errors or fits[0] is None or fits[1] is None:
        raise ConfidenceError(f"identification failed on a half of the data ({errors[0] if errors else '?'})")
    a, b = fits[0].sets(), fits[1].sets()  # type: ignore[union-attr]
    names = _set_names(stats.languages)
    return SplitHalfResult(list(stats.languages), spec, seed,
                           {n: _jaccard(a[i], b[i]) for i, n in enumerate(names)},
                           {n: (int(a[i].numel()), int(b[i].numel())) for i, n in enumerate(names)},
                           [fits[0], fits[1]])


@dataclass
class NullResult:
    """Counts under permuted language labels vs the observed counts."""

    languages: list[str]
    spec: IdentifySpec
    permutations: int
    seed: int
    observed: dict[str, int]
    null: list[dict[str, Any]]  # one row per permutation (error when identification failed)
    timing: dict[str, Any]

    def values(self, stat: str) -> list[int]:
        return [int(r[stat]) for r in self.null if r.get("error") is None]

    def test(self, stat: str) -> dict[str, float]:
        """Empirical p-value (1 + #{null >= observed}) / (1 + n), false-discovery estimate
        mean(null) / observed (capped at 1), and the null's mean / sd / 95th percentile."""
        vals = torch.tensor(self.values(stat), dtype=torch.float64)
        obs = self.observed[stat]
        n = int(vals.numel())
        if n == 0:
            return {"observed": obs, "n": 0, "p_value": float("nan"), "fdr": float("nan"),
                    "null_mean": float("nan"), "null_sd": float("nan"), "null_q95": float("nan")}
        mean = float(vals.mean())
        return {"observed": obs, "n": n, "p_value": (1 + int((vals >= obs).sum())) / (1 + n),
                "fdr": (min(1.0, mean / obs) if obs > 0 else float("nan")), "null_mean": mean,
                "null_sd": float(vals.std()) if n > 1 else 0.0, "null_q95": float(torch.quantile(vals, 0.95)),
                "null_max": float(vals.max())}

    def table(self) -> Any:
        import pandas as pd

        rows = [{"permutation": -1, "kind": "observed", **{s: self.observed[s] for s in NULL_STATS},
                 "lambda": self.observed.get("lambda"), "tau": self.observed.get("tau"), "error": None}]
        for r in self.null:
            rows.append({"permutation": r["resample"], "kind": "null",
                         **{s: r.get(s) for s in NULL_STATS}, "lambda": r.get("lambda"), "tau": r.get("tau"),
                         "error": r.get("error")})
        df = pd.DataFrame(rows)
        for s in NULL_STATS:
            df[s] = df[s].astype("Int64")
        return df

    def summary(self) -> dict[str, Any]:
        tests = {s: {k: (_num(v) if isinstance(v, float) else v) for k, v in self.test(s).items()} for s in NULL_STATS}
        return {"permutations": self.permutations, "valid": len(self.values("specific")), "seed": self.seed,
                "identify": self.spec.describe(), "tests": tests,
                **{k: v for k, v in self.timing.items() if k in ("seconds", "seconds_per_resample")}}


def null_distribution(stats: ActivationStats, spec: IdentifySpec | None = None, *, permutations: int = 100,
                      seed: int = 0, progress: bool = False, chunk: int | None = None) -> NullResult:
    """Identify ``permutations`` relabelled copies of the data (buckets dealt to languages at
    random) and compare the counts of specific / related / ... neurons with the real labels'."""
    spec = spec or IdentifySpec()
    stats.validate()
    require_buckets(stats)
    if permutations < 1:
        raise ConfidenceError(f"--null permutations must be >= 1 (100 is a good default), got {permutations}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = fit_counts(stats.positive, stats.tokens, spec, stats.languages)
    observed: dict[str, Any] = {**full.counts(), "lambda": full.lam, "tau": full.tau}
    W = permutation_design(stats, permutations, seed)
    rows: list[dict[str, Any]] = []
    timing = fit_design(stats, W, spec, lambda r, fit, err: rows.append(_resample_row(r, fit, err)),
                        progress=progress, desc="null", chunk=chunk, tau_guess=full.tau)
    if not any(r.get("error") is None for r in rows):
        raise ConfidenceError(f"identification failed on every permutation ({rows[0].get('error')})")
    return NullResult(list(stats.languages), spec, permutations, seed, observed,
                      sorted(rows, key=lambda r: r["resample"]), timing)


# -- intervals on interventions -------------------------------------------------------------------
def interval_cells(df: Any, metric: str = "nll") -> Any:
    """Per cell (neuron set, deactivated, evaluated) of ``ablation.parquet``: the delta, its
    bootstrap interval and its random control averaged over seeds with the spread.

    This is the fallback for runs without per-document scores: the interval is the real set's
    alone and ``excludes_control`` compares it with the control's MEAN, so the control's own
    variance across seeds is ignored. `intervals.ablation_intervals` (per-document scores in
    ``ablation_docs.parquet``) resamples documents and control seeds together; prefer it.

    Columns: neuron_set, deactivated_lang, eval_lang, delta, ci_low, ci_high, control_mean,
    control_sd (over seeds, ddof 1; NaN with one seed), control_min, control_max, control_seeds,
    excludes_control (the interval lies entirely above or below the control's mean; False
    without an interval or a control)."""
    import pandas as pd

    cols = ["neuron_set", "deactivated_lang", "eval_lang", "delta", "ci_low", "ci_high", "control_mean",
            "control_sd", "control_min", "control_max", "control_seeds", "excludes_control"]
    sub = df[df["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    for c in ("ci_low", "ci_high"):
        if c not in sub.columns:
            sub = sub.assign(**{c: float("nan")})
    real = sub[~sub["neuron_set"].str.startswith("random:")]
    ctrl = sub[sub["neuron_set"].str.startswith("random:")].copy()
    ctrl["base_set"] = ctrl["neuron_set"].str.slice(len("random:"))
    keys = ["base_set", "deactivated_lang", "eval_lang"]
    agg = ctrl.groupby(keys)["delta"].agg(control_mean="mean", control_sd="std", control_min="min",
                                          control_max="max", control_seeds="count").reset_index()
    merged = real.merge(agg, how="left", left_on=["neuron_set", "deactivated_lang", "eval_lang"], right_on=keys)
    lo, hi, cm = merged["ci_low"], merged["ci_high"], merged["control_mean"]
    merged["excludes_control"] = (lo.notna() & hi.notna() & cm.notna() & ((cm < lo) | (cm > hi))).astype(bool)
    merged["control_seeds"] = merged["control_seeds"].fillna(0).astype("int64")
    extra = [c for c in ("n_docs", "n_tokens", "n_resamples") if c in merged.columns]
    return merged[cols + extra].reset_index(drop=True)


# -- run directories ------------------------------------------------------------------------------
def load_run_stats(run_dir: str | Path, languages: Sequence[str] | None = None) -> ActivationStats:
    """The run's stats with their per-bucket counts; a clear error naming the languages that
    lack them."""
    from .stats import load_language_stats

    parts = load_language_stats(run_dir, languages)
    missing = [p.lang for p in parts if not p.has_buckets]
    if missing:
        raise ConfidenceError(f"the stats of {','.join(missing)} in {run_dir} carry no per-bucket counts (recorded "
                              "before buckets existed, with --buckets 0, imported, or merged from inputs without "
                              "them), so documents cannot be resampled; record the run again with "
                              "`langneurons record ... --force` to measure stability")
    if len({p.num_buckets for p in parts}) > 1:
        raise ConfidenceError(f"the languages of {run_dir} were recorded with different numbers of buckets "
                              f"({sorted({p.num_buckets for p in parts})}); record them again with one --buckets")
    return ActivationStats.stack(parts)


def _run_context(run_dir: str | Path, method: str | None, lam: str | float
                 ) -> tuple[RunDir, ActivationStats, IdentifySpec, NeuronMap | None]:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ConfidenceError(f"{run.path} is not a run directory; give one written by `langneurons record`")
    nmap = NeuronMap.load(run.neurons_path) if run.neurons_path.is_file() else None
    stats = load_run_stats(run.path, nmap.languages if nmap is not None else None)
    return run, stats, run_spec(run.path, method, lam, nmap), nmap


def _write_parquet(path: Path, df: Any) -> Path:
    from .io import atomic_write

    return atomic_write(path, lambda p: df.to_parquet(p, index=False))


def run_stability(run_dir: str | Path, *, resamples: int = 200, method: str | None = None, lam: str | float = "run",
                  seed: int = 0, core: float = 0.9, progress: bool = True,
                  skip_if_fresh: bool = False) -> StabilityResult | None:
    """`langneurons stability RUN_DIR`: bootstrap stability, written to stability.parquet,
    stability_languages.parquet, the manifest's ``stability`` stage record and, when the run's neuron
    map is the selection analysed (same method, parameters and stats), its extras
    ``selection_freq`` (float32 [L, N]) and ``stable_core`` (bool [L, N])."""
    run, stats, spec, nmap = _run_context(run_dir, method, lam)
    if skip_if_fresh:  # `langneurons run --stability N` again: the same resamples of the same stats
        from .stage import is_fresh

        inputs = {"identify": spec.describe(), "stats_fingerprint": stats.fingerprint(), "resamples": resamples,
                  "seed": seed, "core": core}
        if is_fresh(run, "stability", inputs):
            return None
    res = stability(stats, spec, resamples=resamples, seed=seed, core=core, progress=progress)
    _write_parquet(run.path / STABILITY_FILE, res.neuron_table())
    _write_parquet(run.path / STABILITY_LANG_FILE, res.language_table())
    summary = res.summary()
    summary["neuron_map_updated"] = False
    if nmap is not None:
        if nmap.languages == res.languages and torch.equal(nmap.selected, res.full.selected):
            nmap.extras["selection_freq"] = res.selection_freq.to(torch.float32)
            nmap.extras["stable_core"] = res.stable_core
            nmap.meta["stability"] = {"resamples": res.resamples, "valid": res.valid, "seed": seed, "core": core,
                                      "stable_core": int(res.stable_core.sum())}
            nmap.save(run.neurons_path)
            # The selection is unchanged (only extras were added): the identify stage stays current.
            run.refresh_outputs("identify", [run.neurons_path])
            summary["neuron_map_updated"] = True
        else:
            warnings.warn(f"the neuron map in {run.neurons_path} is not the selection analysed here (other method, "
                          "parameters or stats); its extras were left unchanged, see stability.parquet", stacklevel=2)
    _commit(run, "stability", spec, stats, [run.path / STABILITY_FILE, run.path / STABILITY_LANG_FILE], summary,
            resamples=resamples, seed=seed, core=core)
    return res


def run_split_half(run_dir: str | Path, *, method: str | None = None, lam: str | float = "run",
                   seed: int = 0) -> SplitHalfResult:
    """`langneurons stability RUN_DIR --quick`: split-half agreement, written to
    stability_split_half.parquet and the ``split_half`` stage record."""
    run, stats, spec, _ = _run_context(run_dir, method, lam)
    res = split_half(stats, spec, seed=seed)
    _write_parquet(run.path / SPLIT_HALF_FILE, res.table())
    _commit(run, "split_half", spec, stats, [run.path / SPLIT_HALF_FILE], res.summary(), seed=seed)
    return res


def run_null(run_dir: str | Path, *, permutations: int = 100, method: str | None = None, lam: str | float = "run",
             seed: int = 0, progress: bool = True) -> NullResult:
    """The permutation null of a run: null.parquet and the ``null`` stage record."""
    run, stats, spec, _ = _run_context(run_dir, method, lam)
    res = null_distribution(stats, spec, permutations=permutations, seed=seed, progress=progress)
    _write_parquet(run.path / NULL_FILE, res.table())
    _commit(run, "null", spec, stats, [run.path / NULL_FILE], res.summary(), permutations=permutations, seed=seed)
    return res


def _commit(run: RunDir, name: str, spec: IdentifySpec, stats: ActivationStats, outputs: list[Path],
            summary: dict[str, Any], **settings: Any) -> None:
    from .stage import commit_stage

    inputs = {"identify": spec.describe(), "stats_fingerprint": stats.fingerprint(), **settings}
    commit_stage(run, name, inputs, outputs, summary, 0.0, by="stability")
