"""Speed of identification at Mistral-7B scale (L=32, N=14336, K=10), on synthetic counts.

Times one EntropyLambda fit at a fixed λ, one full automatic-λ fit, and the same fixed-λ step
done neuron by neuron in Python as the published code does (on a few layers, scaled up
linearly to all 32). Prints the ratio (goal: > 30x) and the auto-λ total.

With ``--cli`` it also writes the stats into a temporary run directory (as `record` does:
one safetensors file per language with sums and 16 per-bucket counts, checksums in the
manifest) and times the whole ``langneurons identify RUN --lambda <λ>`` process (load,
checks, identification, NeuronMap, save, manifest, printed summary), minus the time of a
``python -c "import langneurons.cli"`` process (interpreter + imports), against the published
loop: the end-to-end ratio (goal: >= 30x).

    python benchmarks/identify_speed.py [--loop-layers 1] [--repeats 3] [--threads N] [--cli]

Timings are the best of several repeats (the development machine is shared).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from langneurons.identify import EntropyLambda, activation_probs, harmonic_norm, normalized_entropy
from langneurons.stats import ActivationStats

K, L, N = 10, 32, 14336


def synthetic_stats(seed: int = 0) -> ActivationStats:
    """Most neurons fire at a similar rate in every language (a shared base rate with small
    per-language noise); ~3% are language-skewed: boosted in 1-3 languages, damped elsewhere."""
    torch.manual_seed(seed)  # Beta sampling uses the global generator
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(150_000, 400_000, (K,), generator=g)
    base = torch.distributions.Beta(0.6, 2.5).sample((L, N))  # many rarely-firing, a tail of busy neurons
    noise = torch.exp(0.08 * torch.randn(K, L, N, generator=g))
    p = base.unsqueeze(0) * noise
    skewed = torch.rand(L, N, generator=g) < 0.03
    n_skewed = int(skewed.sum())
    boost = torch.zeros(K, n_skewed, dtype=torch.bool)
    langs_per = torch.randint(1, 4, (n_skewed,), generator=g)
    order = torch.rand(K, n_skewed, generator=g).argsort(0)
    boost = order < langs_per.unsqueeze(0)
    sk = p[:, skewed]
    high = 0.3 + 0.6 * torch.rand(K, n_skewed, generator=g)
    sk = torch.where(boost, torch.maximum(sk, high), sk * 0.1)
    p[:, skewed] = sk
    p = p.clamp(0, 1)
    positive = (p * tokens.view(-1, 1, 1)).round().to(torch.int64)
    return ActivationStats([f"lang{k}" for k in range(K)], positive, tokens.to(torch.int64), None,
                           {"model": "synthetic-mistral-7b-shape"})


def write_run_dir(stats: ActivationStats, path: Path, buckets: int = 16) -> Path:
    """The stats as `record` leaves them: per-language files with sums and per-bucket counts
    (bucket b of a language holds ~1/buckets of its tokens and of each neuron's positives)."""
    from langneurons.stats import LanguageStats
    from langneurons.runs import RunDir

    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for k, lang in enumerate(stats.languages):
        T = int(stats.tokens[k])
        pos = stats.positive[k].clamp(max=int(T * 0.99))
        bt = torch.full((max(buckets, 1),), T // max(buckets, 1), dtype=torch.int64)
        bt[-1] += T - int(bt.sum())
        share = bt[:-1].double().view(-1, 1, 1) / T
        bp = (pos.double().unsqueeze(0) * share).floor().to(torch.int64)
        bp = torch.cat([bp, (pos - bp.sum(0)).unsqueeze(0)]).to(torch.int32)
        sums = pos.double() * (0.5 + torch.rand(pos.shape, generator=g, dtype=torch.float64))
        part = LanguageStats(lang, pos, T, sums, dict(stats.meta))
        if buckets:
            part.bucket_positive, part.bucket_tokens = bp, bt
            part.bucket_docs = torch.full((buckets,), 10, dtype=torch.int64)
        run.write_language_stats(part)
    run.update_manifest({"languages": list(stats.languages)})
    return run.path


def _process_seconds(argv: list[str], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        best = min(best, time.perf_counter() - t0)
    return best


def published_loop_scores(probs_lhk: torch.Tensor, layers: range, lam: float) -> torch.Tensor:
    """The published per-neuron loop (authors' identify.py), restricted to ``layers``."""
    num_langs = probs_lhk.shape[-1]
    norm_max = sum(1 / k for k in range(1, num_langs + 1)) / num_langs
    out = torch.zeros(len(layers), probs_lhk.shape[1])

    def calc_entropy(p1d, eps=1e-12):
        p = p1d.clamp_min(eps)
        p = p / p.sum()
        return float(-(p * (p + 1e-30).log()).sum().item())

    def wrap_neuron(vec, mode):
        if mode == "activation":
            return vec
        s = vec.sum()
        if s <= 0:
            return torch.full_like(vec, 1.0 / vec.numel())
        return vec / s

    for i, l in enumerate(layers):
        for n in range(probs_lhk.shape[1]):
            vec = probs_lhk[l, n, :]
            e = calc_entropy(wrap_neuron(vec, "normed")) / np.log(num_langs)
            max_act = wrap_neuron(vec, "activation").max().item()
            out[i, n] = e - max_act * float(lam) / norm_max
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop-layers", type=int, default=1, help="layers timed with the per-neuron loop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--cli", action="store_true", help="also time the `langneurons identify` process end to end")
    ap.add_argument("--buckets", type=int, default=16, help="per-bucket counts in the run directory (record's "
                    "default 16; 0: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 gives stable numbers on a shared, busy machine")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; K={K} L={L} N={N}")
    t0 = time.perf_counter()
    stats = synthetic_stats()
    print(f"synthetic stats built in {time.perf_counter() - t0:.1f}s")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t_fixed, est = timed(lambda: EntropyLambda(top_rate=0.01, lam=args.lam).fit(stats), args.repeats)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"EntropyLambda fit, fixed λ={args.lam}: {t_fixed:.3f}s (whole fit: validation, fingerprint, τ, "
          f"entropy, selection); selected {int(est.selected_.sum())}, appear[K]={est.appear_[K]}, "
          f"unassigned {est.neuron_map_.meta['num_unassigned']}")

    t_auto, auto = timed(lambda: EntropyLambda(top_rate=0.01, lam="auto").fit(stats), max(1, args.repeats - 1))
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_eval = len(auto.lambda_trace_)
    print(f"EntropyLambda fit, auto λ: {t_auto:.3f}s total, {n_eval} λ evaluations, λ={auto.lambda_:.6g}"
          f"{' (saturated)' if auto.lambda_saturated_ else ''}, appear={auto.appear_}")

    # the λ step alone (what each bisection step costs once the λ-independent parts exist)
    probs = activation_probs(stats)
    entropy = normalized_entropy(probs)
    max_prob = probs.amax(0).to(torch.float64)
    norm = harmonic_norm(K)
    k = round(L * N * 0.01)

    def step():
        scores = (entropy - max_prob * args.lam / norm).to(torch.float32)
        kth = torch.kthvalue(scores.reshape(-1), k).values
        return scores, kth

    t_step, (ours_scores, _) = timed(step, 5)
    print(f"one λ step (fused score + kthvalue selection): {t_step * 1000:.1f} ms")

    # the published per-neuron loop on a few layers, scaled up
    probs_lhk = probs.permute(1, 2, 0).contiguous()  # the published layout [L, H, K]
    layers = range(args.loop_layers)
    t_loop, loop_scores = timed(lambda: published_loop_scores(probs_lhk, layers, args.lam), 2)
    t_loop_full = t_loop * L / len(layers)
    diff = float((loop_scores - ours_scores[: len(layers)]).abs().max())
    print(f"published per-neuron loop: {t_loop:.2f}s for {len(layers)} layer(s) -> {t_loop_full:.1f}s estimated "
          f"for {L} layers (max |score difference| vs ours: {diff:.2e}, float32 vs float64 entropy)")
    print(f"speed-up, fixed-λ fit vs published loop: {t_loop_full / t_fixed:.0f}x (goal > 30x)")
    print(f"speed-up, one λ step vs published loop: {t_loop_full / t_step:.0f}x")
    print(f"auto-λ fit: {t_auto:.2f}s vs ~{t_loop_full * n_eval:.0f}s for {n_eval} published loop evaluations")
    print(f"peak RSS: {rss0:.0f} MiB after building stats, {rss1:.0f} MiB after fixed-λ fits, "
          f"{rss2:.0f} MiB after auto fits")
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            run = write_run_dir(stats, Path(tmp) / "run", args.buckets)
            base = _process_seconds([sys.executable, "-c", "import langneurons.cli"], args.repeats)
            # the CLI imports a command's modules (torch, safetensors...) only when it runs
            base_all = _process_seconds([sys.executable, "-c", "import langneurons.cli, langneurons.cli.identify, "
                                         "langneurons.identify, langneurons.stats, langneurons.runs"], args.repeats)
            cmd = [sys.executable, "-m", "langneurons", "identify", str(run), "--lambda", str(args.lam)]
            t_cli = _process_seconds(cmd, args.repeats)
            t_auto_cli = _process_seconds(cmd[:-2], max(1, args.repeats - 1))
        work, work_auto = t_cli - base, t_auto_cli - base
        print(f"run directory: {args.buckets} per-bucket counts per language")
        print(f"`langneurons identify RUN --lambda {args.lam}` process: {t_cli:.2f}s; interpreter + "
              f"`import langneurons.cli` {base:.2f}s; + the command's modules (torch...) {base_all:.2f}s")
        print(f"speed-up end to end vs published loop, fixed λ: {t_loop_full / work:.0f}x minus `import "
              f"langneurons.cli` ({work:.2f}s of work), {t_loop_full / (t_cli - base_all):.0f}x minus all imports "
              f"({t_cli - base_all:.2f}s) (goal >= 30x)")
        print(f"auto λ process: {t_auto_cli:.2f}s (work {work_auto:.2f}s) vs ~{t_loop_full * n_eval:.0f}s for "
              f"{n_eval} published loop evaluations: {t_loop_full * n_eval / work_auto:.0f}x")


if __name__ == "__main__":
    main()
