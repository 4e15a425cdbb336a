"""Tiny random models and a tiny fast tokenizer, built from code (no downloads).

Every supported family gets a 2-3 layer model with a small MLP so tests run in seconds on a
CPU; the tokenizer is a byte-level BPE trained on a few multilingual sentences, so any text
(any script) tokenizes and character offsets are available.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SAMPLE_TEXTS = {
    "en": ["The cat sat on the warm mat.", "We walked to the market in the morning.",
           "How many apples are left?", "It rained all day in the city."],
    "de": ["Die Katze saß auf der warmen Matte.", "Wir gingen am Morgen zum Markt.",
           "Wie viele Äpfel sind übrig?", "Es regnete den ganzen Tag in der Stadt."],
    "zh": ["猫坐在温暖的垫子上。", "我们早上去了市场。", "还剩下多少个苹果？", "城市里下了一整天的雨。"],
    "ru": ["Кошка сидела на тёплом коврике.", "Утром мы пошли на рынок.",
           "Сколько яблок осталось?", "В городе весь день шёл дождь."],
}


def make_tokenizer(vocab_size: int = 400, extra_texts: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on the sample texts (and ``extra_texts``, e.g. to make " A" one token)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts] * 3 + list(extra_texts)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", padding_side="right")


def make_config(family: str, vocab_size: int, layers: int = 2, hidden: int = 32, inter: int = 48):
    common = dict(vocab_size=vocab_size)
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
               "gemma3_text": transformers.Gemma3TextConfig, "phi3": transformers.Phi3Config}[family]
        kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if family.startswith("gemma") or family.startswith("qwen3"):
            kw["head_dim"] = 8
        if family == "gemma3_text":
            kw["sliding_window"] = 16
        return cls(**common, **kw)
    if family == "gpt2":
        return transformers.GPT2Config(**common, n_embd=hidden, n_layer=layers, n_head=4, n_inner=inter,
                                       n_positions=256, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=4, intermediate_size=inter,
                                          max_position_embeddings=256)
    if family == "bloom":
        return transformers.BloomConfig(**common, hidden_size=hidden, n_layer=layers, n_head=4)
    if family == "opt":
        return transformers.OPTConfig(**common, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=inter,
                                      num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
            "bloom", "opt"]


def make_model(family: str = "llama", seed: int = 0, vocab_size: int = 400, **kw) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = make_config(family, vocab_size, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random init with small std gives activations near 0; widen it so signs vary.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


def save_tiny(path: Path, family: str = "llama", seed: int = 0, extra_texts: tuple[str, ...] = ()) -> Path:
    tok = make_tokenizer(extra_texts=extra_texts)
    model = make_model(family, seed, vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dying_forward(module: torch.nn.Module, call: int, *, and_after: bool = False):
    """(real_forward, replacement) for ``type(module).forward`` that raises KeyboardInterrupt on
    its ``call``-th call (and every later one with ``and_after``): an interrupted run (Ctrl-C,
    preemption) at a known batch."""
    real_forward = type(module).forward
    seen = {"n": 0}

    def forward(self, *a, **k):
        seen["n"] += 1
        if seen["n"] == call or (and_after and seen["n"] > call):
            raise KeyboardInterrupt
        return real_forward(self, *a, **k)

    return real_forward, forward
