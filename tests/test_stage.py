"""The stage layer: one freshness rule, one manifest record per stage, rows merged by key,
safe concurrent manifest writes, and configs that validate themselves."""

from __future__ import annotations

import json
import multiprocessing as mp


import pandas as pd
import pytest

from langneurons.cli import main
from langneurons.config import AblationConfig, IdentifyConfig
from langneurons.errors import LangNeuronsError
from langneurons.pipeline import RunConfig
from langneurons.record import RecordConfig
from langneurons.runs import RunDir
from langneurons.stage import ChecksumError, StageRecord, commit_stage, input_key, is_fresh, verify_inputs
from helpers import write_sample_corpus
from tiny import SAMPLE_TEXTS, save_tiny


# -- the one rule ---------------------------------------------------------------------------------
def test_input_key_is_canonical():
    assert input_key({"a": 1, "b": [1, 2]}) == input_key({"b": (1, 2), "a": 1})
    assert input_key({"a": 1}) != input_key({"a": 1.5})


def test_fresh_needs_same_key_and_intact_outputs(tmp_path):
    run = RunDir(tmp_path)
    out = tmp_path / "thing.txt"
    out.write_text("v1", encoding="utf-8")
    commit_stage(run, "thing", {"x": 1}, [out], {"n": 1}, 0.1, by="test")
    assert is_fresh(run, "thing", {"x": 1})
    assert not is_fresh(run, "thing", {"x": 2})  # other inputs
    out.write_text("v2", encoding="utf-8")  # edited output
    assert not is_fresh(run, "thing", {"x": 1})
    with pytest.raises(ChecksumError, match="--accept-edited"):
        verify_inputs(run, "thing")
    verify_inputs(run, "thing", accept_edited=True)
    out.unlink()  # missing output
    assert not is_fresh(run, "thing", {"x": 1})


def test_a_writer_replaces_its_own_section_whole(tmp_path):
    run = RunDir(tmp_path)
    a = tmp_path / "a"
    a.write_text("a", encoding="utf-8")
    commit_stage(run, "s", {"v": 1}, [a], {"old_only": 1, "shared": 1}, 0.0, by="one")
    commit_stage(run, "s", {"v": 2}, [a], {"shared": 2}, 0.0, by="two")
    rec = run.stage_record("s")
    assert rec.result == {"shared": 2} and rec.by == "two" and rec.inputs == {"v": 2}
    assert StageRecord.from_json(run.read_manifest()["stages"]["s"]) == rec


def _writer(path: str, who: int, n: int) -> None:
    run = RunDir(path)
    for i in range(n):
        if i % 2:
            run.update_manifest({f"section_{who}_{i}": {"i": i}})
        else:
            commit_stage(run, f"stage_{who}_{i}", {"i": i}, [], {"who": who}, 0.0, by=str(who))


def test_concurrent_manifest_writers_lose_nothing(tmp_path):
    n = 30
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), who, n)) for who in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    man = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    for who in range(3):
        for i in range(n):
            if i % 2:
                assert man[f"section_{who}_{i}"] == {"i": i}
            else:
                assert man["stages"][f"stage_{who}_{i}"]["result"] == {"who": who}


# -- configs validate themselves -------------------------------------------------------------------
@pytest.mark.parametrize("make, argv", [
    (lambda out: RunConfig(out=out, top_rate=2.0), ["run", "--top-rate", "2"]),
    (lambda out: RunConfig(out=out, holdout=0.9), ["run", "--holdout", "0.9"]),
    (lambda out: RunConfig(out=out, lam="-1"), ["run", "--lambda", "-1"]),
    (lambda out: RunConfig(out=out, control="bogus"), ["run", "--control", "bogus"]),
    (lambda out: RunConfig(out=out, langs=["en"]), ["run", "--langs", "en"]),
])
def test_bad_config_same_error_from_python_and_cli(tmp_path, capsys, make, argv):
    with pytest.raises(LangNeuronsError) as exc:
        make(tmp_path / "r").validate()
    with pytest.raises(SystemExit) as code:
        main([*argv, "--out", str(tmp_path / "r")])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {exc.value}"]


