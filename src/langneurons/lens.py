"""Logit lens: what the residual stream after every layer would predict.

After each transformer block l the residual h_l is sent through the model's own final norm,
(OPT: project_out), unembedding and (Gemma 2/3) logit soft-cap, exactly what the model applies to
its last residual (nostalgebraist 2020; Wendler et al. 2024, "Do Llamas Work in English?"). On
parallel texts per language we record, per layer and language, averaged over every position that
has a next token:

* ``p_correct``  probability of the true next token;
* ``lang_mass``  probability mass on tokens of the input language;
* ``en_mass``    probability mass on English tokens;
* ``entropy``    entropy of the next-token distribution (nats);
* ``top1``       share of positions where the true next token is the arg-max;
* ``n_tokens``   number of positions.

Token language (documented in docs/anatomy.md, "Logit lens"): every vocabulary entry is decoded
alone; its letters (Unicode category L*) give its scripts (first word of the Unicode name:
LATIN, CYRILLIC, CJK, HIRAGANA ...). A language's scripts are those holding >= 10% of the letters
of its corpus. For an input language k with no Latin script, k-tokens are the tokens all of whose
letters are in k's scripts, and English tokens are Latin tokens found inside a word of the
English corpus (any Latin token when there is no English corpus). For a Latin-script language k
the script cannot tell it from English, so a word list decides: k-tokens are Latin tokens (>= 2
letters, lower-cased) occurring inside some word of k's corpus and inside no English word;
English tokens the reverse. For English itself both masses are English tokens (no comparison).

Memory: residuals are captured by forward hooks on the blocks (the model's own hidden_states
already carry the final norm on the last entry in several families), and logits are formed one
layer and at most ``max_logit_elems`` / V positions at a time, never [L, B, T, V] at once.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .arch import body_of, locate_unembedding
from .errors import LangNeuronsError

METRICS = ("p_correct", "lang_mass", "en_mass", "entropy", "top1")
LENS_FILE = "lens.parquet"
_WORD = re.compile(r"\w+", re.UNICODE)


# -- token languages ---------------------------------------------------------------------------
def char_script(ch: str) -> str | None:
    """The script of a letter (first word of its Unicode name), None for non-letters."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    try:
        return unicodedata.name(ch).split()[0]
    except ValueError:
        return None


def token_scripts(text: str) -> set[str]:
    return {s for s in (char_script(c) for c in text) if s}


