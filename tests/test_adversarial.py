"""The adversarial probe's catalogue (issue 19): what a hostile or careless user tries, the
exit code the CLI must give and the one line it must print.

Every case builds its inputs from scratch in a temporary directory (synthetic counts, no model:
`langneurons.models.load_model` fails the test if a case reaches it), runs
`langneurons.cli.main` in-process and checks: the exit code, that stderr holds exactly one
message line (warnings and progress bars aside) starting with the expected prefix and
containing the expected words, and no traceback. Some cases also check that nothing was
written (``after``).
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from helpers import message_lines, run_cli
import torch
from safetensors.torch import save_file

from langneurons.cli import main
from langneurons.stats import ActivationStats

LANGS = ("en", "de", "zh")
L, N = 8, 32


# -- builders --------------------------------------------------------------------------------
def synthetic_run(run: Path, langs=LANGS, tokens: int = 2000, seed: int = 0) -> Path:
    """A run directory with random (but valid) counts: enough for identify/anatomy/report."""
    g = torch.Generator().manual_seed(seed)
    positive = torch.randint(0, tokens, (len(langs), L, N), generator=g, dtype=torch.int64)
    stats = ActivationStats(list(langs), positive, torch.full((len(langs),), tokens, dtype=torch.int64), None,
                            {"model": "tiny", "model_fingerprint": "fp-tiny", "scope": "all", "dtype": "float32"})
    stats.save(run, extra_manifest={"model": {"model": "tiny", "model_fingerprint": "fp-tiny"}})
    return run


def identified_run(run: Path) -> Path:
    synthetic_run(run)
    main(["identify", str(run), "--lambda", "0.1", "--top-rate", "0.05"])
    return run


def forge_stats(path: Path, lang: str, tokens: int = 100) -> Path:
    """A stats file written around `LanguageStats.save` (which refuses bad names), as an attacker would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"lang": lang, "tokens": tokens, "model_fingerprint": "fp-tiny", "scope": "all"}
    save_file({"positive": torch.zeros(L, N, dtype=torch.int64), "tokens": torch.tensor(tokens)}, str(path),
              metadata={"langneurons": json.dumps(meta)})
    return path


