"""`langneurons run` end to end on a tiny model: artifacts, resume, and stage freshness."""

from __future__ import annotations

import pytest

from langneurons.cli import main
from langneurons.neurons import NeuronMap
from helpers import write_sample_corpus
from tiny import save_tiny


@pytest.fixture()
def setup(tmp_path):
    return save_tiny(tmp_path / "model", "llama"), write_sample_corpus(tmp_path / "corpus"), tmp_path / "run"


def run(model, corpus, out, *extra):
    main(["run", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--control", "none",
          "--bootstrap", "0", "--top-rate", "0.1", *extra])


def test_run_writes_everything_and_resumes(setup, capsys):
    model, corpus, out = setup
    run(model, corpus, out)
    for name in ("manifest.json", "neurons.safetensors", "anatomy.json", "ablation.parquet", "report.html",
                 "eval_corpus.jsonl"):
        assert (out / name).exists(), name
    assert "report:" in capsys.readouterr().out
    run(model, corpus, out)
    text = capsys.readouterr().out
    assert "[identify] up to date, skipped" in text and "[ablate] up to date, skipped" in text


def test_a_hand_made_neuron_map_is_not_taken_as_up_to_date(setup, capsys):
    model, corpus, out = setup
    run(model, corpus, out)
    main(["identify", str(out), "--top-rate", "0.2", "--langs", "en,de,zh"])
    capsys.readouterr()
    run(model, corpus, out)
    text = capsys.readouterr().out
    assert "[identify] up to date" not in text  # re-identified with the run's settings
    # the re-made map is byte-identical to the one the ablation was computed with: that stays valid
    assert "[ablate] up to date, skipped" in text
    nmap = NeuronMap.load(out)
    assert nmap.meta["params"]["top_rate"] == 0.1 and nmap.languages == ["de", "en", "ru", "zh"]


def test_changed_record_settings_rerecord_instead_of_failing(setup, capsys):
    model, corpus, out = setup
    run(model, corpus, out)
    run(model, corpus, out, "--max-tokens-per-lang", "20")
    text = capsys.readouterr().out
    assert "[identify] up to date" not in text
    from langneurons.stats import ActivationStats

    stats = ActivationStats.load(out)
    assert stats.meta["record_config"]["max_tokens_per_lang"] == 20 and int(stats.tokens.max()) < 60