def language_scripts(texts: Iterable[str], min_share: float = 0.1) -> set[str]:
    """Scripts holding at least ``min_share`` of the letters of a language's corpus."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(s for s in (char_script(c) for c in t) if s)
    total = sum(counts.values())
    return {s for s, n in counts.items() if total and n / total >= min_share}


def _substrings(texts: Iterable[str], max_word: int = 30) -> set[str]:
    """Every substring of >= 2 characters of every lower-cased word (words up to max_word chars)."""
    out: set[str] = set()
    for t in texts:
        for w in _WORD.findall(t.lower()):
            if len(w) > max_word:
                continue
            for i in range(len(w)):
                for j in range(i + 2, len(w) + 1):
                    out.add(w[i:j])
    return out


def _clean(tok: str) -> str:
    return "".join(c for c in tok.lower() if unicodedata.category(c).startswith("L"))


def language_masks(vocab: Sequence[str], corpus_by_lang: dict[str, Sequence[str]],
                   english: str = "en") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """lang -> (input-language mask [V], English mask [V]) by the rule in the module docstring.

    ``vocab[i]`` is token i decoded on its own."""
    scripts = {lang: language_scripts(texts) for lang, texts in corpus_by_lang.items()}
    en_words = _substrings(corpus_by_lang[english]) if english in corpus_by_lang else None
    tok_scripts = [token_scripts(v) for v in vocab]
    clean = [_clean(v) for v in vocab]
    latin = torch.tensor([s == {"LATIN"} for s in tok_scripts])
    if en_words is not None:
        in_en = torch.tensor([bool(lat) and len(c) >= 2 and c in en_words for lat, c in zip(latin.tolist(), clean)])
    else:
        in_en = latin.clone()
    out = {}
    for lang, texts in corpus_by_lang.items():
        sc = scripts[lang]
        if lang == english:
            out[lang] = (in_en.clone(), in_en.clone())
        elif "LATIN" not in sc:
            own = torch.tensor([bool(s) and s <= sc for s in tok_scripts])
            out[lang] = (own, in_en.clone())
        else:
            words = _substrings(texts)
            in_k = torch.tensor([bool(lat) and len(c) >= 2 and c in words for lat, c in zip(latin.tolist(), clean)])
            out[lang] = (in_k & ~in_en, in_en & ~in_k)
    return out


def decoded_vocab(tokenizer: Any, size: int) -> list[str]:
    """Every token id < size decoded on its own (ids the tokenizer lacks decode to '')."""
    n_tok = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(min(size, n_tok))], skip_special_tokens=True)
    return list(texts) + [""] * (size - len(texts))


# -- the lens -----------------------------------------------------------------------------------
@dataclass
class LensConfig:
    batch_size: int = 8
    max_length: int = 256
    max_docs: int | None = None  # per language
    max_logit_elems: int = 1 << 26  # positions x vocabulary formed at once (256 MiB of float32)
    english: str = "en"


def _capture_layers(layers: Sequence[torch.nn.Module]) -> tuple[list[Any], list[torch.Tensor | None]]:
    store: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def hook(_m: Any, _inp: Any, out: Any, i: int = i) -> None:
            store[i] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        handles.append(layer.register_forward_hook(hook))
    return handles, store


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            out.append(list(ids))
    return out


@torch.no_grad()
def lens_metrics(model: torch.nn.Module, tokenizer: Any, corpus_by_lang: dict[str, Sequence[str]],
                 config: LensConfig | None = None, masks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """The lens table (pandas DataFrame: layer, lang, METRICS..., n_tokens); see the module docstring."""
    import pandas as pd

    cfg = config or LensConfig()
    if cfg.batch_size < 1 or cfg.max_length < 2:
        raise LangNeuronsError("lens: batch_size must be >= 1 and max_length >= 2")
    unemb = locate_unembedding(model)
    vocab_size = int(unemb.head.weight.shape[0])
    corpus = {k: list(v)[: cfg.max_docs] if cfg.max_docs else list(v) for k, v in corpus_by_lang.items()}
    if masks is None:
        masks = language_masks(decoded_vocab(tokenizer, vocab_size), corpus, cfg.english)
    device = unemb.head.weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body = body_of(model)
    n_layers = len(unemb.layers)
    rows = []
    handles, store = _capture_layers(unemb.layers)
    try:
        for lang, texts in corpus.items():
            m_lang, m_en = masks[lang]
            mm = torch.stack([m_lang, m_en], 1).to(device=device, dtype=torch.float32)  # [V, 2]
            sums = torch.zeros(n_layers, 6, dtype=torch.float64)  # p, lang, en, H, top1, n
            docs = _encode(tokenizer, texts, cfg.max_length)
            for b0 in range(0, len(docs), cfg.batch_size):
                batch = docs[b0:b0 + cfg.batch_size]
                width = max(len(d) for d in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                att = torch.zeros((len(batch), width), dtype=torch.long)
                for i, d in enumerate(batch):  # right padding: real tokens keep their positions
                    ids[i, :len(d)] = torch.tensor(d)
                    att[i, :len(d)] = 1
                in_dev = next(body.parameters()).device
                body(input_ids=ids.to(in_dev), attention_mask=att.to(in_dev))
                valid = (att[:, :-1] & att[:, 1:]).bool()
                target = ids[:, 1:][valid].to(device)
                chunk = max(1, cfg.max_logit_elems // vocab_size)
                for layer in range(n_layers):
                    h = store[layer]
                    assert h is not None, "a layer hook did not fire"
                    hv = h[:, :-1][valid.to(h.device)]  # [M, H]
                    for c0 in range(0, hv.shape[0], chunk):
                        hc = hv[c0:c0 + chunk].to(device)
                        logits = unemb.logits(hc).float()
                        logp = torch.log_softmax(logits, -1)
                        p = logp.exp()
                        tg = target[c0:c0 + chunk]
                        mass = p @ mm
                        ent = -(p * logp).nan_to_num().sum(-1)
                        sums[layer, 0] += p.gather(1, tg[:, None]).sum().item()
                        sums[layer, 1] += mass[:, 0].sum().item()
                        sums[layer, 2] += mass[:, 1].sum().item()
                        sums[layer, 3] += ent.sum().item()
                        sums[layer, 4] += (logits.argmax(-1) == tg).sum().item()
                        sums[layer, 5] += hc.shape[0]
                store[:] = [None] * n_layers
            for layer in range(n_layers):
                n = sums[layer, 5].item()
                vals = (sums[layer, :5] / n).tolist() if n else [math.nan] * 5
                rows.append({"layer": layer, "lang": lang, **dict(zip(METRICS, vals)), "n_tokens": int(n),
                             "lang_vocab": int(m_lang.sum()), "en_vocab": int(m_en.sum())})
    finally:
        for hd in handles:
            hd.remove()
    return pd.DataFrame(rows, columns=["layer", "lang", *METRICS, "n_tokens", "lang_vocab", "en_vocab"])


def _first_from(values: Sequence[bool]) -> int | None:
    """First index from which every value is True (None if the last is False)."""
    first = None
    for i, v in enumerate(values):
        if v and first is None:
            first = i
        elif not v:
            first = None
    return first


def lens_summary(df: Any, english: str = "en") -> dict[str, dict[str, Any]]:
    """Per language: ``overtakes_english`` = the first layer from which the input language's mass
    stays above English's (None: never; not defined for English itself), and ``correct_top1`` =
    the first layer from which the top-1 rate stays >= half of its last-layer value."""
    out: dict[str, dict[str, Any]] = {}
    for lang, g in df.sort_values("layer").groupby("lang", sort=False):
        top1 = g["top1"].tolist()
        final = top1[-1] if top1 else 0.0
        over = None if lang == english else _first_from([a > b for a, b in zip(g["lang_mass"], g["en_mass"])])
        out[str(lang)] = {
            "overtakes_english": over,
            "correct_top1": _first_from([t >= 0.5 * final and final > 0 for t in top1]),
            "final_top1": final, "final_p_correct": float(g["p_correct"].iloc[-1]),
            "n_tokens": int(g["n_tokens"].iloc[0]), "layers": len(g),
        }
    return out


def run_lens(run_dir: str | Path, model: torch.nn.Module, tokenizer: Any, corpus_by_lang: dict[str, Sequence[str]],
             config: LensConfig | None = None):
    """Compute the lens and write RUN_DIR/lens.parquet atomically; returns the DataFrame."""
    from .io import atomic_write

    df = lens_metrics(model, tokenizer, corpus_by_lang, config)
    path = Path(run_dir) / LENS_FILE
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    return df
