"""Base vs aligned comparison (compare.py, report/compare.py, `langneurons compare`).

Every table is checked against an independent computation: Python sets and loops over the
neurons for transitions, overlaps and counts; hand-computed planted maps for the alignment
and metric tables; a brute-force window search for the "mostly in layers a-b" claim; and
`identify` itself (a second code path) for the shared-λ re-identification.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import sys
import types
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from helpers import class_rule, run_cli
import torch

from langneurons.cli import main
from langneurons.compare import (COUNT_CLASSES, OVERLAP_CLASSES, TRANSITION_CLASSES, CompareError, compare_maps,
                                 compare_runs, concentration)
from langneurons.neurons import CLASS_CODE, CLASS_NAMES, NeuronMap
from langneurons.runs import RunDir
from langneurons.stats import ActivationStats

LANGS = ["en", "de", "zh", "ru"]
ENTROPY_META = {"method": "entropy-lambda", "params": {"top_rate": 0.1, "bar": 0.9, "lam": 0.05}, "lambda": 0.05,
                "scope": "all"}


# -- helpers --------------------------------------------------------------------------------------
def classify(active: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes by the documented rule (the shared oracle) and active kept where it is defined."""
    return class_rule(active, selected)


def random_map(langs=LANGS, L=3, N=40, seed=0, p_active=0.3, p_general=0.1, p_sel=0.4, empty=(),
               meta=None) -> NeuronMap:
    g = torch.Generator().manual_seed(seed)
    K = len(langs)
    active = torch.rand(K, L, N, generator=g) < p_active
    for lang in empty:  # a language with no specific/related neurons at all
        active[langs.index(lang)] = False
    active[:, torch.rand(L, N, generator=g) < p_general] = True
    selected = torch.rand(L, N, generator=g) < p_sel
    classes, active = classify(active, selected)
    return NeuronMap(list(langs), classes, active, selected, None, copy.deepcopy(meta or ENTROPY_META))


def planted_map(langs, L, N, neurons) -> NeuronMap:
    """``neurons``: {(layer, neuron): set of languages} of selected neurons."""
    active = torch.zeros(len(langs), L, N, dtype=torch.bool)
    selected = torch.zeros(L, N, dtype=torch.bool)
    for (layer, n), ls in neurons.items():
        selected[layer, n] = True
        for lang in ls:
            active[langs.index(lang), layer, n] = True
    classes, active = classify(active, selected)
    return NeuronMap(list(langs), classes, active, selected, None, copy.deepcopy(ENTROPY_META))


def naive_class(nmap: NeuronMap, layer: int, n: int) -> str:
    name = CLASS_NAMES[int(nmap.classes[layer, n])]
    return name if name in ("specific", "related", "general") else "other"


def naive_set(nmap: NeuronMap, lang: str, classes) -> set:
    k = nmap.languages.index(lang)
    return {(layer, n) for layer in range(nmap.num_layers) for n in range(nmap.num_neurons)
            if CLASS_NAMES[int(nmap.classes[layer, n])] in classes and bool(nmap.active[k, layer, n])}


def permute_languages(nmap: NeuronMap, order) -> NeuronMap:
    idx = [nmap.languages.index(x) for x in order]
    return NeuronMap(list(order), nmap.classes, nmap.active[idx], nmap.selected, nmap.scores, dict(nmap.meta))


def make_run(root: Path, name: str, nmap: NeuronMap, *, scope="all", dtype="float32", hook="mlp.act_fn",
             extra=None) -> Path:
    run = RunDir(root / name)
    run.path.mkdir(parents=True, exist_ok=True)
    nmap.save(run.neurons_path)
    run.update_manifest({"languages": list(nmap.languages),
                         "model": {"model": name, "model_fingerprint": name, "dtype": dtype, "hook_point": hook,
                                   "num_layers": nmap.num_layers, "num_neurons": nmap.num_neurons},
                         "stages": {"record": {"key": "test", "inputs": {}, "outputs": {},
                                               "result": {"scope": scope, "include_special": False}}},
                         **(extra or {})})
    return run.path