def test_stage_configs_validate():
    with pytest.raises(LangNeuronsError, match="--top-rate"):
        IdentifyConfig(top_rate=0).validate()
    with pytest.raises(LangNeuronsError, match="--lambda-range"):
        IdentifyConfig(lam_range=(0.3, 0.1)).validate()
    with pytest.raises(LangNeuronsError, match="--metric"):
        AblationConfig(metrics=("acc",)).validate()
    with pytest.raises(LangNeuronsError, match="--math-corpus"):
        AblationConfig(metrics=("nll", "accuracy")).validate()
    with pytest.raises(LangNeuronsError, match="--batch-size"):
        RecordConfig(batch_size=0).validate()
    assert AblationConfig(control="random").validate().control == "layer"  # the pre-0.2 name


# -- rows merged by key ----------------------------------------------------------------------------
@pytest.fixture()
def setup(tmp_path):
    model = save_tiny(tmp_path / "model", "llama")
    corpus = write_sample_corpus(tmp_path / "corpus")
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("Tom has 2 apples and gets 3 more. How many?\t5\n", encoding="utf-8")
    (mgsm / "mgsm_de.tsv").write_text("Tom hat 2 Äpfel und bekommt 3. Wie viele?\t5\n", encoding="utf-8")
    return model, corpus, mgsm, tmp_path / "run"


def _run(model, corpus, out, *extra):
    main(["run", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--control", "none",
          "--bootstrap", "0", "--top-rate", "0.1", "--no-progress", *extra])


def _ablate_accuracy(out, mgsm):
    main(["ablate", str(out), "--classes", "specific", "--metric", "accuracy", "--control", "none",
          "--math-corpus", str(mgsm), "--max-new-tokens", "3", "--no-progress", "--device", "cpu"])


def test_ablate_accuracy_then_run_keeps_the_accuracy_rows(setup, capsys):
    model, corpus, mgsm, out = setup
    _run(model, corpus, out, "--skip-ablation")
    _ablate_accuracy(out, mgsm)
    acc = pd.read_parquet(out / "ablation.parquet")
    assert set(acc.metric) == {"accuracy", "number_accuracy", "language_accuracy"}
    # a perplexity set that `run` does not plan (issue 19, item 2: 90 -> 54 rows in the probe)
    main(["ablate", str(out), "--classes", "related", "--control", "none", "--no-progress", "--device", "cpu"])
    related = pd.read_parquet(out / "ablation.parquet").query("neuron_set == 'related'")
    assert len(related)
    _run(model, corpus, out)
    df = pd.read_parquet(out / "ablation.parquet")
    assert {"nll", "accuracy", "number_accuracy", "language_accuracy"} <= set(df.metric)
    assert len(df.query("neuron_set == 'related'")) == len(related)
    kept = df[df.metric.isin(acc.metric.unique())].sort_values(["metric", "deactivated_lang", "eval_lang"])
    assert kept[["metric", "deactivated_lang", "eval_lang", "base", "ablated"]].reset_index(drop=True).equals(
        acc.sort_values(["metric", "deactivated_lang", "eval_lang"])[
            ["metric", "deactivated_lang", "eval_lang", "base", "ablated"]].reset_index(drop=True))
    rec = RunDir(out).stage_record("ablation")
    assert rec.result["rows"] == len(df) and set(rec.result["metrics"]) >= {"nll", "accuracy"}


