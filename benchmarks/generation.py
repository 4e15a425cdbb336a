"""What counting the model's own answers costs, three ways, and batched vs one-at-a-time generation.

Run: .venv/bin/python benchmarks/generation.py [--model smollm2-135m --langs en,de,zh --questions 4
     --max-new-tokens 32 --batch-size 12]     (--model tiny: a random 2-layer model, seconds)

The model answers the embedded questions (src/langneurons/data/questions) and the response
tokens are counted by

  (a) the authors' protocol: generate, then a full pass over prompt + response and a prefix pass
      over the prompt alone (counts = full minus prefix);
  (b) generate, then ONE pass over prompt_ids + token_ids counting only the response tokens
      (`generate.record_responses(counting="pass")`);
  (c) counting during generation (`record.GenerationCounter`): no pass after generation.

Printed side by side from one run: tokens of model work per counted response token (token
positions the transformer processes; pads not counted), seconds per counted token, and the
agreement of (c) with (b): differing counts, max |Δp| and whether the identified neurons are
the same. Then generation tokens/s batched vs one prompt at a time. Absolute times on a shared
machine are noise; the token ratios are exact, the time ratios indicative.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from langneurons.generate import GenerateStage, GenerateStageConfig, group_questions, record_responses  # noqa: E402
from langneurons.lm import GenerateConfig, generate  # noqa: E402
from langneurons.record import RecordConfig, Recorder, TokenExample  # noqa: E402
from langneurons.tasks import read_task  # noqa: E402

QUESTIONS = ROOT / "src" / "langneurons" / "data" / "questions" / "questions.jsonl"


def load(name: str):
    if name == "tiny":
        from tiny import make_model, make_tokenizer

        tok = make_tokenizer()
        return types.SimpleNamespace(model=make_model("llama", vocab_size=len(tok)), tokenizer=tok, source="tiny",
                                     fingerprint="tiny", dtype="float32")
    from langneurons.models import load_model

    return load_model(name)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--langs", default="en,de,zh")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=12)
    args = ap.parse_args()
    langs = args.langs.split(",")
    loaded = load(args.model)
    questions = group_questions(read_task(QUESTIONS, langs=langs), args.questions)
    rec_cfg = RecordConfig(scope="response", batch_size=args.batch_size)
    dec = GenerateConfig(max_new_tokens=args.max_new_tokens, chat=None, batch_size=args.batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="langneurons-bench-"))
    results = {}
    for counting in ("pass", "during"):
        run = tmp / counting
        cfg = GenerateStageConfig(decoding=dec, counting=counting, progress=False)
        stage = GenerateStage(run, loaded, questions, cfg, record_config=rec_cfg)
        answers, t_gen = timed(lambda: stage.run_stage())
        stats, t_rec = timed(lambda: record_responses(run, loaded, langs, rec_cfg, counting=counting, progress=False))
        results[counting] = (answers, stats, t_gen, t_rec)
    answers, stats_b, t_gen, t_pass = results["pass"]
    _, stats_c, t_during, t_take = results["during"]
    rs = [r for lang in langs for r in answers[lang]]
    assert rs == [r for lang in langs for r in results["during"][0][lang]], "the counting modes answered differently"

    # (a) the authors' passes: full (prompt + response) and prefix (prompt) over every answer
    full = [TokenExample(r.lang, prompt=r.prompt, response=r.response, prompt_ids=(), token_ids=tuple(
        r.prompt_ids + r.token_ids)) for r in rs]
    prefix = [TokenExample(r.lang, prompt=r.prompt, response="", prompt_ids=(), token_ids=tuple(r.prompt_ids))
              for r in rs]
    recorder = Recorder(loaded.model, loaded.tokenizer, RecordConfig(scope="response", batch_size=args.batch_size))
    _, t_full = timed(lambda: recorder.count(full, progress=False))
    _, t_prefix = timed(lambda: recorder.count(prefix, progress=False))

    P = sum(len(r.prompt_ids) for r in rs)
    R = sum(r.num_tokens for r in rs)
    fed = sum(r.num_tokens - (r.stop == "length") for r in rs)  # a length-cut answer's last token is never fed
    gen_work = P + fed
    work = {"a": gen_work + (P + R) + P, "b": gen_work + (P + R), "c": P + R}  # (c): one step more covers it
    secs = {"a": t_gen + t_full + t_prefix, "b": t_gen + t_pass, "c": t_during + t_take}
    print(f"model {loaded.source}; {len(rs)} answers ({', '.join(langs)}), prompt tokens {P}, response tokens {R} "
          f"(stopped by length: {sum(r.stop == 'length' for r in rs)})")
    print(f"{'protocol':<44}{'work tok/counted tok':>22}{'ratio to (c)':>14}{'s/counted tok':>16}{'time ratio':>12}")
    names = {"a": "(a) generate + full pass + prefix pass", "b": "(b) generate + one response pass",
             "c": "(c) counting during generation"}
    for k in "abc":
        print(f"{names[k]:<44}{work[k] / R:>22.3f}{work[k] / work['c']:>14.3f}{secs[k] / R * 1e3:>13.2f} ms"
              f"{secs[k] / secs['c']:>12.3f}")

    # agreement of (c) with (b): the same tokens, counted in the KV-cached decode vs one pass
    diff = (stats_c.positive - stats_b.positive).abs()
    p_b = stats_b.positive.double() / stats_b.tokens.double()[:, None, None]
    p_c = stats_c.positive.double() / stats_c.tokens.double()[:, None, None]
    print(f"\n(c) vs (b): tokens equal: {torch.equal(stats_b.tokens, stats_c.tokens)}; counts differ in "
          f"{int((diff > 0).sum())} of {diff.numel()} (language, layer, neuron) cells; sum |Δcount| = "
          f"{int(diff.sum())} of {int(stats_b.positive.sum())} positive activations "
          f"({int(diff.sum()) / max(int(stats_b.positive.sum()), 1):.2e}); max |Δp| = {float((p_c - p_b).abs().max()):.2e}")
    from langneurons.identify import identify

    maps = [identify(s, top_rate=0.01) for s in (stats_b, stats_c)]
    same = torch.equal(maps[0].selected, maps[1].selected) and torch.equal(maps[0].classes, maps[1].classes)
    print(f"identified neurons (entropy-lambda, top 1%): identical: {same} "
          f"(selected {int(maps[0].selected.sum())} vs {int(maps[1].selected.sum())})")

    # generation speed: batched vs one prompt at a time (same prompts, same greedy answers)
    messages = [q.question for lang in langs for q in questions[lang]]
    one, t_one = timed(lambda: generate(loaded.model, loaded.tokenizer, messages, dec, batch_size=1))
    batched, t_batched = timed(lambda: generate(loaded.model, loaded.tokenizer, messages, dec))
    n_one, n_b = sum(g.num_tokens for g in one), sum(g.num_tokens for g in batched)
    same_answers = [g.token_ids for g in one] == [g.token_ids for g in batched]
    print(f"\ngeneration: batched ({args.batch_size}) {n_b / t_batched:,.1f} tok/s, one at a time "
          f"{n_one / t_one:,.1f} tok/s: {(n_b / t_batched) / (n_one / t_one):.2f}x; same answers: {same_answers}")


if __name__ == "__main__":
    main()
