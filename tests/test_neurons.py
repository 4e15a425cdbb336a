"""NeuronMap interop with the published LAPE list format: export, import, round trips."""

from __future__ import annotations

import collections
import os

import pytest
import torch

from langneurons.errors import NeuronMapError
from langneurons.identify import EntropyLambda, Lape
from langneurons.neurons import (CLASS_CODE, NeuronMap, from_lape, load_lape, save_lape, to_lape)

from test_identify import f32, planted, to_stats


def _fit_empty_last(K=4):
    """Entropy-λ on planted stats where the last language gets no specific/related neuron."""
    positive, tokens, truth = planted(K, empty_last=True)
    k = len(truth["specific"]) + len(truth["related"]) + len(truth["unassigned"])
    langs = ["en", "de", "zh", "ru"][:K]
    est = EntropyLambda(top_rate=k / 400, lam=0.0).fit(to_stats(positive, tokens, langs=langs))
    return est, positive, tokens, truth


def _published_mask(selected: torch.Tensor, positive, tokens, tau: float) -> list:
    """How the published codes build their files: every selected neuron, in (layer, neuron)
    order, appended to each language where p > τ; then a sorted LongTensor per layer."""
    K, L, N = len(positive), len(positive[0]), len(positive[0][0])
    lists = [[[] for _ in range(L)] for _ in range(K)]
    for l, n in sorted(tuple(x) for x in selected.nonzero().tolist()):
        for k in range(K):
            if f32(f32(positive[k][l][n]) / f32(tokens[k])) > tau:
                lists[k][l].append(n)
    return [[torch.tensor(sorted(x), dtype=torch.long) for x in lang] for lang in lists]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y)) for x, y in zip(a, b))


