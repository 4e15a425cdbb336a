"""Stats containers, validation and the published import formats."""

import pytest
import torch
from typer.testing import CliRunner

from langneurons.errors import StatsError
from langneurons.stats import ActivationStats, LanguageStats, find_import_files


def rand_stats(K=3, L=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1000, 2000, (K,), generator=g)
    pos = (torch.rand(K, L, N, generator=g) * tokens.view(-1, 1, 1)).long()
    return ActivationStats([f"l{i}" for i in range(K)], pos, tokens, None, {"scope": "all"})


def test_probs_and_validation():
    s = rand_stats()
    p = s.probs(torch.float64)
    assert torch.allclose(p * s.tokens.view(-1, 1, 1).double(), s.positive.double())
    s.validate()
    bad = rand_stats()
    bad.positive[1, 0, 0] = int(bad.tokens[1]) + 1
    with pytest.raises(StatsError, match="more tokens"):
        bad.validate()
    bad = rand_stats()
    bad.positive[0, 0, 0] = -1
    with pytest.raises(StatsError, match="negative"):
        bad.validate()
    bad = rand_stats()
    bad.tokens[2] = 0
    bad.positive[2] = 0
    with pytest.raises(StatsError, match="zero counted tokens"):
        bad.validate()
    with pytest.raises(StatsError, match="at least 2"):
        rand_stats(K=1).validate()
    few = rand_stats()
    few.tokens[0] = 10
    few.positive[0] = few.positive[0].clamp(max=10)
    with pytest.warns(UserWarning, match="noisy"):
        few.validate()


def test_stack_refuses_different_shapes_and_scopes():
    a = LanguageStats("en", torch.zeros(2, 3, dtype=torch.long), 5, None, {"scope": "all"})
    b = LanguageStats("de", torch.zeros(2, 4, dtype=torch.long), 5, None, {"scope": "all"})
    with pytest.raises(StatsError, match="shapes differ"):
        ActivationStats.stack([a, b])
    c = LanguageStats("de", torch.zeros(2, 3, dtype=torch.long), 5, None, {"scope": "response"})
    with pytest.raises(StatsError, match="'scope' differs"):
        ActivationStats.stack([a, c])


def test_import_lape_roundtrip(tmp_path):
    s = rand_stats()
    for k, lang in enumerate(s.languages):
        torch.save({"n": int(s.tokens[k]), "over_zero": s.positive[k].clone()}, tmp_path / f"activation.{lang}.train.llama-7b")
    # LAPE names files activation.<lang>.train.<model>; our loader also takes <lang>.pt
    for f in tmp_path.iterdir():
        f.rename(f.with_name(f.name + ".pt"))
    parts = find_import_files("lape", [tmp_path], ["l2", "l0", "l1"])
    assert [p.lang for p in parts] == ["l2", "l0", "l1"]
    assert torch.equal(parts[0].positive, s.positive[2]) and parts[0].tokens == int(s.tokens[2])


def test_import_njunlp_full_minus_prefix(tmp_path):
    full = torch.tensor([[5, 3], [0, 7]])
    prefix = torch.tensor([[2, 4], [0, 1]])  # 3 - 4 < 0: clamped to 0 as in the published method
    torch.save({"total_tokens": 10, "over_zero": full}, tmp_path / "activation.zh.mgsm.pt")
    torch.save({"total_tokens": 4, "over_zero": prefix}, tmp_path / "prefix.activation.zh.mgsm.pt")
    torch.save({"total_tokens": 3, "over_zero": torch.ones(2, 2, dtype=torch.long)}, tmp_path / "activation.en.mgsm.pt")
    parts = find_import_files("njunlp", [tmp_path], None)
    assert [p.lang for p in parts] == ["en", "zh"]
    zh = parts[1]
    assert zh.tokens == 6 and zh.positive.tolist() == [[3, 0], [0, 6]] and zh.meta["scope"] == "response"
    assert parts[0].meta["scope"] == "all"


def test_import_cli_writes_run_dir(tmp_path):
    from langneurons.cli.app import app

    s = rand_stats()
    src = tmp_path / "src"
    src.mkdir()
    for k, lang in enumerate(s.languages):
        torch.save({"n": int(s.tokens[k]), "over_zero": s.positive[k].clone()}, src / f"{lang}.pt")
    res = CliRunner().invoke(app, ["import", str(src), "--format", "lape", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    loaded = ActivationStats.load(tmp_path / "run")
    assert loaded.languages == s.languages and torch.equal(loaded.positive, s.positive)


class Evil:  # any non-tensor object: a pickle that weights_only loading must refuse
    pass


def test_import_refuses_pickles(tmp_path):
    torch.save({"n": 1, "over_zero": Evil()}, tmp_path / "x.pt")
    with pytest.raises(StatsError, match="not a tensor file langneurons can load safely"):
        find_import_files("lape", [tmp_path / "x.pt"], None)