def test_run_then_ablate_recomputes_nothing_fresh(setup, capsys):
    model, corpus, mgsm, out = setup
    _run(model, corpus, out)
    before = (out / "ablation.parquet").read_bytes()
    capsys.readouterr()
    main(["ablate", str(out), "--control", "none", "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "[ablate] up to date, skipped" in text
    assert (out / "ablation.parquet").read_bytes() == before
    # a new metric family adds rows and keeps the perplexity rows byte for byte
    _ablate_accuracy(out, mgsm)
    df = pd.read_parquet(out / "ablation.parquet")
    old = pd.read_parquet(__import__("io").BytesIO(before))
    nll_new = df[df.metric == "nll"].drop(columns=[c for c in df.columns if c not in old.columns])
    assert len(nll_new) == len(old[old.metric == "nll"])


def test_run_records_only_the_identification_split(setup):
    """Held-out documents never reach identification (issue 19, item 11)."""
    model, _, _, out = setup
    corpus = out.parent / "unique"
    corpus.mkdir()
    for lang, texts in SAMPLE_TEXTS.items():  # every document distinct, so overlap means leakage
        (corpus / f"{lang}.txt").write_text("\n".join(f"{t} {i}" for i in range(3) for t in texts) + "\n",
                                            encoding="utf-8")
    _run(model, corpus, out, "--skip-ablation")
    run = RunDir(out)
    split = run.stage_result("split")
    from langneurons.corpus import load_corpus
    from langneurons.stats import load_language_stats

    id_corpus, eval_corpus = load_corpus(corpus).split(0.2)
    parts = load_language_stats(out)
    assert [p.lang for p in parts] == id_corpus.languages
    for part in parts:
        assert part.meta["corpus_fingerprint"] == id_corpus.fingerprint(part.lang)
        assert split["identification_corpus"][part.lang] == id_corpus.fingerprint(part.lang)
    recorded = {e.text for exs in id_corpus.by_lang.values() for e in exs}
    held = [json.loads(x)["text"] for x in (out / "eval_corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    assert held and not recorded & set(held)
    assert sum(split["documents"].values()) == len(held)


def test_stability_annotation_keeps_identify_current(setup, capsys):
    model, corpus, _, out = setup
    _run(model, corpus, out, "--skip-ablation")
    from langneurons.confidence import run_stability

    run_stability(out, resamples=3, progress=False)
    capsys.readouterr()
    _run(model, corpus, out, "--skip-ablation")
    assert "[identify] up to date, skipped" in capsys.readouterr().out
    from langneurons.neurons import NeuronMap

    assert "stable_core" in NeuronMap.load(out).extras


def test_edited_artifacts_are_refused_unless_accepted(setup, capsys):
    """Issue 19, item 3: a byte flip in the neuron map or an edited ablation table is never
    analysed or reported as if a stage had made it."""
    model, corpus, _, out = setup
    _run(model, corpus, out)
    capsys.readouterr()
    ablation = out / "ablation.parquet"
    df = pd.read_parquet(ablation)
    df.loc[0, "delta"] = 99.0  # a hand edit
    df.to_parquet(ablation, index=False)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "ablation.parquet" in err[0] and "--accept-edited" in err[0]
    (out / "report.html").unlink()
    main(["report", str(out), "--accept-edited"])  # deliberately edited: rendered as it is
    assert (out / "report.html").is_file()
    # a flipped byte in the neuron map: anatomy refuses
    neurons = out / "neurons.safetensors"
    data = bytearray(neurons.read_bytes())
    data[-3] ^= 0x01
    neurons.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["anatomy", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:")


def test_ablate_refuses_a_map_made_for_another_model(setup, tmp_path, capsys):
    """Issue 19, item 4: a neuron map from another model of the same shape is never used silently."""
    model, corpus, _, out = setup
    _run(model, corpus, out, "--skip-ablation")
    other = save_tiny(tmp_path / "other", "llama", seed=1)  # same family and shape, other weights
    with pytest.raises(SystemExit) as exc:
        main(["ablate", str(out), "--model", str(other), "--control", "layer", "--no-progress", "--device", "cpu"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "another model" in err[0]


def test_ablations_of_other_languages_accumulate(setup, capsys):
    """Rows are replaced by key, not by set: `ablate --langs de,en` then `--langs ru,zh` keeps both."""
    model, corpus, _, out = setup
    _run(model, corpus, out, "--skip-ablation")
    for langs in ("de,en", "ru,zh"):
        main(["ablate", str(out), "--classes", "related", "--control", "none", "--langs", langs, "--metric", "nll",
              "--no-progress", "--device", "cpu"])
    df = pd.read_parquet(out / "ablation.parquet")
    assert set(df[df.neuron_set == "related"].deactivated_lang) == {"de", "en", "ru", "zh"}
    capsys.readouterr()
    main(["ablate", str(out), "--classes", "related", "--control", "none", "--langs", "de,en", "--metric", "nll",
          "--no-progress", "--device", "cpu"])
    assert "[ablate] up to date, skipped" in capsys.readouterr().out