def test_export_keeps_empty_language_slot_and_round_trips(tmp_path):
    est, positive, tokens, truth = _fit_empty_last()
    nmap = est.neuron_map_
    obj = to_lape(nmap, "specific,related")
    assert len(obj) == 4 and all(len(slot) == nmap.num_layers for slot in obj)
    assert all(t.numel() == 0 and t.dtype == torch.int64 for t in obj[-1])  # ru: empty but present
    for slot in obj:
        for t in slot:
            assert t.dtype == torch.int64 and torch.equal(t, t.sort().values)
    # every exported neuron is exactly a planted specific/related one, in its languages
    listed = collections.defaultdict(set)
    for k, slot in enumerate(obj):
        for l, t in enumerate(slot):
            for n in t.tolist():
                listed[(l, n)].add(k)
    expected = {pos: langs for cls in ("specific", "related") for pos, langs in truth[cls]}
    assert dict(listed) == expected

    path = save_lape(nmap, "specific,related", tmp_path / "mask.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["mask.pt"]  # atomic: no temporary left behind
    loaded = torch.load(path, weights_only=True)
    assert _same(loaded, obj)

    back = load_lape(path, nmap.languages, nmap.num_neurons)
    assert back.languages == nmap.languages
    for cls in ("specific", "related"):
        assert torch.equal(back.class_mask([cls]), nmap.class_mask([cls]))
    assert int(back.class_mask(["general"]).sum()) == 0
    assert torch.equal(back.active, nmap.active & nmap.class_mask(["specific", "related"]))
    assert all(t.numel() == 0 for t in back.masks()["ru"])
    assert _same(to_lape(back, "specific,related"), obj)
    assert back.meta["source_file"] == str(path) and back.meta["method"] == "imported-lape"


@pytest.mark.parametrize("method", ["lape", "entropy-lambda"])
def test_selected_export_is_the_published_mask(method):
    positive, tokens, truth = planted(5)
    k = len(truth["specific"]) + len(truth["related"]) + len(truth["general"])
    stats = to_stats(positive, tokens)
    if method == "lape":  # LAPE's prefilter keeps the inactive skewed neurons out
        est = Lape(top_rate=k / 400).fit(stats)
    else:  # at λ = 1 the general neurons rank above the unassigned ones
        est = EntropyLambda(top_rate=(k + len(truth["unassigned"])) / 400, lam=1.0).fit(stats)
    assert est.appear_[5] > 0  # selected neurons active in all languages are part of the published files
    want = _published_mask(est.selected_, positive, tokens, est.tau_)
    got = to_lape(est.neuron_map_, "selected")
    assert _same(got, want)
    back = from_lape(got, est.languages_, 200)
    listed = est.selected_ & (est.n_active_ > 0)
    assert torch.equal(back.selected, listed)
    assert torch.equal(back.class_mask(["general"]), listed & (est.n_active_ == 5))
    # here every general neuron is selected, so the published mask is the union of the three classes
    assert int(est.neuron_map_.class_mask(["general"]).sum()) == est.appear_[5] == len(truth["general"])
    assert _same(got, to_lape(est.neuron_map_, "specific,related,general"))


def test_from_lape_classes_from_language_counts():
    L, N = 2, 6
    e = torch.tensor([], dtype=torch.long)
    obj = [
        [torch.tensor([1, 2, 5]), torch.tensor([3])],  # en
        [torch.tensor([2]), torch.tensor([3, 4])],  # de
        [torch.tensor([5]), torch.tensor([3])],  # zh
        [e, e],  # ru: no neurons
    ]
    nmap = from_lape(obj, ["en", "de", "zh", "ru"], N)
    expect = torch.zeros(L, N, dtype=torch.int8)
    expect[0, 1] = CLASS_CODE["specific"]
    expect[0, 2] = CLASS_CODE["related"]
    expect[0, 5] = CLASS_CODE["related"]
    expect[1, 3] = CLASS_CODE["related"]  # 3 of 4 languages
    expect[1, 4] = CLASS_CODE["specific"]
    assert torch.equal(nmap.classes, expect)
    assert nmap.appear() == [0, 2, 2, 1, 0] == nmap.meta["appear"]
    obj[3] = [e, torch.tensor([3])]
    nmap = from_lape(obj, ["en", "de", "zh", "ru"], N)
    assert int(nmap.classes[1, 3]) == CLASS_CODE["general"]
    assert nmap.masks(["general"])["ru"][1].tolist() == [3]


def test_from_lape_pads_trailing_languages_dropped_by_published_code():
    obj = [[torch.tensor([0])], [torch.tensor([1])]]  # LAPE's bincount without minlength drops trailing langs
    with pytest.warns(UserWarning, match="zh,ru are taken as empty"):
        nmap = from_lape(obj, ["en", "de", "zh", "ru"], 3)
    assert nmap.K == 4 and nmap.masks()["ru"][0].numel() == 0
    assert int(nmap.classes[0, 0]) == CLASS_CODE["specific"]


@pytest.mark.parametrize("obj,match", [
    ({"en": []}, "not a LAPE neuron file"),
    ([], "not a LAPE neuron file"),
    ([[torch.tensor([0])], [torch.tensor([0])], [torch.tensor([0])]], "3 language slots but 2"),
    ([[torch.tensor([0])], [torch.tensor([0]), torch.tensor([1])]], "different numbers of layers"),
    ([[torch.tensor([7])], [torch.tensor([0])]], "out of range"),
    ([[torch.tensor([0.5])], [torch.tensor([0])]], "integers"),
])
def test_from_lape_bad_input(obj, match):
    with pytest.raises(NeuronMapError, match=match):
        from_lape(obj, ["en", "de"], 5)


def test_from_lape_accepts_published_empty_float_tensors():
    obj = [[torch.tensor([]), torch.tensor([2.0])], [torch.tensor([]).long(), torch.tensor([2])]]
    nmap = from_lape(obj, ["en", "de"], 4)
    assert int(nmap.classes[1, 2]) == CLASS_CODE["general"] and int(nmap.selected.sum()) == 1


class _NotAllowed:
    pass


def test_load_lape_refuses_pickles_and_missing_files(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save([[_NotAllowed()]], path)
    with pytest.raises(NeuronMapError, match="not a tensor file langneurons can load safely"):
        load_lape(path, ["en"], 3)
    with pytest.raises(NeuronMapError, match="does not exist"):
        load_lape(tmp_path / "nope.pt", ["en"], 3)


def test_to_lape_unknown_class():
    est, *_ = _fit_empty_last()
    with pytest.raises(NeuronMapError, match="selected"):
        to_lape(est.neuron_map_, "specific,bogus")
    both = to_lape(est.neuron_map_, "selected,general")
    sel = to_lape(est.neuron_map_, "selected")
    gen = to_lape(est.neuron_map_, "general")
    for a, b, c in zip(both, sel, gen):
        for x, y, z in zip(a, b, c):
            assert x.tolist() == sorted(set(y.tolist()) | set(z.tolist()))


def test_identify_neuron_map_save_load_round_trip(tmp_path):
    positive, tokens, truth = planted(4)
    k = len(truth["specific"]) + len(truth["related"]) + len(truth["unassigned"])
    nmap = EntropyLambda(top_rate=k / 400, lam="auto", lam_range=(0.0, 0.2)).fit(to_stats(positive, tokens)).neuron_map_
    nmap.save(tmp_path / "n.safetensors")
    back = NeuronMap.load(tmp_path / "n.safetensors")
    for name in ("classes", "active", "selected", "scores"):
        assert torch.equal(getattr(back, name), getattr(nmap, name))
    assert back.meta["lambda_trace"] == nmap.meta["lambda_trace"]
    assert back.meta["lambda_saturated"] is True and back.meta["tau"] == nmap.meta["tau"]
    assert os.listdir(tmp_path) == ["n.safetensors"]


def test_imported_map_general_is_marked_unavailable_then_completed_from_stats():
    """One meaning of general: active in all K languages among ALL neurons. A list file cannot
    know the unselected ones, so the imported map says so; its run's stats complete it."""
    from langneurons.identify import activation_probs, activation_threshold
    from langneurons.neurons import GENERAL, RELATED, SPECIFIC, complete_general, from_lape
    from langneurons.stats import ActivationStats, LanguageStats

    K, L, N = 3, 2, 40
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(K, L, N, generator=g) * 0.3
    probs[:, 0, :4] = 0.9  # four neurons busy in every language
    probs[0, 1, 5] = 0.95  # language-specific
    tokens = 1000
    parts = [LanguageStats(lang, (probs[k] * tokens).round().to(torch.int64), tokens, None, {})
             for k, lang in enumerate(["en", "de", "zh"])]
    stats = ActivationStats.stack(parts)
    lists = [[torch.tensor([0, 5]), torch.tensor([5])], [torch.tensor([0]), torch.tensor([], dtype=torch.int64)],
             [torch.tensor([0]), torch.tensor([], dtype=torch.int64)]]
    nmap = from_lape(lists, ["en", "de", "zh"], N)
    assert nmap.meta["general_available"] is False
    full = complete_general(nmap, stats, bar=0.9)
    # the independent rule: p > τ in every language, τ as identify computes it
    p = activation_probs(stats)
    want_general = (p > activation_threshold(p, 0.9)).all(0)
    assert full.meta["general_available"] is True
    listed_spec_rel = (nmap.classes == SPECIFIC) | (nmap.classes == RELATED)
    assert torch.equal(full.classes == GENERAL, want_general & ~listed_spec_rel)
    assert bool(want_general[0, :4].all()) and bool(full.classes[0, 0] == GENERAL)
    assert bool(full.classes[0, 5] == SPECIFIC)


# -- vectorised summaries vs the plain loops they replaced (oracles) ---------------------------
def _loop_counts_per_language(m):
    from langneurons.neurons import CLASS_CODE

    return {lang: {name: int(((m.classes == CLASS_CODE[name]) & m.active[k]).sum())
                   for name in ("specific", "related", "general")} for k, lang in enumerate(m.languages)}


def _loop_counts_per_layer(m):
    from langneurons.neurons import CLASS_CODE

    return {name: [int((m.classes[layer] == CLASS_CODE[name]).sum()) for layer in range(m.num_layers)]
            for name in ("specific", "related", "general", "unassigned")}


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_summaries_equal_the_loops(seed):
    import torch

    from langneurons.identify import identify
    from langneurons.neurons import NeuronMap
    from langneurons.stats import ActivationStats

    g = torch.Generator().manual_seed(seed)
    K, L, N = 3 + seed, 4, 300
    # arbitrary maps (active anywhere, any class), and maps as identify() builds them
    arbitrary = NeuronMap([f"l{k}" for k in range(K)], torch.randint(0, 5, (L, N), generator=g, dtype=torch.int8),
                          torch.rand(K, L, N, generator=g) < 0.3, torch.rand(L, N, generator=g) < 0.1)
    pos = (torch.rand(K, L, N, generator=g) ** 3 * 1000).to(torch.int64)
    fitted = identify(ActivationStats(arbitrary.languages, pos, torch.full((K,), 1000), None, {}), "lape",
                      top_rate=0.05)
    for m in (arbitrary, fitted):
        assert m.counts_per_language() == _loop_counts_per_language(m)
        assert m.counts_per_layer() == _loop_counts_per_layer(m)
        n_act = m.active.sum(0)[m.selected]
        assert m.appear() == torch.bincount(n_act.flatten(), minlength=K + 1).tolist()
        totals = m.summary()["totals"]
        assert totals == {n: sum(v) for n, v in _loop_counts_per_layer(m).items()}