# -- tables vs naive computations ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_transition_and_overlap_match_naive_sets(seed):
    a = random_map(seed=seed, p_active=0.15 + 0.1 * seed, empty=("ru",) if seed % 2 else ())
    b = random_map(seed=100 + seed, p_active=0.2, empty=("de",) if seed == 2 else ())
    b = permute_languages(b, ["zh", "ru", "en", "de"])  # aligned by name, not by position
    comp = compare_maps([a, b], ["A", "B"])

    naive = {(x, y): 0 for x in TRANSITION_CLASSES for y in TRANSITION_CLASSES}
    for layer in range(a.num_layers):
        for n in range(a.num_neurons):
            naive[naive_class(a, layer, n), naive_class(b, layer, n)] += 1
    mat = comp.transition_matrix("B")
    for (x, y), count in naive.items():
        assert mat.loc[x, y] == count
    assert int(mat.to_numpy().sum()) == a.num_layers * a.num_neurons

    checked_nan = 0
    for _, row in comp.overlap.iterrows():
        classes = row["class"].split(",")
        sa, sb = naive_set(a, row["language"], classes), naive_set(b, row["language"], classes)
        assert (row["size_a"], row["size_b"]) == (len(sa), len(sb))
        assert row["intersection"] == len(sa & sb) and row["union"] == len(sa | sb)
        if sa:
            assert row["overlap_a"] == pytest.approx(len(sa & sb) / len(sa))
        else:
            assert math.isnan(row["overlap_a"])
            checked_nan += 1
        if sa | sb:
            assert row["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb))
        else:
            assert math.isnan(row["jaccard"])
    assert len(comp.overlap) == len(LANGS) * len(OVERLAP_CLASSES)
    if seed % 2:
        assert checked_nan > 0  # the empty-language case was exercised


def test_layer_counts_appear_and_trajectory_match_naive():
    maps = [random_map(seed=s, p_active=0.25) for s in (1, 2, 3)]
    comp = compare_maps(maps, ["c0", "c1", "c2"])
    for cls in COUNT_CLASSES:
        for layer in range(maps[0].num_layers):
            naive = [sum(CLASS_NAMES[int(m.classes[layer, n])] == cls for n in range(m.num_neurons)) for m in maps]
            row = comp.layer_counts[(comp.layer_counts["class"] == cls) & (comp.layer_counts["layer"] == layer)]
            assert row[["c0", "c1", "c2"]].iloc[0].tolist() == naive
            assert row["delta"].iloc[0] == naive[2] - naive[0]
            for i in range(3):
                t = comp.trajectory[(comp.trajectory["class"] == cls) & (comp.trajectory["layer"] == layer)
                                    & (comp.trajectory["run_index"] == i)]
                assert (t["count"].iloc[0], t["delta"].iloc[0]) == (naive[i], naive[i] - naive[0])
    for i, m in enumerate(maps):
        for count_n in range(len(LANGS) + 1):
            naive = sum(1 for layer in range(m.num_layers) for n in range(m.num_neurons)
                        if m.selected[layer, n] and int(m.active[:, layer, n].sum()) == count_n)
            assert comp.appear.loc[comp.appear["N"] == count_n, f"c{i}"].iloc[0] == naive
    assert (comp.appear["delta"] == comp.appear["c2"] - comp.appear["c0"]).all()
    # transitions and overlaps go from the first run to every later run
    assert set(comp.transition["run_b"]) == {"c1", "c2"} and set(comp.overlap["run_b"]) == {"c1", "c2"}


def test_self_comparison_has_zero_differences_and_full_overlap(tmp_path):
    m = random_map(seed=7, empty=("ru",))
    run = make_run(tmp_path, "same", m)
    with pytest.warns(UserWarning, match="more than once"):
        comp = compare_runs([run, run], trained_langs=["zh"])
    assert comp.labels[0] != comp.labels[1]  # labels made unique
    assert (comp.layer_counts["delta"] == 0).all() and (comp.appear["delta"] == 0).all()
    assert (comp.language_counts["delta"] == 0).all() and (comp.alignment["delta"] == 0).all()
    assert (comp.trajectory["delta"] == 0).all()
    mat = comp.transition_matrix()
    off_diag = mat.to_numpy().sum() - mat.to_numpy().trace()
    assert off_diag == 0
    nonempty = comp.overlap["size_a"] > 0
    assert nonempty.any() and (~nonempty).any()
    assert (comp.overlap.loc[nonempty, ["overlap_a", "jaccard"]] == 1.0).all().all()
    assert comp.overlap.loc[~nonempty, ["overlap_a", "jaccard"]].isna().all().all()
    assert all(v == 0 for v in comp.summary["delta_totals"].values())


def test_concentration_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        L = 1 + trial % 9
        deltas = torch.randint(-5, 6, (L,), generator=g).tolist()
        got = concentration(deltas)
        total = sum(deltas)
        if total == 0:
            assert got is None
            continue
        sign = 1 if total > 0 else -1
        part = [max(sign * d, 0) for d in deltas]
        windows = [(j - i, -sum(part[i:j + 1]), i, j) for i in range(L) for j in range(i, L)
                   if sum(part[i:j + 1]) >= 0.5 * sum(part)]
        _, neg, i, j = min(windows)
        assert (got["start"], got["end"]) == (i, j)
        assert got["share"] == pytest.approx(-neg / sum(part))
        assert got["direction"] == ("gain" if total > 0 else "loss")


# -- spontaneous alignment, metrics, pivot (planted, hand-computed) ----------------------------------
BASE_NEURONS = {(0, 0): {"en"}, (0, 1): {"en"}, (1, 0): {"en"}, (0, 2): {"de"}, (1, 1): {"zh"}, (1, 2): {"zh"},
                (2, 0): {"ru"}, (2, 1): {"ru"}, (2, 2): {"de", "zh"}, (2, 3): {"en", "ru"}}
ALIGNED_NEURONS = {(0, 0): {"en"}, (0, 1): {"en"}, (1, 0): {"en"}, (0, 2): {"de"}, (0, 3): {"de"}, (1, 3): {"de"},
                   (1, 1): {"zh"}, (1, 2): {"zh"}, (1, 4): {"zh"}, (1, 5): {"zh"}, (2, 4): {"zh"}, (2, 0): {"ru"},
                   (2, 2): {"de", "zh"}, (2, 5): {"de", "zh", "ru"}}


def _ablation(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    rows = []
    for (lang, metric), bases in values.items():
        for i, v in enumerate(bases):
            rows.append({"deactivated_lang": LANGS[i % 4], "eval_lang": lang, "neuron_set": "specific",
                         "metric": metric, "base": v, "ablated": v + 1.0, "delta": 1.0, "n_tokens": 10})
    return pd.DataFrame(rows)


def test_alignment_metrics_and_pivot_tables_match_hand_computation(tmp_path):
    a = planted_map(LANGS, 3, 8, BASE_NEURONS)
    b = planted_map(LANGS, 3, 8, ALIGNED_NEURONS)
    run_a = make_run(tmp_path, "base", a)
    run_b = make_run(tmp_path, "aligned", b, extra={"align": {"trained_langs": ["zh", "de"]}})
    _ablation({("en", "nll"): [2.0, 2.0], ("de", "nll"): [3.0], ("zh", "nll"): [4.0, 4.2], ("ru", "nll"): [5.0],
               ("zh", "accuracy"): [0.5]}).to_parquet(RunDir(run_a).ablation_path)
    _ablation({("en", "nll"): [1.9], ("de", "nll"): [2.5, 2.5], ("zh", "nll"): [3.0], ("ru", "nll"): [4.9],
               ("zh", "accuracy"): [0.7], ("zh", "bpb"): [1.0]}).to_parquet(RunDir(run_b).ablation_path)

    comp = compare_runs([run_a, run_b])  # trained languages come from the aligned run's manifest
    assert comp.summary["trained_langs"] == ["zh", "de"] and comp.summary["trained_langs_source"] == "manifest"

    al = comp.alignment.set_index(["class", "language"])["delta"]
    hand = {"specific": {"en": 0, "de": 2, "zh": 3, "ru": -1}, "related": {"en": -1, "de": 1, "zh": 1, "ru": 0}}
    hand["specific,related"] = {x: hand["specific"][x] + hand["related"][x] for x in LANGS}
    for cls, per_lang in hand.items():
        for lang, d in per_lang.items():
            assert al[(cls, lang)] == d, (cls, lang)
    sm = comp.alignment_summary.set_index(["class", "group"])["mean_delta"]
    assert sm[("specific", "trained")] == pytest.approx(2.5) and sm[("specific", "untrained")] == pytest.approx(-0.5)
    assert sm[("related", "trained")] == pytest.approx(1.0) and sm[("related", "untrained")] == pytest.approx(-0.5)
    assert sm[("specific,related", "trained")] == pytest.approx(3.5)
    assert sm[("specific,related", "untrained")] == pytest.approx(-1.0)

    mt = comp.metrics.set_index(["metric", "eval_lang"])
    assert set(mt.index) == {("nll", x) for x in LANGS} | {("accuracy", "zh")}  # bpb only in one run: left out
    assert mt.loc[("nll", "zh"), "value_a"] == pytest.approx(4.1)  # mean over rows of that eval_lang
    assert mt.loc[("nll", "zh"), "delta"] == pytest.approx(-1.1)
    ms = comp.metrics_summary.set_index(["metric", "group"])["mean_delta"]
    assert ms[("nll", "trained")] == pytest.approx((-0.5 - 1.1) / 2)
    assert ms[("nll", "untrained")] == pytest.approx((-0.1 - 0.1) / 2)
    assert ms[("accuracy", "trained")] == pytest.approx(0.2)
    assert ("accuracy", "untrained") not in ms.index  # no untrained language has that metric

    pv = comp.pivot.set_index(["run", "class"])
    assert pv.loc[("base", "specific"), "pivot_count"] == 3
    assert pv.loc[("base", "specific"), "nonpivot_mean"] == pytest.approx((1 + 2 + 2) / 3)
    assert pv.loc[("aligned", "specific"), "nonpivot_mean"] == pytest.approx((3 + 5 + 1) / 3)
    assert pv.loc[("aligned", "related"), "pivot_count"] == 0

    # explicit trained languages override the manifest; unknown ones are noted, not fatal
    comp2 = compare_runs([run_a, run_b], trained_langs=["ru", "fr"])
    sm2 = comp2.alignment_summary.set_index(["class", "group"])["mean_delta"]
    assert sm2[("specific", "trained")] == -1 and sm2[("specific", "untrained")] == pytest.approx(5 / 3)
    assert any("fr" in n for n in comp2.summary["notes"])
    text = " ".join(comp.summary["text"])
    assert "+3.5" in text and "-1.0" in text  # plain-language sentence carries the group means


def test_save_writes_parquet_and_csv_of_every_table(tmp_path):
    comp = compare_maps([random_map(seed=1), random_map(seed=2)], ["A", "B"], trained_langs=["de"])
    comp.save(tmp_path / "out")
    for name, df in comp.tables.items():
        back = pd.read_parquet(tmp_path / "out" / "tables" / f"{name}.parquet")
        pd.testing.assert_frame_equal(back.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)
        csv = pd.read_csv(tmp_path / "out" / "tables" / f"{name}.csv")
        assert len(csv) == len(df) and list(csv.columns) == list(df.columns)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runs"] == ["A", "B"] and summary["delta_totals"] == comp.summary["delta_totals"]


# -- refusals --------------------------------------------------------------------------------------------
def _variant(kind: str, tmp_path: Path) -> tuple[Path, Path, str, list[str]]:
    a = random_map(seed=1)
    b = random_map(seed=2)
    kw_b: dict = {}
    expect = kind
    if kind == "languages":
        b = random_map(["en", "de", "zh", "fr"], seed=2)
        expect = "only in"
    elif kind == "scope":
        kw_b["scope"] = "response"
    elif kind == "shape":
        b = random_map(L=4, seed=2)
    elif kind == "top_rate":
        b.meta["params"]["top_rate"] = 0.02
    elif kind == "bar":
        b.meta["params"]["bar"] = 0.95
    elif kind == "method":
        b.meta.update(method="lape", params={"top_rate": 0.1, "bar": 0.9, "lam": None}, **{"lambda": None})
    elif kind == "hook point":
        kw_b["hook"] = "mlp.gate_proj"
    elif kind in ("auto-lambda", "fixed-lambda"):
        lam_param = "auto" if kind == "auto-lambda" else None
        for m, lam in ((a, 0.1), (b, 0.12)):
            m.meta["params"]["lam"] = lam_param if lam_param else lam
            m.meta["lambda"] = lam
        expect = "--lambda"
    return make_run(tmp_path, "A", a), make_run(tmp_path, "B", b, **kw_b), expect, []


@pytest.mark.parametrize("kind", ["languages", "scope", "shape", "top_rate", "bar", "method", "hook point",
                                  "auto-lambda", "fixed-lambda"])
def test_incomparable_runs_are_refused_with_one_error_line(kind, tmp_path, capsys):
    run_a, run_b, expect, _ = _variant(kind, tmp_path)
    code, out, err = run_cli(["compare", run_a, run_b, "--out", tmp_path / "cmp"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert expect in lines[0] and "cannot compare" in lines[0]
    assert not (tmp_path / "cmp" / "compare.html").exists()
    with pytest.raises(CompareError):
        compare_runs([run_a, run_b])


def test_bad_cli_arguments_are_refused(tmp_path, capsys):
    run_a = make_run(tmp_path, "A", random_map(seed=1))
    run_b = make_run(tmp_path, "B", random_map(seed=2))
    for args in (["--lambda", "average"], ["--out", run_a]):
        argv = ["compare", run_a, run_b] + (["--out", tmp_path / "o"] if "--out" not in args else []) + args
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["compare", run_a, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "at least two" in err
    code, _, err = run_cli(["compare", run_a, tmp_path / "missing", "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.startswith("error:")


def test_language_order_is_aligned_by_name(tmp_path):
    a, b = random_map(seed=3), random_map(seed=4)
    same = compare_maps([a, b], ["A", "B"])
    perm = compare_maps([a, permute_languages(b, ["ru", "zh", "de", "en"])], ["A", "B"])
    for name in ("layer_counts", "transition", "overlap", "language_counts", "alignment"):
        pd.testing.assert_frame_equal(getattr(same, name), getattr(perm, name))


def test_dtype_difference_is_warned(tmp_path):
    run_a = make_run(tmp_path, "A", random_map(seed=1), dtype="float32")
    run_b = make_run(tmp_path, "B", random_map(seed=2), dtype="bfloat16")
    with pytest.warns(UserWarning, match="bfloat16"):
        comp = compare_runs([run_a, run_b])
    assert any("bfloat16" in w for w in comp.summary["warnings"])


# -- λ policies ----------------------------------------------------------------------------------------------
def synthetic_stats(seed: int, langs=("en", "de", "zh"), L=2, N=64, T=5000) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    p = (torch.rand(1, L, N, generator=g) * 0.6 + torch.rand(len(langs), L, N, generator=g) * 0.4).clamp(max=1)
    return ActivationStats(list(langs), (p * T).round().to(torch.int64),
                           torch.full((len(langs),), T, dtype=torch.int64), None,
                           {"scope": "all", "model_fingerprint": f"m{seed}"})


def _lambda_runs(tmp_path: Path):
    from langneurons.identify import identify  # the project's own module: never a skip
    params = {"top_rate": 0.1, "bar": 0.9}
    stats = [synthetic_stats(0), synthetic_stats(6)]  # chosen so the automatic λ differs (0.099 vs 0.077)
    maps = [identify(s, "entropy-lambda", **params, lam="auto") for s in stats]
    lam_a, lam_b = maps[0].meta["lambda"], maps[1].meta["lambda"]
    assert lam_a != lam_b, "precondition: the two runs must end with different automatic λ"
    runs = []
    for name, s, m in zip(("base", "aligned"), stats, maps):
        run = RunDir(tmp_path / name)
        s.save(run.path, extra_manifest={"record": {"scope": "all", "include_special": False}})
        m.save(run.neurons_path)
        runs.append(run.path)
    return identify, params, stats, maps, runs


def test_lambda_policies_with_real_identify(tmp_path, capsys):
    identify, params, stats, maps, runs = _lambda_runs(tmp_path)
    lam_a = maps[0].meta["lambda"]
    code, _, err = run_cli(["compare", *runs, "--out", tmp_path / "strict"], capsys)
    assert code == 2 and "--lambda" in err and "automatically" in err

    own = compare_runs(runs, lambda_policy="own")
    assert own.runs["lambda"].tolist() == [maps[0].meta["lambda"], maps[1].meta["lambda"]]
    assert own.layer_counts["aligned"].tolist() == [c for cls in COUNT_CLASSES
                                                    for c in maps[1].counts_per_layer()[cls]]
    assert any("--lambda own" in n for n in own.summary["notes"])

    shared = compare_runs(runs, lambda_policy="shared")
    expected_b = identify(stats[1], "entropy-lambda", **params, lam=lam_a)  # second code path
    assert not torch.equal(expected_b.selected, maps[1].selected), "precondition: λ must change the selection"
    assert shared.runs["reidentified"].tolist() == [False, True]
    assert shared.runs["lambda"].tolist() == [lam_a, lam_a]
    assert shared.layer_counts["aligned"].tolist() == [c for cls in COUNT_CLASSES
                                                       for c in expected_b.counts_per_layer()[cls]]
    assert shared.layer_counts["base"].tolist() == [c for cls in COUNT_CLASSES
                                                    for c in maps[0].counts_per_layer()[cls]]
    naive = sum(naive_class(maps[0], l, n) == naive_class(expected_b, l, n) == "specific"
                for l in range(2) for n in range(64))
    assert shared.transition_matrix().loc["specific", "specific"] == naive

    code, out, err = run_cli(["compare", *runs, "--out", tmp_path / "shared", "--lambda", "shared"], capsys)
    assert code == 0, err
    assert "re-identified aligned" in json.loads((tmp_path / "shared" / "summary.json").read_text())["notes"][0]


def test_shared_lambda_reidentifies_later_runs_with_the_first_runs_lambda(tmp_path, monkeypatch):
    """Wiring of --lambda shared, independent of identify.py: a recording stand-in."""
    a = random_map(seed=1)
    b = random_map(seed=2)
    for m, lam in ((a, 0.1), (b, 0.3)):
        m.meta["params"]["lam"] = "auto"
        m.meta["lambda"] = lam
    runs = [make_run(tmp_path, "A", a), make_run(tmp_path, "B", b)]
    for run, seed in zip(runs, (1, 2)):
        s = synthetic_stats(seed, langs=LANGS, L=3, N=40)
        s.save(run)
    replacement = random_map(seed=99)
    calls = []

    def fake_identify(stats, method="entropy-lambda", **params):
        calls.append((list(stats.languages), method, params))
        out = copy.deepcopy(replacement)
        out.meta.update(method=method, params={**params}, **{"lambda": params["lam"]})
        return out

    monkeypatch.setitem(sys.modules, "langneurons.identify", types.SimpleNamespace(identify=fake_identify))
    comp = compare_runs(runs, lambda_policy="shared")
    assert calls == [(LANGS, "entropy-lambda", {"top_rate": 0.1, "bar": 0.9, "lam": 0.1})]
    assert comp.runs["reidentified"].tolist() == [False, True]
    assert comp.layer_counts["B"].tolist() == [c for cls in COUNT_CLASSES
                                               for c in replacement.counts_per_layer()[cls]]
    assert comp.layer_counts["A"].tolist() == [c for cls in COUNT_CLASSES for c in a.counts_per_layer()[cls]]

    # without stats, shared cannot work: a clear refusal
    (RunDir(runs[1]).stats_dir / "en.safetensors").unlink()
    with pytest.raises(CompareError, match="--lambda own"):
        compare_runs(runs, lambda_policy="shared")


# -- report and end to end ------------------------------------------------------------------------------------
class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.section_ids, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section_ids.append(attrs.get("id"))
        if tag == "img":
            self.imgs.append(attrs)


def check_page(path: Path, expect_sections) -> _PageParser:
    page = path.read_text(encoding="utf-8")
    parser = _PageParser()
    parser.feed(page)
    assert set(expect_sections) <= set(parser.section_ids), parser.section_ids
    assert all(i and i.startswith("section-") for i in parser.section_ids)
    assert parser.imgs
    for img in parser.imgs:
        assert img.get("alt", "").strip()
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "://" not in page and "<script" not in page and "<link" not in page  # no network resources
    return parser


SECTIONS = ["section-summary", "section-runs", "section-layers", "section-appear", "section-transition",
            "section-overlap", "section-alignment", "section-metrics", "section-pivot", "section-tables"]


def test_report_for_a_checkpoint_series_has_trajectory(tmp_path):
    from langneurons.report.compare import build_compare_report

    maps = [random_map(seed=s) for s in (1, 2, 3)]
    phases = [{"name": "understanding", "start": 0, "end": 0}, {"name": "reasoning", "start": 1, "end": 2}]
    comp = compare_maps(maps, ["step0", "step1", "step2"], trained_langs=["zh"], phases=phases)
    page = build_compare_report(comp, tmp_path)
    parser = check_page(page, SECTIONS + ["section-trajectory"])
    assert len(parser.imgs) == 6
    for name in ("layer_delta", "appear", "transition", "overlap", "alignment", "trajectory"):
        for ext in ("png", "svg"):
            assert (tmp_path / "figures" / f"compare_{name}.{ext}").stat().st_size > 1000


def _perturbed(model, seed: int, scale: float):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_end_to_end_two_tiny_models(tmp_path, tokenizer, llama, capsys):
    from tiny import SAMPLE_TEXTS

    from langneurons.corpus import Corpus, Example
    from langneurons.record import RecordConfig, record

    corpus = Corpus({lang: [Example(lang, text=t) for t in texts] * 3 for lang, texts in SAMPLE_TEXTS.items()},
                    source="tiny-sample")
    aligned = _perturbed(llama, seed=1, scale=0.15)
    runs = []
    try:
        from langneurons.identify import identify
    except ImportError:  # pragma: no cover - identify.py is a sibling stage
        identify = None
    for name, model in (("base", llama), ("aligned", aligned)):
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few tokens per language in a tiny corpus
            stats = record(model, tokenizer, corpus, out, RecordConfig(batch_size=4), model_id=name,
                           progress=False)
            assert identify is not None, "identify.py is needed for the end-to-end comparison"
            nmap = identify(stats, "entropy-lambda", top_rate=0.1, bar=0.9, lam="auto")
        nmap.save(RunDir(out).neurons_path)
        runs.append(out)
    RunDir(runs[1]).update_manifest({"align": {"trained_langs": ["zh", "de"]}})
    (RunDir(runs[0]).anatomy_path).write_text(json.dumps(
        {"phases": [{"name": "understanding", "start": 0, "end": 0}, {"name": "output", "start": 1, "end": 1}],
         "per_layer": {}}))
    for run, shift in zip(runs, (0.0, -0.2)):
        _ablation({(x, "nll"): [3.0 + shift + 0.1 * i] for i, x in enumerate(SAMPLE_TEXTS)}).to_parquet(
            RunDir(run).ablation_path)

    out = tmp_path / "cmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, stdout, err = run_cli(["compare", *runs, "--out", out, "--lambda", "shared"], capsys)
    assert code == 0, err
    assert "compare.html" in stdout and "specific" in stdout
    parser = check_page(out / "compare.html", SECTIONS)
    assert "section-trajectory" not in parser.section_ids  # two runs: no series section
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = compare_runs(runs, lambda_policy="shared")
    assert comp.phases and comp.phases[0]["name"] == "understanding"
    assert comp.summary["trained_langs"] == ["zh", "de"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["delta_totals"] == comp.summary["delta_totals"]
    # the perturbed model really differs, and the tables on disk are the comparison's tables
    mat = comp.transition_matrix().to_numpy()
    assert mat.sum() - mat.trace() > 0
    assert comp.metrics_summary.set_index(["metric", "group"]).loc[("nll", "trained"), "mean_delta"] \
        == pytest.approx(-0.2)
    disk = pd.read_parquet(out / "tables" / "layer_counts.parquet")
    pd.testing.assert_frame_equal(disk, comp.layer_counts, check_dtype=False)
