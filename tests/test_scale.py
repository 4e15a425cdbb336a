"""Scaling past one process: data parallel (2 gloo ranks under torchrun), shard jobs + merge,
and the large-model loading options of `langneurons record`.

Every count is compared with an independent single-process run of the same model and corpus.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import langneurons.record as record_mod
from langneurons.cli import main
from langneurons.corpus import Corpus, Example, load_corpus
from langneurons.errors import StatsError
from langneurons.models import load_model
from langneurons.record import RecordConfig, Recorder, record
from langneurons.stats import ActivationStats, LanguageStats, load_language_stats, merge_runs
from tiny import SAMPLE_TEXTS, dying_forward, save_tiny

LANGS = ("de", "en", "ru", "zh")


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama saved like a real checkpoint, and a corpus of 12 documents per language."""
    root = tmp_path_factory.mktemp("scale")
    model_dir = save_tiny(root / "model", "llama")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    for lang in LANGS:
        docs = [f"{t} ({i})" for i in range(3) for t in SAMPLE_TEXTS[lang]]
        (corpus_dir / f"{lang}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    return model_dir, corpus_dir


@pytest.fixture(scope="module")
def loaded(saved):
    return load_model(saved[0], device="cpu")


@pytest.fixture(scope="module")
def reference(saved, loaded, tmp_path_factory) -> ActivationStats:
    """Uninterrupted single-process run (batch size 3: the DDP run uses 2)."""
    out = tmp_path_factory.mktemp("ref")
    return record(loaded.model, loaded.tokenizer, load_corpus(saved[1]), out, RecordConfig(batch_size=3),
                  model_fingerprint=loaded.fingerprint, progress=False)


def test_ddp_two_gloo_processes_equal_single_process(saved, loaded, reference, tmp_path, monkeypatch):
    """torchrun, 2 CPU ranks on gloo: counts equal the single-process run, and resume works per rank.

    The run directory is prepared so that every branch of the per-language protocol runs:
    de is already recorded (all ranks must skip it: rank 0 decides and broadcasts), ru has a
    flushed partial file of rank 1 whose counts we planted +1 (so resuming from it shows in
    the result), and en has a corrupt partial of rank 0 (warned, started over).
    """
    model_dir, corpus_dir = saved
    corpus = load_corpus(corpus_dir)
    run = tmp_path / "ddp"
    cfg = RecordConfig(batch_size=2, flush_every=1)
    record(loaded.model, loaded.tokenizer, corpus.select(["de"]), run, cfg, model_id=str(model_dir),
           model_fingerprint=loaded.fingerprint, progress=False)
    de_bytes = (run / "stats" / "de.safetensors").read_bytes()

    # Rank 1's partial counts for ru: count as rank 1 of 2 and die after two batches.
    monkeypatch.setattr(record_mod, "_dist", lambda: (1, 2))
    rec = Recorder(loaded.model, loaded.tokenizer, cfg)
    rec.identity = record_mod.partial_identity(loaded.fingerprint, "float32", rec.sites.hook_point)
    real, dying = dying_forward(rec.body, 3, and_after=True)  # calls 3, 4 ... die
    monkeypatch.setattr(type(rec.body), "forward", dying)
    partial_ru = run / "stats" / ".partial" / "ru.rank1.safetensors"
    with pytest.raises(KeyboardInterrupt):
        rec.count(corpus.by_lang["ru"], lang="ru", partial=partial_ru, progress=False)
    monkeypatch.setattr(type(rec.body), "forward", real)
    monkeypatch.undo()
    planted = LanguageStats.load(partial_ru)
    assert planted.meta["batches_done"] == 2 and planted.tokens > 0
    LanguageStats("ru", planted.positive + 1, planted.tokens + 1, planted.sums, planted.meta).save(partial_ru)
    partial_en = run / "stats" / ".partial" / "en.rank0.safetensors"
    partial_en.write_bytes(b"\x00garbage, not a safetensors file")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "langneurons", "record", "--model", str(model_dir), "--corpus", str(corpus_dir),
           "--out", str(run), "--batch-size", "2", "--flush-every", "1"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout

    got = ActivationStats.load(run)
    assert got.languages == list(LANGS) and got.meta["model_fingerprint"] == loaded.fingerprint
    for lang in ("en", "zh"):  # counted from scratch by two ranks
        k = LANGS.index(lang)
        assert torch.equal(got.positive[k], reference.positive[k]), lang
        assert int(got.tokens[k]) == int(reference.tokens[k])
        torch.testing.assert_close(got.sums[k], reference.sums[k], rtol=1e-6, atol=1e-5)  # fp32 activations
    k = LANGS.index("ru")  # rank 1 resumed from its planted partial: exactly +1 everywhere
    assert torch.equal(got.positive[k], reference.positive[k] + 1)
    assert int(got.tokens[k]) == int(reference.tokens[k]) + 1
    assert (run / "stats" / "de.safetensors").read_bytes() == de_bytes  # skipped by both ranks
    assert torch.equal(got.positive[0], reference.positive[0])
    assert "ru: resuming after batch 2" in proc.stderr
    assert "en: ignoring partial counts" in proc.stderr and "en.rank0.safetensors" in proc.stderr
    assert not (run / "stats" / ".partial").exists()
    manifest = (run / "manifest.json").read_text()
    assert '"processes": 2' in manifest


def test_rank_shards_partition_every_language(loaded):
    """Example j goes to rank j mod world: the ranks' shares are disjoint and cover the language
    after the token budget is applied (so a budget means the same thing in DDP)."""
    exs = [Example("en", text=f"{t} {i}") for i in range(5) for t in SAMPLE_TEXTS["en"]]
    cfg = RecordConfig(max_tokens_per_lang=60)
    full = Recorder(loaded.model, loaded.tokenizer, cfg).encode(exs)
    shares = []
    with pytest.MonkeyPatch.context() as mp:
        for rank in range(3):
            mp.setattr(record_mod, "_dist", lambda rank=rank: (rank, 3))
            shares.append(Recorder(loaded.model, loaded.tokenizer, cfg).encode(exs))
    assert sum(len(s) for s in shares) == len(full) < len(exs)
    interleaved = [shares[j % 3][j // 3] for j in range(len(full))]
    assert [e.input_ids for e in interleaved] == [e.input_ids for e in full]


# -- independent shard jobs + merge ----------------------------------------------------------


def _shards(loaded, corpus, root: Path, n: int, which=None) -> list[Path]:
    out = []
    for i in which if which is not None else range(n):
        path = root / f"s{i}of{n}"
        record(loaded.model, loaded.tokenizer, corpus, path, RecordConfig(shard=(i, n)),
               model_fingerprint=loaded.fingerprint, progress=False)
        out.append(path)
    return out


def test_shards_disjoint_complete_and_merged(saved, loaded, reference, tmp_path, capsys):
    corpus = load_corpus(saved[1])
    s0, s1, s2 = _shards(loaded, corpus, tmp_path, 3)
    assert ActivationStats.load(s1).meta["shard"] == "1/3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete: no warning
        full = merge_runs([s2, s0, s1], tmp_path / "m")
    assert torch.equal(full.positive, reference.positive) and torch.equal(full.tokens, reference.tokens)
    assert full.meta["shards"] == [0, 1, 2] and full.meta["num_shards"] == 3 and full.meta["shards_missing"] == []

    # incomplete: a warning naming the missing shard, and the gap is written to the metadata
    with pytest.warns(UserWarning) as caught:
        part = merge_runs([s0, s2], tmp_path / "p")
    assert sorted(str(w.message).split(":")[0] for w in caught) == sorted(LANGS)
    assert all("merged shards 0/3, 2/3 of 3; missing 1/3" in str(w.message) for w in caught)
    assert ActivationStats.load(tmp_path / "p").meta["shards_missing"] == [1]
    # ... and merging the missing shard in later completes it (coverage is read from metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = merge_runs([tmp_path / "p", s1], tmp_path / "p2")
    assert torch.equal(later.positive, reference.positive) and torch.equal(later.tokens, reference.tokens)
    assert (part.tokens < reference.tokens).all()

    # duplicates, mixed n, and a whole run next to a shard of the same corpus are errors
    with pytest.raises(StatsError, match=r"shard 0/3 given twice"):
        merge_runs([s0, s1, s0], tmp_path / "x1")
    with pytest.raises(StatsError, match=r"m already counts the whole corpus.*count its examples twice"):
        merge_runs([tmp_path / "m", s2], tmp_path / "x1b")  # m is complete: it counts everything
    (h0,) = _shards(loaded, corpus.select(["de"]), tmp_path, 2, which=[0])
    with pytest.raises(StatsError, match=r"de: shards of different splits given together \(n = 2, 3\)"):
        merge_runs([s0, h0], tmp_path / "x2")
    whole = tmp_path / "whole"
    record(loaded.model, loaded.tokenizer, corpus.select(["de"]), whole, RecordConfig(),
           model_fingerprint=loaded.fingerprint, progress=False)
    with pytest.raises(StatsError, match="counted twice|count its examples twice"):
        merge_runs([whole, s0], tmp_path / "x3")
    with pytest.raises(StatsError, match="one of the inputs"):
        merge_runs([s0, s1], s0)
    # through the CLI: one line, exit code 2
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(s0), str(s0), "--out", str(tmp_path / "x4")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "given twice" in err[0]
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x4").exists()  # nothing written on error


def test_merge_of_different_corpora_adds_up(loaded, tmp_path):
    """Two disjoint corpora of the same language are simply added (no shard bookkeeping)."""
    a = Corpus({"en": [Example("en", text=t) for t in SAMPLE_TEXTS["en"][:2]]})
    b = Corpus({"en": [Example("en", text=t) for t in SAMPLE_TEXTS["en"][2:]]})
    both = Corpus({"en": [Example("en", text=t) for t in SAMPLE_TEXTS["en"]]})
    for name, c in (("a", a), ("b", b), ("both", both)):
        record(loaded.model, loaded.tokenizer, c, tmp_path / name, RecordConfig(), progress=False)
    merged = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    ref = ActivationStats.load(tmp_path / "both")
    assert torch.equal(merged.positive, ref.positive) and torch.equal(merged.tokens, ref.tokens)
    (en,) = load_language_stats(tmp_path / "m")
    fp_a, fp_b = (load_language_stats(tmp_path / x)[0].meta["corpus_fingerprint"] for x in "ab")
    assert en.meta["corpus_fingerprint"] == "+".join(sorted([fp_a, fp_b])) and "shards" not in en.meta
    with pytest.raises(StatsError, match="twice"):  # the same corpus twice is not
        merge_runs([tmp_path / "a", tmp_path / "a"], tmp_path / "m2")


# -- large-model options ----------------------------------------------------------------------


def test_large_model_options_reach_load_model(saved, loaded, reference, tmp_path, monkeypatch):
    import langneurons.models as models

    seen: dict = {}

    def fake_load_model(name, **kw):
        seen.update(kw, name=name)
        return loaded

    monkeypatch.setattr(models, "load_model", fake_load_model)
    main(["record", "--model", "some/70b", "--corpus", str(saved[1]), "--out", str(tmp_path / "r"),
          "--dtype", "bfloat16", "--device-map", "auto", "--max-memory", "0=20GiB,1=22.5GB,cpu=64GiB"])
    assert seen == {"name": "some/70b", "dtype": "bfloat16", "device": None, "device_map": "auto",
                    "max_memory": {0: "20GiB", 1: "22.5GB", "cpu": "64GiB"}}
    assert torch.equal(ActivationStats.load(tmp_path / "r").positive, reference.positive)


def test_bad_max_memory_and_device_map_under_ddp(saved, tmp_path, monkeypatch, capsys):
    import langneurons.distributed as dist
    import langneurons.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must fail before loading"))
    for bad in ("0=lots", "gpu0=20GiB", "20GiB"):
        with pytest.raises(SystemExit) as exc:
            main(["record", "--corpus", str(saved[1]), "--out", str(tmp_path / "r"), "--max-memory", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --max-memory"), err
    # under torchrun every rank holds a whole model: spreading one over the GPUs makes no sense
    monkeypatch.setattr(dist, "init_from_env", lambda device=None: (0, 2))
    with pytest.raises(SystemExit) as exc:
        main(["record", "--corpus", str(saved[1]), "--out", str(tmp_path / "r"), "--device-map", "auto"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: --device-map/--max-memory spread ONE model")


def test_device_map_auto_on_cpu_with_accelerate(saved, reference, tmp_path):
    """The real pass-through: accelerate places the model (on the CPU here) and counts match."""
    main(["record", "--model", str(saved[0]), "--corpus", str(saved[1]), "--out", str(tmp_path / "r"),
          "--device-map", "auto", "--max-memory", "cpu=2GiB", "--batch-size", "5"])
    got = ActivationStats.load(tmp_path / "r")
    assert torch.equal(got.positive, reference.positive) and torch.equal(got.tokens, reference.tokens)


def test_counting_in_chunks_bounds_memory_and_changes_nothing(saved, loaded, reference, tmp_path, monkeypatch):
    """The hook counts CHUNK_ELEMENTS activations at a time (bounded transient memory on big
    models); with chunks of 2 rows the counts are those of the one-chunk reference."""
    monkeypatch.setattr(record_mod, "CHUNK_ELEMENTS", 100)  # 100 // 48 neurons = 2 rows per chunk
    calls = {"n": 0}
    real_split = torch.Tensor.split

    def counting_split(self, *a, **k):
        parts = real_split(self, *a, **k)
        calls["n"] += len(parts)
        return parts

    monkeypatch.setattr(torch.Tensor, "split", counting_split)
    got = record(loaded.model, loaded.tokenizer, load_corpus(saved[1]), tmp_path, RecordConfig(batch_size=3),
                 model_fingerprint=loaded.fingerprint, progress=False)
    monkeypatch.undo()
    assert calls["n"] >= int(reference.tokens.sum()) // 2 * 2  # really chunked: >= tokens/2 chunks per layer
    assert torch.equal(got.positive, reference.positive) and torch.equal(got.tokens, reference.tokens)
    torch.testing.assert_close(got.sums, reference.sums, rtol=1e-9, atol=1e-9)


COLLECTIVES_SCRIPT = r'''
import sys, torch
from langneurons import distributed
from langneurons.errors import StatsError

rank, world = distributed.init_from_env()
assert world == 2, world
# exact int64 sums beyond float precision (2**53 + 1 would round in a float reduction)
big = torch.tensor([2**53 + rank, -5 * rank, 7], dtype=torch.int64)
(total,) = distributed.all_reduce_sum([big])
assert total.tolist() == [2**54 + 1, -5, 14], total.tolist()
# rank 0 decides; everyone gets its answer (only rank 0 runs the function)
calls = []
assert distributed.agree(lambda: calls.append(rank) or {"skip": True}) == {"skip": True}
assert calls == ([0] if rank == 0 else [])
# an error on rank 0 reaches every rank, with its message, instead of a hang
def broken():
    raise StatsError("stats/en.safetensors is corrupt")
try:
    distributed.agree(broken)
except StatsError as exc:
    print(f"rank {rank}: {exc}", flush=True)
distributed.barrier()
distributed.shutdown()
'''


def test_collectives_agree_and_exact_sums_on_gloo(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: stats/en.safetensors is corrupt" in proc.stdout
