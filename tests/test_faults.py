"""Faults and bad input: a SIGKILLed recording resumes to identical counts, damaged artifacts
are reported by file name and never re-used, results do not depend on the batch size, and
every kind of bad input gives one clear line (CLI: exit code 2, ``error: ...``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli_error
import torch

from langneurons.arch import locate_activations
from langneurons.cli import main
from langneurons.corpus import Corpus, Example, load_corpus
from langneurons.errors import ArchitectureError, LangNeuronsError, NeuronMapError, StatsError
from langneurons.models import load_model
from langneurons.neurons import NeuronMap
from langneurons.record import RecordConfig, Recorder, record
from langneurons.stats import ActivationStats, LanguageStats
from tiny import SAMPLE_TEXTS, make_model, make_tokenizer, save_tiny


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("faults") / "model", "llama")


def write_corpus(root: Path, docs: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for lang, texts in docs.items():
        (root / f"{lang}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return root


def test_sigkill_mid_language_resumes_to_identical_counts(model_dir, tmp_path):
    words = [w for ts in SAMPLE_TEXTS.values() for t in ts for w in t.split()]
    en = [" ".join(words[(7 * i) % len(words):][: 3 + i % 9]) or "x" for i in range(150)]
    corpus_dir = write_corpus(tmp_path / "corpus", {"de": SAMPLE_TEXTS["de"], "en": en})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "langneurons", "record", "--model", str(model_dir), "--corpus", str(corpus_dir),
           "--out", str(run), "--batch-size", "1", "--flush-every", "1"]
    partial = run / "stats" / ".partial" / "en.safetensors"
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not partial.exists():
                assert proc.poll() is None, "the run ended before its first flush: " + \
                    (tmp_path / "first.err").read_text()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "stats" / "de.safetensors").exists()
    assert not (run / "stats" / "en.safetensors").exists(), "killed too late: en had finished"
    flushed = LanguageStats.load(partial)
    done = flushed.meta["batches_done"]
    assert 0 < done < len(en)

    resumed = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"en: resuming after batch {done} of {len(en)}" in resumed.stderr
    assert "de: already recorded" in resumed.stderr
    partial_dir = run / "stats" / ".partial"  # partial files and killed writes' temporaries gone
    assert not partial_dir.exists(), (sorted(p.name for p in partial_dir.iterdir()), resumed.stderr[-2000:])

    loaded = load_model(model_dir, device="cpu")
    # counts do not depend on the batch size (test_same_inputs_same_stats_whatever_the_batch_size)
    ref = record(loaded.model, loaded.tokenizer, load_corpus(corpus_dir), tmp_path / "ref",
                 RecordConfig(batch_size=16, flush_every=0), progress=False)
    got = ActivationStats.load(run)
    assert torch.equal(got.positive, ref.positive) and torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.sums, ref.sums, rtol=1e-6, atol=1e-4)  # fp32 activations, other batches


# -- damaged artifacts ---------------------------------------------------------------------------


def texts(langs=("en", "de")) -> Corpus:
    return Corpus({lang: [Example(lang, text=t) for t in SAMPLE_TEXTS[lang]] for lang in langs})


def flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_stats_files_are_named_and_never_reused(llama, tokenizer, tmp_path, capsys):
    run = tmp_path / "run"
    record(llama, tokenizer, texts(), run, RecordConfig(), progress=False)
    de = run / "stats" / "de.safetensors"
    good = de.read_bytes()
    flip_byte(de)  # one bit of the tensor data
    with pytest.raises(StatsError, match=r"de\.safetensors is corrupt.*manifest"):
        ActivationStats.load(run)
    with pytest.raises(StatsError, match=r"de\.safetensors is corrupt.*--force"):
        record(llama, tokenizer, texts(), run, RecordConfig(), progress=False)  # resume refuses it
    # Without manifest.json (lost, or a stats dir copied alone) the file's own content hash still catches it.
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").unlink()
    with pytest.raises(StatsError, match=r"de\.safetensors is corrupt \(its content hash"):
        ActivationStats.load(run / "stats", ["en", "de"])
    de.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(StatsError, match=r"de\.safetensors is unreadable or truncated"):
        ActivationStats.load(run / "stats", ["en", "de"])
    de.write_bytes(good)
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert ActivationStats.load(run).languages == ["en", "de"]
    # counts that are impossible (positive > tokens) are refused even with a valid hash
    bad = LanguageStats.load(de)
    bad.positive[0, 0] = bad.tokens + 1
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(StatsError, match=r"bad\.safetensors: some neuron is positive on more tokens"):
        LanguageStats.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("content", ["{\"languages\": [\"en\", \"de\"], \"checks", "null", "[1, 2]"])
def test_damaged_manifest_is_named(llama, tokenizer, tmp_path, content, capsys):
    run = tmp_path / "run"
    record(llama, tokenizer, texts(), run, RecordConfig(), progress=False)
    (run / "manifest.json").write_text(content)
    with pytest.raises(StatsError, match=r"manifest\.json"):
        ActivationStats.load(run)
    with pytest.raises(StatsError, match=r"manifest\.json"):
        record(llama, tokenizer, texts(), run, RecordConfig(), progress=False)
    err = cli_error(["identify", str(run)], capsys)
    assert "manifest.json" in err


def _interrupted(model, tokenizer, corpus, run, cfg, monkeypatch, after=3) -> Path:
    body = Recorder(model, tokenizer, cfg).body
    real = type(body).forward
    seen = {"n": 0}

    def dying(self, *a, **k):
        seen["n"] += 1
        if seen["n"] > after:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(type(body), "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        record(model, tokenizer, corpus, run, cfg, progress=False)
    monkeypatch.setattr(type(body), "forward", real)
    partial = run / "stats" / ".partial" / "en.safetensors"
    assert partial.exists()
    return partial


@pytest.mark.parametrize("damage", ["garbage", "bitflip", "truncated", "other-settings", "other-corpus"])
def test_damaged_or_foreign_partial_is_warned_and_language_starts_over(llama, tokenizer, tmp_path, monkeypatch,
                                                                       damage):
    en = [Example("en", text=t) for ts in SAMPLE_TEXTS.values() for t in ts]
    corpus = Corpus({"en": en})
    cfg = RecordConfig(batch_size=2, flush_every=1)
    ref = record(llama, tokenizer, corpus, tmp_path / "ref", cfg, progress=False)
    partial = _interrupted(llama, tokenizer, corpus, tmp_path / "run", cfg, monkeypatch)
    # plant +1 so that re-using this partial would show in the result
    p = LanguageStats.load(partial)
    LanguageStats("en", p.positive + 1, p.tokens + 1, p.sums, p.meta).save(partial)
    if damage == "garbage":
        partial.write_bytes(b"not safetensors at all")
    elif damage == "bitflip":
        flip_byte(partial)
    elif damage == "truncated":
        partial.write_bytes(partial.read_bytes()[:-9])
    elif damage == "other-settings":
        cfg = RecordConfig(batch_size=3, flush_every=1)  # different batches: the flushed count is meaningless
    elif damage == "other-corpus":
        corpus = Corpus({"en": en[::-1]})  # same lengths multiset, other order
    with pytest.warns(UserWarning, match=r"en: .*(ignoring partial counts|other settings).*starting this language over") as w:
        got = record(llama, tokenizer, corpus, tmp_path / "run", cfg, progress=False)
    if damage in ("garbage", "bitflip", "truncated"):
        assert any("en.safetensors" in str(x.message) for x in w)
    assert torch.equal(got.positive, ref.positive) and torch.equal(got.tokens, ref.tokens)
    assert not partial.exists()


# -- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("qwen3", torch.float32)])
def test_same_inputs_same_stats_whatever_the_batch_size(family, dtype, tokenizer, tmp_path):
    """Extends test_record's fp32 check to bf16 and to the response scope."""
    model = make_model(family, vocab_size=len(tokenizer)).to(dtype)
    langs = ("en", "zh")
    pairs = {lang: [Example(lang, prompt=SAMPLE_TEXTS[lang][i], response=SAMPLE_TEXTS[lang][(i + 1) % 4])
                    for i in range(4)] for lang in langs}
    for scope, corpus in (("all", texts(langs)), ("response", Corpus(pairs))):
        runs = [record(model, tokenizer, corpus, tmp_path / f"{scope}{bs}", RecordConfig(scope=scope, batch_size=bs),
                       progress=False) for bs in (1, 3)]
        again = record(model, tokenizer, corpus, tmp_path / f"{scope}again", RecordConfig(scope=scope, batch_size=3),
                       progress=False)
        for r in runs[1:]:
            assert torch.equal(r.positive, runs[0].positive) and torch.equal(r.tokens, runs[0].tokens)
            torch.testing.assert_close(r.sums, runs[0].sums, rtol=1e-5, atol=1e-3)
        assert torch.equal(again.sums, runs[1].sums)  # same batch size: bit-identical, sums included
        assert runs[0].meta["dtype"] == str(dtype).removeprefix("torch.")


