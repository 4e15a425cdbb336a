"""Exports: pruned model (= zero-deactivation at every position), the authors' mask layout,
lm-eval's steered-model file, parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ci import require_module
import torch

from langneurons.config import ModelConfig
from langneurons.errors import LangNeuronsError
from langneurons.export import export, neuron_set
from langneurons.neurons import CLASS_NAMES, NeuronMap, class_codes, to_lape
from tiny import make_tokenizer, save_tiny


def planted_map(L: int, N: int, langs=("en", "de", "zh"), seed: int = 0) -> NeuronMap:
    """A valid map: random selected neurons, each active in a random non-empty language subset
    (some in all K: general), plus unassigned ones (selected, active nowhere)."""
    g = torch.Generator().manual_seed(seed)
    K = len(langs)
    selected = torch.rand(L, N, generator=g) < 0.15
    active = (torch.rand(K, L, N, generator=g) < 0.4) & selected
    classes = class_codes(selected, active.sum(0), K)
    scores = torch.rand(L, N, generator=g)
    return NeuronMap(list(langs), classes, active, selected, scores, {"method": "planted"})


def _run(tmp_path: Path, family: str) -> tuple[Path, Path, NeuronMap]:
    model_dir = save_tiny(tmp_path / f"m-{family}", family)
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    from langneurons.arch import locate_activations

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    sites = locate_activations(model)
    nmap = planted_map(sites.num_layers, sites.num_neurons)
    run = tmp_path / f"run-{family}"
    run.mkdir()
    nmap.meta["hook_point"] = sites.hook_point
    nmap.save(run / "neurons.safetensors")
    del cfg
    return model_dir, run, nmap


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt"])
def test_pruned_model_equals_zero_deactivation_at_every_position(tmp_path, family) -> None:
    import transformers

    from langneurons.intervene import deactivate

    model_dir, run, nmap = _run(tmp_path, family)
    out = tmp_path / "pruned"
    line = export(run, "pruned-model", out, classes="specific,related", langs=["de"],
                  model=ModelConfig(model=str(model_dir), device="cpu"))
    assert "pruned" in line
    mask = nmap.language_mask("de", ("specific", "related"))
    assert mask.any()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = make_tokenizer()
    batch = tok(["Die Katze saß auf der Matte.", "The cat sat."], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = base(**batch).logits
        with deactivate(base, mask):
            hooked = base(**batch).logits
        exported = pruned(**batch).logits
    torch.testing.assert_close(exported, hooked, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, hooked)  # the set matters, so equality above is not vacuous
    info = json.loads((out / "langneurons-pruned.json").read_text())
    assert info["pruned_neurons"] == int(mask.sum()) and info["languages"] == ["de"]


def test_njunlp_layout(tmp_path) -> None:
    nmap = planted_map(3, 20)
    run = tmp_path / "run"
    run.mkdir()
    nmap.save(run / "neurons.safetensors")
    out = tmp_path / "mask.Tiny"
    export(run, "njunlp", out)
    obj = torch.load(out, weights_only=True)
    assert len(obj) == 3 and all(len(layers) == 3 for layers in obj)
    # independent: a naive loop over selected neurons and their active languages
    for k in range(3):
        for layer in range(3):
            want = [n for n in range(20) if nmap.selected[layer, n] and nmap.active[k, layer, n]]
            assert obj[k][layer].tolist() == want and obj[k][layer].dtype == torch.int64
    assert json.loads(Path(str(out) + ".languages.json").read_text()) == ["en", "de", "zh"]
    ref = to_lape(nmap, "selected")
    assert all(torch.equal(a, b) for x, y in zip(obj, ref) for a, b in zip(x, y))


def test_parquet_rows(tmp_path) -> None:
    import pandas as pd

    nmap = planted_map(4, 16)
    nmap.extras["stability"] = torch.rand(4, 16)
    run = tmp_path / "run"
    run.mkdir()
    nmap.save(run / "neurons.safetensors")
    export(run, "parquet", tmp_path / "n.parquet")
    df = pd.read_parquet(tmp_path / "n.parquet")
    rows = {(int(r.layer), int(r.neuron)): r for r in df.itertuples()}
    for layer in range(4):
        for n in range(16):
            cls = CLASS_NAMES[int(nmap.classes[layer, n])]
            if cls == "none" and not nmap.selected[layer, n]:
                assert (layer, n) not in rows
                continue
            r = rows[(layer, n)]
            assert r._3 == cls  # "class"
            assert list(r.languages) == [lang for k, lang in enumerate(nmap.languages) if nmap.active[k, layer, n]]
            assert r.score == pytest.approx(float(nmap.scores[layer, n]))
            assert r.stability == pytest.approx(float(nmap.extras["stability"][layer, n]))
    assert set(df["class"]) <= {"specific", "related", "general", "unassigned"}


def test_lm_eval_steer_file_drives_lm_evals_steered_model(tmp_path) -> None:
    require_module("lm_eval")
    from lm_eval.models.hf_steered import SteeredModel

    model_dir, run, nmap = _run(tmp_path, "llama")
    out = tmp_path / "steer.pt"
    export(run, "lm-eval-steer", out, classes="specific,related", langs=["en"], value=0.75)
    mask = neuron_set(nmap, "specific,related", ["en"])
    assert mask.any()
    steered = SteeredModel(pretrained=str(model_dir), steer_path=str(out), device="cpu", batch_size=1)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        got = steered.forward(ids).logits
    # independent: hooks that add 0.75 to exactly these neurons
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    handles = []
    for layer in range(mask.shape[0]):
        add = mask[layer].float() * 0.75
        handles.append(model.model.layers[layer].mlp.act_fn.register_forward_hook(lambda m, i, o, a=add: o + a))
    with torch.no_grad():
        want = model(ids).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, plain)
    with pytest.raises(LangNeuronsError, match=".pt"):
        export(run, "lm-eval-steer", tmp_path / "steer.json")


def test_unknown_format_and_language(tmp_path) -> None:
    nmap = planted_map(2, 8)
    nmap.save(tmp_path / "n.safetensors")
    with pytest.raises(LangNeuronsError, match="--format"):
        export(tmp_path / "n.safetensors", "csv", tmp_path / "x")
    with pytest.raises(LangNeuronsError, match="not in the neuron map"):
        export(tmp_path / "n.safetensors", "lm-eval-steer", tmp_path / "x.pt", langs=["fr"])
