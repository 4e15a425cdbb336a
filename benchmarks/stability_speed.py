"""Speed of the stability bootstrap and the permutation null at Mistral-7B scale
(K=10 languages, L=32 layers, N=14336 neurons, B=16 document buckets), on synthetic counts.

Times a few bootstrap resamples and permutations (each one a full identification with the
automatic λ search, as `langneurons stability` runs them), prints the time per resample and
the projected time of 200 resamples / 100 permutations, and the plain `identify()` time of one
resample for comparison (the batched path must equal it exactly; here we also check that on
the first resample).

    python benchmarks/stability_speed.py [--resamples 6] [--permutations 4] [--threads N]

The benchmark itself runs in about 1-2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

from langneurons.confidence import (
    IdentifySpec,
    bootstrap_design,
    fit_counts,
    null_distribution,
    resampled_stats,
    stability,
)
from langneurons.identify import identify
from langneurons.stats import ActivationStats

K, L, N, B = 10, 32, 14336, 16


def synthetic_bucket_stats(seed: int = 0) -> ActivationStats:
    """A shared base rate per neuron with per-language noise, ~3% language-skewed neurons
    (boosted in 1-3 languages), and per-bucket (document group) variation of every rate."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = torch.distributions.Beta(0.6, 2.5).sample((L, N))
    p = base.unsqueeze(0) * torch.exp(0.08 * torch.randn(K, L, N, generator=g))
    skewed = torch.rand(L, N, generator=g) < 0.03
    n_sk = int(skewed.sum())
    langs_per = torch.randint(1, 4, (n_sk,), generator=g)
    boost = torch.rand(K, n_sk, generator=g).argsort(0) < langs_per.unsqueeze(0)
    sk = p[:, skewed]
    p[:, skewed] = torch.where(boost, torch.maximum(sk, 0.3 + 0.6 * torch.rand(K, n_sk, generator=g)), sk * 0.1)
    p = p.clamp(0, 1)
    # ~36M tokens per language: resampled counts exceed 2**24, so the exact float64 path is timed
    bucket_tokens = torch.randint(1_500_000, 3_000_000, (K, B), generator=g)
    bucket_positive = torch.empty(K, B, L, N, dtype=torch.int32)
    for k in range(K):  # one language at a time keeps the float temporaries small
        jitter = torch.exp(0.1 * torch.randn(B, L, N, generator=g))
        pb = (p[k].unsqueeze(0) * jitter).clamp_(0, 1)
        bucket_positive[k] = (pb * bucket_tokens[k].view(B, 1, 1)).round_().to(torch.int32)
    stats = ActivationStats([f"lang{k}" for k in range(K)], bucket_positive.sum(1, dtype=torch.int64),
                            bucket_tokens.sum(1), None, {"model": "synthetic-mistral-7b-shape"})
    stats.bucket_positive, stats.bucket_tokens = bucket_positive, bucket_tokens
    stats.bucket_docs = torch.full((K, B), 40, dtype=torch.int64)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resamples", type=int, default=8, help="bootstrap resamples to time")
    ap.add_argument("--permutations", type=int, default=4, help="null permutations to time")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"K={K} L={L} N={N} B={B}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    stats = synthetic_bucket_stats()
    print(f"synthetic stats with buckets: {time.perf_counter() - t0:.1f} s "
          f"(bucket counts {stats.bucket_positive.numel() * 4 / 2**20:.0f} MiB as int32)")
    spec = IdentifySpec("entropy-lambda", {"top_rate": 0.01, "bar": 0.95, "lam": "auto"})

    # the reference: plain identify() on the first resample, and the exactness check
    W = bootstrap_design(stats, 1, seed=0)
    t0 = time.perf_counter()
    one = resampled_stats(stats, W[0])
    t_counts = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ref = identify(one, "entropy-lambda", top_rate=0.01, bar=0.95)
        t_identify = time.perf_counter() - t0
        fit = fit_counts(one.positive, one.tokens, spec)
    same = torch.equal(ref.selected, fit.selected) and torch.equal(ref.classes, fit.classes) \
        and ref.meta["lambda"] == fit.lam
    print(f"naive loop, one resample: counts {t_counts:.2f} s + identify() {t_identify:.2f} s "
          f"({len(ref.meta['lambda_trace'])} λ evaluations); batched path equal: {same}")

    res = stability(stats, spec, resamples=args.resamples, seed=0, progress=False)
    per = res.timing["seconds_per_resample"]
    print(f"bootstrap: {args.resamples} resamples in {res.timing['seconds']:.1f} s "
          f"(chunk {res.timing['chunk']}): {per:.2f} s per resample "
          f"-> 200 resamples ≈ {200 * per / 60:.1f} min ({(t_counts + t_identify) / max(per, 1e-9):.1f}x faster "
          "than the naive loop)")
    nr = null_distribution(stats, spec, permutations=args.permutations, seed=0, progress=False)
    per_null = nr.timing["seconds_per_resample"]
    print(f"null: {args.permutations} permutations in {nr.timing['seconds']:.1f} s: {per_null:.2f} s per "
          f"permutation -> 100 permutations ≈ {100 * per_null / 60:.1f} min")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
