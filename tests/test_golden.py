"""The stage layer changed how a run is bookkept, not what it computes: a run on the tiny model
gives exactly the counts, neuron map and ablation rows recorded before the refactor
(tests/golden/tiny_run.json, written by the pre-refactor code of commit 3e58448)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from langneurons.cli import main
from langneurons.neurons import NeuronMap
from langneurons.stats import ActivationStats
from helpers import write_sample_corpus
from tiny import save_tiny

GOLDEN = json.loads((Path(__file__).parent / "golden" / "tiny_run.json").read_text(encoding="utf-8"))
KEY = ["metric", "neuron_set", "deactivated_lang", "eval_lang", "seed"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    model = save_tiny(tmp / "model", "llama")
    corpus = write_sample_corpus(tmp / "corpus")
    out = tmp / "run"
    main(["run", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--control", "layer",
          "--control-seeds", "0,1", "--bootstrap", "20", "--top-rate", "0.1"])
    return out


def test_counts_unchanged(tiny_run):
    stats = ActivationStats.load(tiny_run)
    assert {lang: int(t) for lang, t in zip(stats.languages, stats.tokens.tolist())} == GOLDEN["tokens"]
    assert stats.positive.tolist() == GOLDEN["positive"]


def test_neuron_map_unchanged(tiny_run):
    nmap = NeuronMap.load(tiny_run)
    assert nmap.meta["tau"] == pytest.approx(GOLDEN["tau"]) and nmap.meta["lambda"] == pytest.approx(GOLDEN["lambda"])
    for name in ("classes", "active", "selected"):
        assert getattr(nmap, name).int().tolist() == GOLDEN["map"][name], name
    assert getattr(nmap, "scores").flatten().tolist() == pytest.approx(
        [x for layer in GOLDEN["map"]["scores"] for x in layer], abs=1e-6)


def _rows(df: pd.DataFrame) -> dict[tuple, dict]:
    out = {}
    for rec in df.to_dict(orient="records"):
        key = tuple(None if (isinstance(rec[k], float) and math.isnan(rec[k])) else rec[k] for k in KEY)
        out[key] = rec
    return out


def test_ablation_rows_unchanged(tiny_run):
    got = _rows(pd.read_parquet(tiny_run / "ablation.parquet"))
    want = _rows(pd.DataFrame(GOLDEN["ablation"]))
    assert set(want) <= set(got)
    for key, w in want.items():
        g = got[key]
        for col in ("base", "ablated", "delta", "n_tokens", "n_neurons", "ci_low", "ci_high"):
            if w.get(col) is None or (isinstance(w[col], float) and math.isnan(w[col])):
                assert g.get(col) is None or (isinstance(g[col], float) and math.isnan(g[col])), (key, col)
            else:
                assert g[col] == pytest.approx(w[col], rel=1e-6, abs=1e-7), (key, col)  # thread-count noise