def text_corpus(root: Path, files: dict[str, bytes | str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else content
        (root / name).write_bytes(data)
    return root


EN = "The cat sat on the mat.\nWe walked to the market.\n"
DE = "Die Katze saß auf der Matte.\nWir gingen zum Markt.\n"


class Evil:
    """Pickled by `torch.save`: `torch.load(weights_only=True)` must refuse it."""

    def __reduce__(self):  # noqa: D105
        return (print, ("pwned",))


def lape_file(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def corrupt_map(run: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite neurons.safetensors with edited tensors (metadata kept), bypassing NeuronMap.save."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = run / "neurons.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _flip_specific_to_unselected(t: dict) -> None:
    idx = (t["classes"].reshape(-1) == 1).nonzero().flatten()[0]
    t["selected"].view(-1)[idx] = False


def _class_out_of_range(t: dict) -> None:
    t["classes"].view(-1)[0] = 9


def _active_wrong_shape(t: dict) -> None:
    t["active"] = torch.zeros(len(LANGS), L, N + 1, dtype=torch.bool)


def _scores_nan(t: dict) -> None:
    t["scores"].view(-1)[3] = float("nan")


# -- the catalogue -----------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    setup: Callable[[Path, pytest.MonkeyPatch], list[str]]  # tmp, monkeypatch -> argv
    code: int
    prefix: str
    says: tuple[str, ...] = ()
    never: tuple[str, ...] = ("Traceback",)
    after: Callable[[Path], None] | None = None  # checks on the files left behind


def _merge_traversal(tmp: Path, mp) -> list[str]:
    forge_stats(tmp / "shard" / "stats" / "en.safetensors", "../../victim/model")
    (tmp / "victim").mkdir()
    return ["merge", str(tmp / "shard"), "--out", str(tmp / "out")]


def _no_victim(tmp: Path) -> None:
    assert not (tmp / "victim" / "model.safetensors").exists()
    assert not list((tmp / "out").rglob("*.safetensors")) if (tmp / "out").exists() else True


def _record(corpus: Path, *extra: str) -> list[str]:
    return ["record", "--model", "unused", "--corpus", str(corpus), "--out", str(corpus.parent / "run"), *extra]


def _read_only(tmp: Path, mp) -> list[str]:
    run = identified_run(tmp / "run")
    import langneurons.io as lio

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    mp.setattr(lio.tempfile, "mkstemp", denied)
    return ["anatomy", str(run)]


def _disk_full_identify(tmp: Path, mp) -> list[str]:
    from safetensors import SafetensorError

    import langneurons.neurons as neurons

    run = synthetic_run(tmp / "run")

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a full disk leaves: a partial file
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    mp.setattr(neurons, "save_file", full)
    return ["identify", str(run), "--lambda", "0.1"]


def _nothing_half_written(tmp: Path) -> None:
    run = tmp / "run"
    assert not (run / "neurons.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def _disk_full_anatomy(tmp: Path, mp) -> list[str]:
    run = identified_run(tmp / "run")
    import langneurons.io as lio

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(lio.os, "replace", full)
    return ["anatomy", str(run)]


def _interrupt(tmp: Path, mp) -> list[str]:
    import langneurons.identify as ident

    run = synthetic_run(tmp / "run")

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    mp.setattr(ident, "identify", ctrl_c)
    return ["identify", str(run)]


def _truncated_parquet(tmp: Path, mp) -> list[str]:
    run = identified_run(tmp / "run")
    import pandas as pd

    df = pd.DataFrame({"deactivated_lang": ["en"], "eval_lang": ["en"], "neuron_set": ["specific"],
                       "metric": ["nll"], "delta": [0.5], "base": [1.0], "ablated": [1.5]})
    df.to_parquet(run / "ablation.parquet")
    data = (run / "ablation.parquet").read_bytes()
    (run / "ablation.parquet").write_bytes(data[: len(data) // 2])
    return ["report", str(run)]


def _corrupt_map(edit: Callable[[dict], None]) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def setup(tmp: Path, mp) -> list[str]:
        run = identified_run(tmp / "run")
        corrupt_map(run, edit)
        # --accept-edited: even a deliberately edited map must be a valid map (NeuronMap.load)
        return ["anatomy", str(run), "--accept-edited"]
    return setup


def _edited_map(tmp: Path, mp) -> list[str]:
    run = identified_run(tmp / "run")
    corrupt_map(run, _class_out_of_range)
    return ["anatomy", str(run)]


CASES = [
    # 1. every language name that becomes a path goes through one validator
    Case("merge-lang-path-traversal", _merge_traversal, 2, "error:", ("../../victim/model", "not a language code"),
         after=_no_victim),
    Case("merge-lang-dot", lambda t, mp: (forge_stats(t / "s" / "stats" / "en.safetensors", "."),
                                          ["merge", str(t / "s"), "--out", str(t / "o")])[1],
         2, "error:", ("not a language code",)),
    Case("merge-lang-empty", lambda t, mp: (forge_stats(t / "s" / "stats" / "en.safetensors", ""),
                                            ["merge", str(t / "s"), "--out", str(t / "o")])[1],
         2, "error:", ("not a language code",)),
    Case("corpus-file-with-space", lambda t, mp: _record(text_corpus(t / "c", {"fr ench.txt": EN, "en.txt": EN})),
         2, "error:", ("fr ench", "not a language code")),
    Case("corpus-file-cjk-name", lambda t, mp: _record(text_corpus(t / "c", {"日本.txt": EN, "en.txt": EN})),
         2, "error:", ("日本", "not a language code")),
    Case("corpus-file-leading-dash", lambda t, mp: _record(text_corpus(t / "c", {"-x.txt": EN, "en.txt": EN})),
         2, "error:", ("not a language code",)),
    Case("jsonl-lang-path", lambda t, mp: _record(text_corpus(t / "c", {"x.jsonl": '{"lang": "../x", "text": "a"}\n'})
                                                  / "x.jsonl"),
         2, "error:", ("not a language code",)),
    Case("import-lape-cjk-name", lambda t, mp: (lape_file(t / "in" / "日本.pt", {"n": 10, "over_zero": torch.ones(L, N)}),
                                                ["import", str(t / "in"), "--format", "lape", "--out", str(t / "o")])[1],
         2, "error:", ("not a language code",)),
    # 5. λ that overflows the scores
    Case("lambda-1e308", lambda t, mp: ["identify", str(synthetic_run(t / "run")), "--lambda", "1e308"],
         2, "error:", ("--lambda",), after=lambda t: not (t / "run" / "neurons.safetensors").exists() or
         pytest.fail("a neuron map was written")),
    Case("lambda-range-1e308", lambda t, mp: ["identify", str(synthetic_run(t / "run")), "--lambda-range", "0,1e308"],
         2, "error:", ("--lambda-range",)),
    Case("lambda-negative-huge", lambda t, mp: ["identify", str(synthetic_run(t / "run")), "--lambda", "-1e40"],
         2, "error:", ("--lambda",)),
    # 6. text that is not UTF-8 text
    Case("utf16le-without-bom", lambda t, mp: _record(text_corpus(t / "c", {"en.txt": EN, "de.txt": DE.encode("utf-16-le")})),
         2, "error:", ("de.txt", "UTF-16")),
    Case("nul-bytes", lambda t, mp: _record(text_corpus(t / "c", {"en.txt": EN, "de.txt": "Die\x00Katze\nok\n"})),
         2, "error:", ("de.txt:1", "NUL")),
    Case("nul-in-jsonl-string", lambda t, mp: _record(text_corpus(t / "c", {"de.jsonl": '{"text": "a\\u0000b"}\n',
                                                                           "en.txt": EN})),
         2, "error:", ("de.jsonl:1", "NUL")),
    # 7. Ctrl-C
    Case("ctrl-c", _interrupt, 130, "interrupted:"),
    # 8. disk full / read-only run directory
    Case("disk-full-identify-safetensors", _disk_full_identify, 2, "error:", ("neurons.safetensors", "No space left"),
         after=_nothing_half_written),
    Case("disk-full-anatomy", _disk_full_anatomy, 2, "error:", ("anatomy.json", "No space left")),
    Case("read-only-anatomy", _read_only, 2, "error:", ("anatomy.json", "Permission denied")),
    # 9. messages
    Case("pickle-import-lape", lambda t, mp: (lape_file(t / "in" / "en.pt", {"n": 3, "over_zero": Evil()}),
                                              ["import", str(t / "in"), "--format", "lape", "--out", str(t / "o")])[1],
         2, "error:", ("not a tensor file langneurons can load safely",), never=("Traceback", "weights_only", "pwned")),
    Case("pickle-import-neurons", lambda t, mp: (lape_file(t / "m.pth", [[Evil()]]),
                                                 ["import-neurons", str(t / "m.pth"), "--langs", "en",
                                                  "--num-neurons", "4", "--out", str(t / "o")])[1],
         2, "error:", ("not a tensor file langneurons can load safely",), never=("Traceback", "weights_only", "pwned")),
    Case("usage-unknown-option", lambda t, mp: ["run", "--bogus"], 2, "error:", ("--bogus",)),
    Case("usage-missing-argument", lambda t, mp: ["identify"], 2, "error:", ("STATS_OR_RUN_DIR",)),
    Case("usage-bad-number", lambda t, mp: ["identify", "/x", "--top-rate", "abc"], 2, "error:", ("--top-rate", "langneurons identify --help")),
    Case("langs-unknown-lists-available",
         lambda t, mp: _record(text_corpus(t / "c", {"en.txt": EN, "de.txt": DE, "zh.txt": "猫坐在垫子上。\n"}),
                               "--langs", "en,xx"),
         2, "error:", ("xx", "de,en,zh")),
    Case("langs-only-commas", lambda t, mp: _record(text_corpus(t / "c", {"en.txt": EN, "de.txt": DE}), "--langs", ",,"),
         2, "error:", ("',,' names nothing",)),
    Case("identify-langs-only-commas", lambda t, mp: ["identify", str(synthetic_run(t / "run")), "--langs", " , "],
         2, "error:", ("' , ' names nothing",)),
    Case("import-lape-n0", lambda t, mp: (lape_file(t / "in" / "en.pt", {"n": 0, "over_zero": torch.zeros(L, N)}),
                                          lape_file(t / "in" / "de.pt", {"n": 5, "over_zero": torch.zeros(L, N)}),
                                          ["import", str(t / "in"), "--format", "lape", "--out", str(t / "o")])[2],
         2, "error:", ("en.pt", "n = 0")),
    Case("import-lape-negative-n", lambda t, mp: (lape_file(t / "in" / "en.pt", {"n": -4, "over_zero": torch.zeros(L, N)}),
                                                  ["import", str(t / "in"), "--format", "lape", "--out", str(t / "o")])[1],
         2, "error:", ("en.pt",)),
    Case("truncated-ablation-parquet", _truncated_parquet, 2, "error:", ("ablation.parquet",)),
    # 3. a corrupted neuron map is refused on load
    Case("map-class-disagrees-with-selected", _corrupt_map(_flip_specific_to_unselected), 2, "error:",
         ("neurons.safetensors", "class")),
    Case("map-class-code-out-of-range", _corrupt_map(_class_out_of_range), 2, "error:", ("neurons.safetensors",)),
    Case("map-edited-after-identify", _edited_map, 2, "error:", ("neurons.safetensors", "checksum", "--accept-edited")),
    Case("map-active-wrong-shape", _corrupt_map(_active_wrong_shape), 2, "error:", ("neurons.safetensors", "shape")),
    Case("map-scores-nan", _corrupt_map(_scores_nan), 2, "error:", ("neurons.safetensors", "scores")),
]


@pytest.fixture
def no_model(monkeypatch):
    import langneurons.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a case reached load_model"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_probe_case(case: Case, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    argv = case.setup(tmp_path, monkeypatch)
    code, out, err = run_cli([str(a) for a in argv], capsys)
    lines = message_lines(err)
    assert code == case.code, (code, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(case.prefix), lines
    for word in case.says:
        assert word in lines[0], (word, lines[0])
    for word in case.never:
        assert word not in err + out, (word, err)
    if case.after is not None:
        case.after(tmp_path)


def test_catalogue_cases_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


def test_sigint_exits_130_and_keeps_the_resume_state(tmp_path):
    """Ctrl-C of a real `langneurons record` process: exit code 130 (so `record && identify`
    stops), one `interrupted:` line, and the partial counts stay for the rerun to resume."""
    import signal
    import subprocess
    import sys
    import time

    from tiny import SAMPLE_TEXTS, save_tiny

    model_dir = save_tiny(tmp_path / "model", "llama")
    words = [w for ts in SAMPLE_TEXTS.values() for t in ts for w in t.split()]
    en = [" ".join(words[(7 * i) % len(words):][: 3 + i % 9]) or "x" for i in range(400)]
    corpus = text_corpus(tmp_path / "c", {"de.txt": "\n".join(SAMPLE_TEXTS["de"]) + "\n", "en.txt": "\n".join(en) + "\n"})
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "langneurons", "record", "--model", str(model_dir), "--corpus", str(corpus),
           "--out", str(run), "--batch-size", "1", "--flush-every", "1"]
    partial = run / "stats" / ".partial" / "en.safetensors"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not partial.exists():
            assert proc.poll() is None, "the run ended before its first flush"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err[-2000:]
    lines = message_lines(err)
    assert lines and lines[-1].startswith("interrupted:"), lines[-3:]
    assert [x for x in lines if not re.match(r"\s*(en|de):|INFO", x)] == [lines[-1]], lines
    assert "Traceback" not in err
    assert not (run / "stats" / "en.safetensors").exists(), "interrupted too late: en had finished"
    assert partial.exists()


def test_failed_write_keeps_the_old_artifact_and_leaves_no_temporary(tmp_path):
    """`atomic_write` turns OSError and SafetensorError (not an OSError) into one WriteError."""
    from safetensors import SafetensorError

    from langneurons.errors import LangNeuronsError, WriteError
    from langneurons.io import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "a.json", "old\n")

    def full_safetensors(p: Path) -> None:
        p.write_bytes(b"par")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    def full_os(p: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for writer in (full_safetensors, full_os):
        with pytest.raises(WriteError) as exc:
            atomic_write(target, writer)
        assert isinstance(exc.value, LangNeuronsError) and isinstance(exc.value, OSError)
        assert exc.value.errno == errno.ENOSPC and exc.value.strerror == "No space left on device"
        assert str(exc.value).startswith(f"cannot write {target} (No space left on device)")
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(ValueError):  # a bug in the writer is not a disk problem: not converted
        atomic_write(target, lambda p: (_ for _ in ()).throw(ValueError("bug")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("method", ["lape", "entropy-lambda", "imported-lape"])
def test_consistent_maps_of_every_kind_load(method, tmp_path):
    """The invariant check refuses corrupted maps (catalogue above) but none that identify or the
    LAPE importer writes: LAPE's +inf scores of excluded neurons, imported maps without scores."""
    from langneurons.identify import identify
    from langneurons.neurons import NeuronMap, from_lape, to_lape

    stats = ActivationStats.load(synthetic_run(tmp_path / "run"))
    nmap = identify(stats, method="lape" if method == "imported-lape" else method, top_rate=0.05,
                    **({"lam": 0.1} if method == "entropy-lambda" else {}))
    if method == "imported-lape":
        nmap = from_lape(to_lape(nmap, "selected"), nmap.languages, N)
    assert nmap.invariant_violation() is None
    nmap.save(tmp_path / "m.safetensors")
    loaded = NeuronMap.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.classes, nmap.classes) and torch.equal(loaded.active, nmap.active)


@pytest.mark.parametrize("ci,outcome", [("true", "fail"), ("1", "fail"), ("", "skip"), ("false", "skip")])
def test_skips_that_hide_checks_fail_on_ci(monkeypatch, ci, outcome):
    from ci import skip_or_fail

    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="Chromium is missing"):
        skip_or_fail("Chromium is missing")
