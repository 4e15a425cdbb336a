"""The GPU path, measured: record and ablate Gemma 3 270M in float32 and bfloat16 (issue 20).

Run through benchmarks/gpu_check.sh (it prepares the environment). Per dtype: record the
built-in corpus (a token budget per language), identify (entropy-λ, defaults), run the ablation
matrix (specific neurons, no control) on held-out documents. Then compare the dtypes:

* the share of (layer, neuron, language) positive counts that differ between float32 and
  bfloat16 (token counts must agree: the same tokens are counted), and the mean |Δp|;
* whether the neuron map changes (neurons whose class differs, Jaccard of the selections, τ, λ);
* tokens/s of recording and of the ablation matrix (scored tokens x passes / seconds);
* peak GPU memory per phase (torch.cuda.max_memory_allocated; on --cpu: the process's peak RSS).

Prints a summary and writes it as JSON (``--out``/summary.json). ``--cpu --small`` runs the same
steps on the CPU with a tiny budget, so the script is exercised where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak)


def run_dtype(args: argparse.Namespace, dtype: str, device: str, train: Any, held: dict[str, list[Any]]) -> dict[str, Any]:
    from langneurons.evaluate import ablation_matrix, select_eval_docs
    from langneurons.identify import identify
    from langneurons.models import load_model
    from langneurons.record import RecordConfig, record

    out: dict[str, Any] = {"dtype": dtype}
    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=dtype, device=device)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    model, tok = loaded.model, loaded.tokenizer

    peak_reset(device)
    t0 = time.perf_counter()
    stats = record(model, tok, train, Path(args.out) / dtype, RecordConfig(batch_size=args.batch_size,
                   max_tokens_per_lang=args.tokens_per_lang, buckets=0), model_fingerprint=loaded.fingerprint,
                   progress=False, force=True)
    seconds = time.perf_counter() - t0
    out["record"] = {"tokens": int(stats.tokens.sum()), "seconds": round(seconds, 2),
                     "tokens_per_s": round(int(stats.tokens.sum()) / seconds, 1), "peak_mib": round(peak_mib(device), 1)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nmap = identify(stats)

    sel = select_eval_docs(tok, held, args.eval_tokens_per_lang, min_docs=1)
    info: dict[str, Any] = {}
    peak_reset(device)
    t0 = time.perf_counter()
    ablation_matrix(model, tok, nmap, sel.by_lang, neuron_sets=("specific",), control=None,
                    batch_size=args.batch_size, progress=False, stats=info)
    seconds = time.perf_counter() - t0
    passes = int(info.get("passes", 0))
    out["ablation"] = {"passes": passes, "tokens_per_pass": sel.tokens_per_pass, "seconds": round(seconds, 2),
                       "tokens_per_s": round(passes * sel.tokens_per_pass / seconds, 1) if seconds > 0 else None,
                       "peak_mib": round(peak_mib(device), 1)}
    del model, loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return out | {"_stats": stats, "_nmap": nmap}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    sa, sb = a["_stats"], b["_stats"]
    if sa.languages != sb.languages or not torch.equal(sa.tokens, sb.tokens):
        raise SystemExit("error: the two dtypes counted different tokens; the comparison is meaningless")
    differ = sa.positive != sb.positive
    pa, pb = sa.probs(torch.float64), sb.probs(torch.float64)
    na, nb = a["_nmap"], b["_nmap"]
    class_diff = int((na.classes != nb.classes).sum())
    sel_a, sel_b = na.selected, nb.selected
    union = int((sel_a | sel_b).sum())
    per_lang = {lang: {"float32": na.counts_per_language()[lang]["specific"],
                       "bfloat16": nb.counts_per_language()[lang]["specific"]} for lang in na.languages}
    return {
        "counts_differing_share": round(float(differ.double().mean()), 6),
        "counts_differing": int(differ.sum()), "counts_total": int(differ.numel()),
        "mean_abs_dp": float((pa - pb).abs().mean()), "max_abs_dp": float((pa - pb).abs().max()),
        "neuron_map_changes": class_diff > 0 or not torch.equal(na.active, nb.active),
        "neurons_with_other_class": class_diff,
        "selection_jaccard": round(int((sel_a & sel_b).sum()) / union, 4) if union else 1.0,
        "tau": [na.meta.get("tau"), nb.meta.get("tau")], "lambda": [na.meta.get("lambda"), nb.meta.get("lambda")],
        "specific_per_language": per_lang,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU needed)")
    p.add_argument("--small", action="store_true", help="a tiny budget: 3 languages, few tokens (to exercise the script)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--langs", default=None, help="comma list (default: all 10 built-in; --small: en,de,zh)")
    p.add_argument("--tokens-per-lang", type=int, default=None, help="recording budget (default 20000; --small 150)")
    p.add_argument("--eval-tokens-per-lang", type=int, default=None, help="ablation budget (default 2000; --small 40)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on GPU, 8 on CPU")
    p.add_argument("--out", default="runs/gpu_check")
    args = p.parse_args(argv)
    small = args.small
    args.tokens_per_lang = args.tokens_per_lang or (150 if small else 20000)
    args.eval_tokens_per_lang = args.eval_tokens_per_lang or (40 if small else 2000)
    device = "cpu" if args.cpu else "cuda"
    args.batch_size = args.batch_size or (8 if args.cpu else 32)
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu (--small) to exercise the script without a GPU", file=sys.stderr)
        return 2
    from langneurons.corpus import load_corpus

    langs = args.langs.split(",") if args.langs else (["en", "de", "zh"] if small else None)
    corpus = load_corpus(None, langs, kind="text")
    train, held_c = corpus.split(0.2, seed=0)
    held = held_c.by_lang
    t_all = time.perf_counter()
    results = [run_dtype(args, dtype, device, train, held) for dtype in ("float32", "bfloat16")]
    summary = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__, "model": args.model, "languages": train.languages,
        "tokens_per_lang": args.tokens_per_lang, "eval_tokens_per_lang": args.eval_tokens_per_lang,
        "batch_size": args.batch_size, "small": small,
        "per_dtype": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "float32_vs_bfloat16": compare(*results),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    c = summary["float32_vs_bfloat16"]
    print(f"gpu_check on {summary['device']} ({args.model}, {len(train.languages)} languages, "
          f"{args.tokens_per_lang} tokens/lang{', small' if small else ''}):")
    for r in summary["per_dtype"]:
        print(f"  {r['dtype']:9s} record {r['record']['tokens_per_s']:>10,.0f} tok/s  peak {r['record']['peak_mib']:>8,.0f} MiB"
              f" | ablation {r['ablation']['tokens_per_s'] or 0:>10,.0f} tok/s ({r['ablation']['passes']} passes)"
              f"  peak {r['ablation']['peak_mib']:>8,.0f} MiB")
    print(f"  counts differing fp32 vs bf16: {c['counts_differing']:,} of {c['counts_total']:,} "
          f"({100 * c['counts_differing_share']:.3f}%), mean |dp| {c['mean_abs_dp']:.2e}")
    print(f"  neuron map changes: {c['neuron_map_changes']} ({c['neurons_with_other_class']} neurons change class, "
          f"selection Jaccard {c['selection_jaccard']}, tau {c['tau']}, lambda {c['lambda']})")
    print(f"  total {summary['total_s']} s; summary in {out / 'summary.json'}"
          + ("" if device == "cuda" else "  [CPU: peak memory is the process's peak RSS]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
