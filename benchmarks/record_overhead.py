"""Recording overhead vs a plain forward of the model body, and what skipping the LM head saves.

Run: .venv/bin/python benchmarks/record_overhead.py [--layers 8 --hidden 512 --inter 2048]

Prints ratios measured side by side in one run (interleaved repetitions, median), because
absolute times on a shared 2-core machine are noise. Goal: record / plain body <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import SAMPLE_TEXTS, make_tokenizer  # noqa: E402

from langneurons.arch import body_of  # noqa: E402
from langneurons.corpus import Example  # noqa: E402
from langneurons.record import RecordConfig, Recorder  # noqa: E402


def build(vocab: int, args: argparse.Namespace) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=args.hidden // 4, max_position_embeddings=2048, sliding_window=512)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    tok = make_tokenizer()
    texts = [" ".join(ts) * 3 for ts in SAMPLE_TEXTS.values()]
    examples = [Example("en", text=texts[i % len(texts)]) for i in range(args.docs)]
    model = build(len(tok), args)
    rec = Recorder(model, tok, RecordConfig(batch_size=args.batch_size))
    batches = rec.batches(rec.encode(examples))
    tensors = [rec._tensors(b) for b in batches]
    n_tokens = sum(int(c.sum()) for _, _, c in tensors)
    body = body_of(model)

    def plain() -> None:
        with torch.inference_mode():
            for ids, attn, _ in tensors:
                body(input_ids=ids, attention_mask=attn, use_cache=False)

    def recorded() -> None:
        rec.count(examples, progress=False)

    plain()  # warm up
    recorded()
    p_times, r_times = [], []
    for _ in range(args.reps):  # interleave so both see the same machine load
        p_times += timeit(plain, 1)
        r_times += timeit(recorded, 1)
    p, r = statistics.median(p_times), statistics.median(r_times)
    print(f"model: gemma3-like L={args.layers} d={args.hidden} N={args.inter}; {n_tokens:,} counted tokens "
          f"in {len(batches)} batches of {args.batch_size}; threads={torch.get_num_threads()}")
    print(f"plain body forward : {p:.3f} s  ({n_tokens / p:,.0f} tok/s)")
    print(f"record (counting)  : {r:.3f} s  ({n_tokens / r:,.0f} tok/s)")
    print(f"ratio record / plain body = {r / p:.3f}   (goal <= 1.10)")

    # What skipping the LM head saves on a large-vocabulary model (Gemma 3: 262,144 tokens).
    big = build(262_144, args)
    big_body = body_of(big)

    def full_model() -> None:
        with torch.inference_mode():
            for ids, attn, _ in tensors:
                big(input_ids=ids, attention_mask=attn, use_cache=False)

    def body_only() -> None:
        with torch.inference_mode():
            for ids, attn, _ in tensors:
                big_body(input_ids=ids, attention_mask=attn, use_cache=False)

    full_model()
    f_times, b_times = [], []
    for _ in range(max(args.reps // 2, 2)):
        f_times += timeit(full_model, 1)
        b_times += timeit(body_only, 1)
    f, b = statistics.median(f_times), statistics.median(b_times)
    print(f"vocab 262,144: full model with LM head {f:.3f} s, body only {b:.3f} s -> "
          f"skipping the head saves {100 * (1 - b / f):.0f}% ({f / b:.2f}x faster)")


if __name__ == "__main__":
    main()