# -- bad input: one clear line each ---------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """For input errors that must be caught before a (possibly 70B) model is loaded."""
    import langneurons.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))


def record_argv(corpus: Path, out: Path, *extra: str, model: str = "unused") -> list[str]:
    return ["record", "--model", model, "--corpus", str(corpus), "--out", str(out), *extra]


def test_unknown_architecture(tmp_path, capsys):
    import transformers

    tok = make_tokenizer()
    cfg = transformers.GPTJConfig(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256,
                                  n_inner=48, bos_token_id=1, eos_token_id=2)
    gptj = transformers.AutoModelForCausalLM.from_config(cfg)
    gptj.save_pretrained(tmp_path / "gptj")
    tok.save_pretrained(tmp_path / "gptj")
    corpus = write_corpus(tmp_path / "c", {"en": SAMPLE_TEXTS["en"]})
    err = cli_error(record_argv(corpus, tmp_path / "r", model=str(tmp_path / "gptj")), capsys)
    assert "unsupported architecture 'gptj'" in err and "--mlp-act-path" in err and "llama" in err
    # ... and the way out that the message names works
    main(record_argv(corpus, tmp_path / "r", "--mlp-act-path", "transformer.h.{i}.mlp.act", model=str(tmp_path / "gptj")))
    s = ActivationStats.load(tmp_path / "r")
    assert s.num_layers == 2 and s.num_neurons == 48 and int(s.tokens[0]) > 0


def test_missing_model_path(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", {"en": SAMPLE_TEXTS["en"]})
    err = cli_error(record_argv(corpus, tmp_path / "r", model=str(tmp_path / "no" / "such-model")), capsys)
    assert "such-model" in err
    assert not (tmp_path / "r").exists()


def test_tokenizer_without_pad_token_pads_with_eos(model_dir, tmp_path, capsys):
    tok = make_tokenizer()
    tok.pad_token = None
    nopad = tmp_path / "nopad"
    load_model(model_dir, device="cpu").model.save_pretrained(nopad)
    tok.save_pretrained(nopad)
    corpus = write_corpus(tmp_path / "c", {"en": SAMPLE_TEXTS["en"], "de": SAMPLE_TEXTS["de"]})
    main(record_argv(corpus, tmp_path / "a", "--batch-size", "4", model=str(nopad)))
    main(record_argv(corpus, tmp_path / "b", "--batch-size", "4", model=str(model_dir)))
    a, b = ActivationStats.load(tmp_path / "a"), ActivationStats.load(tmp_path / "b")
    assert torch.equal(a.positive, b.positive) and torch.equal(a.tokens, b.tokens)
    # a tokenizer with neither pad nor eos cannot batch: one line, not a crash inside torch
    bare = make_tokenizer()
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(LangNeuronsError, match="neither a pad nor an eos token"):
        Recorder(load_model(model_dir, device="cpu").model, bare)


def test_empty_corpus_or_language(tmp_path, capsys, no_model_load):
    (tmp_path / "empty").mkdir()
    assert "holds no <lang>.txt" in cli_error(record_argv(tmp_path / "empty", tmp_path / "r"), capsys)
    c = write_corpus(tmp_path / "c", {"en": SAMPLE_TEXTS["en"], "de": ["", "   "]})
    assert "language 'de' has no documents" in cli_error(record_argv(c, tmp_path / "r"), capsys)
    assert "languages fr are not in the corpus" in cli_error(record_argv(c, tmp_path / "r", "--langs", "en,fr"), capsys)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "is empty" in cli_error(record_argv(tmp_path / "blank.jsonl", tmp_path / "r"), capsys)


def test_mixed_up_columns(tmp_path, capsys, no_model_load):
    def jsonl(name: str, *records: dict) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        return path

    f = jsonl("a.jsonl", {"lang": "en", "prompt": "Hi?", "response": "Hello."}, {"lang": "en", "prompt": "Why?"})
    err = cli_error(record_argv(f, tmp_path / "r", "--scope", "response"), capsys)
    assert "a.jsonl:2: has 'prompt' but no 'response'" in err and "--response-column" in err
    # language and text columns swapped
    f = jsonl("b.jsonl", {"lang": "The cat sat on the mat.", "text": "en"})
    err = cli_error(record_argv(f, tmp_path / "r"), capsys)
    assert "b.jsonl:1: 'lang' value 'The cat sat on the mat.' is not a language code" in err and "mixed up" in err
    f = jsonl("b2.jsonl", {"language": 17, "text": "Hello."})
    assert "'language' value '17' is not a language code" in cli_error(
        record_argv(f, tmp_path / "r", "--lang-column", "language"), capsys)
    # a text column that is not there
    f = jsonl("c.jsonl", {"lang": "en", "text": "Hello."})
    assert "c.jsonl:1: no text column 'sentence'" in cli_error(
        record_argv(f, tmp_path / "r", "--text-column", "sentence"), capsys)
    # the response scope on plain texts is refused before the model is loaded
    err = cli_error(record_argv(f, tmp_path / "r", "--scope", "response"), capsys)
    assert "needs prompt/response pairs" in err and "--scope all" in err
    # texts and pairs mixed in one language
    f = jsonl("d.jsonl", {"lang": "en", "text": "Hello."}, {"lang": "en", "prompt": "Hi?", "response": "Yo."})
    err = cli_error(record_argv(f, tmp_path / "r"), capsys)
    assert "mixes plain texts (" in err and "d.jsonl:1" in err and "d.jsonl:2" in err


def test_text_column_picks_a_column_of_a_pairs_file(tmp_path):
    """--text-column prompt on a pairs file reads the prompts as texts (scope all), rather than
    silently reading prompt+response."""
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"lang": "en", "prompt": "Hi?", "response": "Hello."}) + "\n")
    from langneurons.corpus import ColumnMap

    (ex,) = load_corpus(f, kind="text", columns=ColumnMap(text="prompt")).by_lang["en"]
    assert ex.text == "Hi?" and not ex.is_pair
    (ex,) = load_corpus(f, kind="qa").by_lang["en"]
    assert ex.is_pair and ex.response == "Hello."


def test_non_utf8_text(tmp_path, capsys, no_model_load):
    c = tmp_path / "c"
    c.mkdir()
    (c / "en.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    assert cli_error(record_argv(c, tmp_path / "r"), capsys).endswith(
        "en.txt:3: not valid UTF-8 (byte 0xff); re-encode the file as UTF-8")
    (c / "en.txt").unlink()
    (c / "en.jsonl").write_text('{"text": "ok"}\n{"text": "lone \\ud800 surrogate"}\n')
    assert "en.jsonl:2: 'text' holds an unpaired surrogate" in cli_error(record_argv(c, tmp_path / "r"), capsys)


def test_responses_that_tokenize_to_nothing(model_dir, llama, tokenizer, tmp_path, capsys):
    full = [Example("en", prompt=p, response=r) for p, r in [("Hi?", "Hello there."), ("Why?", "Because.")]]
    empty = [Example("en", prompt="And?", response="")]
    cfg = RecordConfig(scope="response")
    with pytest.warns(UserWarning, match="en: 1 example.* had responses that tokenize to no counted token"):
        got = record(llama, tokenizer, Corpus({"en": full + empty}), tmp_path / "a", cfg, progress=False)
    ref = record(llama, tokenizer, Corpus({"en": full}), tmp_path / "b", cfg, progress=False)
    assert torch.equal(got.positive, ref.positive) and torch.equal(got.tokens, ref.tokens)
    # all empty: an error, and no zero-token stats file
    qa = tmp_path / "qa"
    qa.mkdir()
    (qa / "de.jsonl").write_text(json.dumps({"prompt": "Was?", "response": ""}) + "\n"
                                 + json.dumps({"prompt": "Wie?", "response": ""}) + "\n")
    (qa / "en.jsonl").write_text(json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")
    err = cli_error(record_argv(qa, tmp_path / "r", "--scope", "response", model=str(model_dir)), capsys)
    assert err == ("error: de: none of its 2 example(s) has a token to count (the responses tokenize to nothing); "
                   "give that language real text or drop it with --langs")
    assert not (tmp_path / "r" / "stats" / "de.safetensors").exists()


def test_sequences_longer_than_the_context_are_truncated(model_dir, tmp_path, capsys):
    long_doc = " ".join(SAMPLE_TEXTS["en"] * 40)  # far more than the tiny model's 256 positions
    c = write_corpus(tmp_path / "c", {"en": [long_doc, SAMPLE_TEXTS["en"][0]]})
    capsys.readouterr()
    main(record_argv(c, tmp_path / "r", model=str(model_dir)))
    err = capsys.readouterr().err
    assert ("warning: en: 1 example(s) were longer than 256 tokens and were truncated to their first tokens "
            "(pass --max-length to change the limit)") in err
    tok = make_tokenizer()
    short = len(tok(SAMPLE_TEXTS["en"][0])["input_ids"]) - 1
    assert int(ActivationStats.load(tmp_path / "r").tokens[0]) == 255 + short  # 256 positions minus BOS
    err = cli_error(record_argv(c, tmp_path / "r2", "--max-length", "1000", model=str(model_dir)), capsys)
    assert "--max-length 1000 exceeds the model's context of 256 tokens" in err


def test_merge_of_other_models_or_scopes_is_refused(llama, tokenizer, tmp_path, capsys):
    pairs = Corpus({"en": [Example("en", prompt="Hi?", response="Hello there.")]})
    record(llama, tokenizer, texts(("en",)), tmp_path / "all", RecordConfig(), progress=False)
    record(llama, tokenizer, pairs, tmp_path / "resp", RecordConfig(scope="response"), progress=False)
    err = cli_error(["merge", str(tmp_path / "all"), str(tmp_path / "resp"), "--out", str(tmp_path / "m")], capsys)
    assert "'scope' differs" in err
    other = make_model("llama", seed=1, vocab_size=len(tokenizer))
    record(other, tokenizer, texts(("en",)), tmp_path / "other", RecordConfig(), progress=False)
    err = cli_error(["merge", str(tmp_path / "all"), str(tmp_path / "other"), "--out", str(tmp_path / "m")], capsys)
    assert "'model_fingerprint' differs" in err
    assert not (tmp_path / "m").exists()


def test_neuron_map_of_another_shape(llama):
    from langneurons.intervene import deactivate

    nmap = NeuronMap(languages=["en", "de"], classes=torch.ones(3, 48, dtype=torch.int8),
                     active=torch.zeros(2, 3, 48, dtype=torch.bool), selected=torch.ones(3, 48, dtype=torch.bool))
    sites = locate_activations(llama)
    with pytest.raises(NeuronMapError) as exc:
        nmap.check_fits(sites.num_layers, sites.num_neurons)
    assert "\n" not in str(exc.value) and "3 layers x 48 neurons" in str(exc.value) and "2 x 48" in str(exc.value)
    with pytest.raises(ArchitectureError, match="another model"):
        sites.check_mask_shape(nmap.num_layers, nmap.num_neurons)
    with pytest.raises(NeuronMapError, match="another model"):
        with deactivate(llama, nmap.class_mask(["specific"])):
            pass


def test_fewer_than_two_languages(llama, tokenizer, tmp_path, capsys):
    record(llama, tokenizer, texts(("en",)), tmp_path / "one", RecordConfig(), progress=False)
    err = cli_error(["identify", str(tmp_path / "one")], capsys)
    assert "at least 2 languages" in err


@pytest.mark.parametrize("option,message", [
    (["--shard", "2/2"], "--shard 2/2: need 0 <= i < n"),
    (["--shard", "half"], "--shard must look like i/n"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--flush-every", "-1"], "--flush-every must be >= 0"),
    (["--max-tokens-per-lang", "0"], "--max-tokens-per-lang must be >= 1"),
    (["--scope", "prompt"], "--scope must be 'all' or 'response'"),
])
def test_bad_record_options(option, message, tmp_path, capsys, no_model_load):
    c = write_corpus(tmp_path / "c", {"en": SAMPLE_TEXTS["en"]})
    assert message in cli_error(record_argv(c, tmp_path / "r", *option), capsys)


def test_out_is_a_file_and_disk_full_are_one_line(model_dir, tmp_path, capsys, monkeypatch, caplog):
    from langneurons.runs import RunDir

    c = write_corpus(tmp_path / "c", {"de": SAMPLE_TEXTS["de"], "en": SAMPLE_TEXTS["en"]})
    (tmp_path / "file").write_text("x")
    assert "--out" in cli_error(record_argv(c, tmp_path / "file", model=str(model_dir)), capsys)
    real = RunDir.write_language_stats

    def full_disk(self, part):
        if part.lang == "en":
            raise OSError(28, "No space left on device")
        return real(self, part)

    monkeypatch.setattr(RunDir, "write_language_stats", full_disk)
    err = cli_error(record_argv(c, tmp_path / "r", model=str(model_dir)), capsys)
    assert "cannot write" in err and "en.safetensors" in err and "No space left on device" in err
    monkeypatch.setattr(RunDir, "write_language_stats", real)
    caplog.set_level("INFO", logger="langneurons.record")
    main(record_argv(c, tmp_path / "r", model=str(model_dir)))  # the rerun keeps de and records en
    assert "de: already recorded" in caplog.text
    assert ActivationStats.load(tmp_path / "r").languages == ["de", "en"]


def test_a_finished_record_leaves_only_other_languages_partials(tmp_path):
    """After a successful record, .partial/ keeps only partial counts of languages that were not
    recorded now (a later run may resume them); temporaries and anything else go."""
    from langneurons.record import _remove_leftovers  # noqa: PLC2701 - the cleanup itself

    d = tmp_path / "stats" / ".partial"
    d.mkdir(parents=True)
    names = ["en.safetensors", "en.rank1.safetensors", ".en.safetensors.abc.tmp", "fr.safetensors",
             "fr.rank0.safetensors", "stray.bin"]
    for n in names:
        (d / n).write_bytes(b"x")
    (tmp_path / "stats" / ".de.safetensors.x1.tmp").write_bytes(b"x")
    _remove_leftovers(tmp_path / "stats", ["en", "de"])
    assert sorted(p.name for p in d.iterdir()) == ["fr.rank0.safetensors", "fr.safetensors"]
    assert not (tmp_path / "stats" / ".de.safetensors.x1.tmp").exists()
    for p in list(d.iterdir()):
        p.unlink()
    _remove_leftovers(tmp_path / "stats", ["en"])
    assert not d.exists()
