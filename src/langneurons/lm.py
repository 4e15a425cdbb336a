"""What every stage does with a loaded causal LM: where its inputs go, which token ids pad and
stop, how a user message becomes the model's input, how an example is tokenised, and ONE
batched text generator.

Why one module: evaluation (task accuracy, generations), alignment (sampling answers) and the
later stages (generation with activation counting, steering) must agree on padding, stopping
and decoding, or their numbers are not comparable. Two generators used to differ in all three
(one lost the leading space of SentencePiece tokens).

The generator (`generate`)
    * one KV-cached decode loop (no ``model.generate``): prefill of the left-padded prompts,
      then one token per step. Position ids come from the attention mask (cumulative sum - 1,
      as ``transformers`` does), so a left-padded row sees the positions of an unpadded run and
      batched greedy decoding equals one-prompt-at-a-time decoding (tested token for token);
    * greedy by default; sampling with temperature / top-k / top-p from a ``torch.Generator``
      seeded per batch from (seed, batch index), so the same settings give the same samples;
    * stops a row at its first stop token (EOS of the generation config, the model config and
      the tokenizer, and the end-of-turn tokens of chat templates such as ``<end_of_turn>`` or
      ``<|im_end|>``) or after ``max_new_tokens``; the stop token is reported, not part of the
      text;
    * returns exact token ids, and the text of ONLY the new tokens: decode(prompt + new) minus
      decode(prompt), which keeps a leading SentencePiece space ("▁Paris" -> " Paris") that
      decoding the new ids alone drops;
    * hooks for later stages: ``batch_context(prompt_width)`` returns a context manager held
      around each batch's decoding (e.g. `intervene.deactivate` with ``positions="generated"``),
      ``on_batch(rows)`` tells which outputs a batch's rows are, and ``on_step(step, new_ids,
      finished)`` sees every chosen token before it is fed back. A row finished at step s is fed
      a pad token with attention 0 afterwards (it no longer changes anything the caller reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Protocol, Sequence

from .errors import CorpusError, LangNeuronsError

if TYPE_CHECKING:  # torch is imported by the functions that need it (keeps `import langneurons` light)
    import torch
    from torch import nn

    from .corpus import Example

__all__ = [
    "END_OF_TURN_TOKENS", "Encoded", "GenerateConfig", "Generation", "input_device", "pad_id", "stop_token_ids",
    "use_chat", "render_prompt", "encode_prompt", "encode_example", "generate", "derive_seed",
]

#: end-of-turn markers of common chat templates; each is a stop token when the tokenizer knows it
#: as an added (special) token
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|eot|>", "<|end_of_turn|>")


# --------------------------------------------------------------------------------------------
# devices and token ids
# --------------------------------------------------------------------------------------------
def input_device(model: "nn.Module") -> "torch.device":
    """The device of the input embeddings: where input ids must go (also with ``device_map``)."""
    return model.get_input_embeddings().weight.device


def pad_id(tokenizer: Any) -> int:
    """The pad id (the EOS id when the tokenizer has no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise LangNeuronsError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def stop_token_ids(model: "nn.Module | None", tokenizer: Any) -> list[int]:
    """Sorted ids that end a generation: EOS of the model's generation config, of its config and
    of the tokenizer, plus the end-of-turn tokens of `END_OF_TURN_TOKENS` the tokenizer has as
    added tokens (an instruction model ends its turn with them, not always with EOS)."""
    ids: set[int] = set()
    if model is not None:
        gc = getattr(model, "generation_config", None)
        ids.update(_ids(getattr(gc, "eos_token_id", None)))
        ids.update(_ids(getattr(getattr(model, "config", None), "eos_token_id", None)))
    ids.update(_ids(getattr(tokenizer, "eos_token_id", None)))
    added = {}
    get_added = getattr(tokenizer, "get_added_vocab", None)
    if callable(get_added):
        try:
            added = dict(get_added())
        except (TypeError, ValueError, AttributeError):
            added = {}
    for token in END_OF_TURN_TOKENS:
        if token in added:
            ids.add(int(added[token]))
    return sorted(ids)


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def use_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Whether to apply the chat template: ``None`` -> when the tokenizer has one; ``True``
    without a template is an error (silently sending a raw prompt would change the results)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return has
    if chat and not has:
        raise LangNeuronsError("--chat was asked for but the tokenizer has no chat template; use --no-chat")
    return bool(chat)


def render_prompt(tokenizer: Any, user_text: str, chat: bool) -> tuple[str, bool]:
    """The model input for one user message, and whether the tokenizer should add its special
    tokens. A rendered chat template already holds the BOS (if any), so its text is tokenised
    as is; a plain prompt gets the tokenizer's special tokens (as training tokenises it)."""
    if not chat:
        return user_text, True
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True)
    return str(text), False


def encode_prompt(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a (rendered) prompt."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


# --------------------------------------------------------------------------------------------
# examples with token roles (recording and evaluation)
# --------------------------------------------------------------------------------------------
class _EncodeSettings(Protocol):
    scope: str
    include_special: bool
    separator: str


@dataclass
class Encoded:
    input_ids: list[int]
    counted: list[bool]  # which positions are counted
    doc_index: int = 0  # index among the language's counted documents (before shard/rank split)


def encode_example(tokenizer: Any, ex: "Example", cfg: _EncodeSettings, max_length: int) -> tuple[Encoded, bool]:
    """Tokenise one example and mark its counted tokens. Returns (encoded, truncated).

    ``cfg`` is anything with ``scope`` ("all" | "response"), ``include_special`` and
    ``separator`` (a `record.RecordConfig`). In the response scope a token is counted iff its
    character span starts at or after the response's first character (one pass, no boundary
    re-tokenisation); special tokens are counted only with ``include_special``.
    """
    if cfg.scope == "response":
        if not ex.is_pair:
            raise CorpusError(f"{ex.source or ex.lang}: the 'response' scope needs prompt/response pairs, "
                              "but this example is plain text; use --scope all")
        text = ex.prompt + cfg.separator + ex.response  # type: ignore[operator]
        boundary = len(ex.prompt) + len(cfg.separator)  # type: ignore[arg-type]
    else:
        text = ex.text if not ex.is_pair else ex.prompt + cfg.separator + ex.response  # type: ignore[operator]
        boundary = 0
    if not getattr(tokenizer, "is_fast", False) and cfg.scope == "response":
        raise LangNeuronsError("the 'response' scope needs a fast tokenizer (character offsets); "
                               "load the model with a tokenizer.json")
    enc = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True,
                    return_offsets_mapping=cfg.scope == "response", truncation=False)
    ids: list[int] = list(enc["input_ids"])
    special: list[int] = list(enc.get("special_tokens_mask") or [0] * len(ids))
    counted = [cfg.include_special or not s for s in special]
    if cfg.scope == "response":
        offsets = enc["offset_mapping"]
        counted = [c and not s and start >= boundary and end > start
                   for c, s, (start, end) in zip(counted, special, offsets)]
    truncated = len(ids) > max_length
    if truncated:
        ids, counted = ids[:max_length], counted[:max_length]
    return Encoded(ids, counted), truncated


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    """Settings of `generate` (all recorded by the stages that use it)."""

    max_new_tokens: int = 64
    do_sample: bool = False  # False: greedy (argmax)
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only; 1: off
    top_k: int = 0  # sampling only; 0: off
    seed: int = 0  # sampling only; each batch draws from a generator seeded by (seed, desc, batch)
    batch_size: int = 8  # prompts per batch (x num_return_sequences rows)
    num_return_sequences: int = 1
    chat: bool | None = False  # apply the chat template (None: when the tokenizer has one)

    def validate(self) -> "GenerateConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LangNeuronsError(msg)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"--max-new-tokens must be >= 1, got {self.max_new_tokens!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"--batch-size must be >= 1, got {self.batch_size!r}")
        need(isinstance(self.num_return_sequences, int) and self.num_return_sequences >= 1,
             f"num_return_sequences must be >= 1, got {self.num_return_sequences!r}")
        need(self.do_sample or self.num_return_sequences == 1,
             "num_return_sequences > 1 needs sampling (greedy decoding repeats one answer)")
        need(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0,
             f"--temperature must be > 0, got {self.temperature!r}")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k!r}")
        return self


@dataclass(frozen=True)
class Generation:
    """One generated continuation."""

    prompt_index: int  # index of its prompt in the input
    sample: int  # 0..num_return_sequences-1
    prompt: str  # the rendered prompt (chat template applied)
    prompt_ids: list[int]
    token_ids: list[int]  # the new tokens, without the stop token
    text: str  # decoded new tokens only (special tokens skipped; a leading space kept)
    stop: str  # "eos" (a stop token ended it) | "length" (max_new_tokens reached)
    stop_token_id: int | None = None  # the stop token that ended it ("eos")

    @property
    def num_tokens(self) -> int:
        """Number of new tokens (without the stop token)."""
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.stop == "eos"


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def decode_new(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int],
               prompt_text: str | None = None) -> str:
    """The text of ``new_ids`` as it reads after the prompt: decode(prompt + new) minus
    decode(prompt). Decoding the new ids alone drops a leading SentencePiece space; if the
    decoded prompt is not a prefix of the whole (a rare merge across the boundary), the new ids
    are decoded alone."""
    if not new_ids:
        return ""
    prompt_text = tokenizer.decode(list(prompt_ids), skip_special_tokens=True) if prompt_text is None else prompt_text
    full = tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    return tokenizer.decode(list(new_ids), skip_special_tokens=True)


def _forward_kwargs(model: "nn.Module") -> tuple[str, bool, bool]:
    """(name of the cache argument, accepts position_ids, accepts logits_to_keep)."""
    params = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    return cache_name, "position_ids" in params, "logits_to_keep" in params


def _new_cache(model: "nn.Module") -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _choose(logits: "torch.Tensor", cfg: GenerateConfig, gen: "torch.Generator | None") -> "torch.Tensor":
    """Next token per row from float32 last-position logits [B, V]."""
    import torch

    if not cfg.do_sample:
        return logits.argmax(-1)
    scores = logits / float(cfg.temperature)
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if cfg.top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
        # (at least one); the transformers rule (ascending sort, drop cumulative <= 1 - top_p)
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= (1.0 - float(cfg.top_p))
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def generate(model: "nn.Module", tokenizer: Any, prompts: Sequence[str], config: GenerateConfig | None = None, *,
             rendered: bool = False, add_special_tokens: bool | None = None,
             batch_context: Callable[[int], ContextManager[Any]] | None = None,
             on_batch: Callable[[list[int]], None] | None = None,
             on_step: Callable[[int, "torch.Tensor", "torch.Tensor"], None] | None = None,
             progress: bool = False, desc: str = "generate", **overrides: Any) -> list[Generation]:
    """Continue every prompt; returns ``len(prompts) * num_return_sequences`` generations, prompt
    major (generation ``i * n + s`` is sample s of prompt i), in input order.

    prompts: user messages, rendered with the chat template when ``config.chat`` says so; with
        ``rendered=True`` they are used as they are (``add_special_tokens`` then says whether
        the tokenizer adds BOS; default: yes).
    overrides: fields of `GenerateConfig` (``max_new_tokens=16, do_sample=True, ...``).
    batch_context(width): a context manager held while one batch decodes (width = padded
        prompt length), e.g. ``lambda w: deactivate(model, mask, positions="generated",
        prompt_length=w)``.
    on_batch(rows): the output indices of the next batch's rows (before its prefill).
    on_step(step, new_ids, finished): after token ``step`` (0-based) is chosen for every row of
        the batch: ``new_ids`` [rows] (pad id for rows finished earlier), ``finished`` [rows]
        bool (True for rows that are done, including the ones that just chose a stop token).
        The next forward feeds ``new_ids`` of the rows that are not finished.
    """
    import torch

    cfg = GenerateConfig(**{**(config.__dict__ if config is not None else {}), **overrides}).validate()
    chat = False if rendered else use_chat(tokenizer, cfg.chat)
    if rendered:
        texts = [str(p) for p in prompts]
        special = True if add_special_tokens is None else bool(add_special_tokens)
    else:
        pairs = [render_prompt(tokenizer, str(p), chat) for p in prompts]
        texts = [t for t, _ in pairs]
        special = (not chat) if add_special_tokens is None else bool(add_special_tokens)
    encoded = [encode_prompt(tokenizer, t, special) for t in texts]
    empty = [i for i, e in enumerate(encoded) if not e]
    if empty:
        raise LangNeuronsError(f"prompt {empty[0]} tokenises to nothing; give a non-empty prompt "
                               "(or a tokenizer that adds BOS)")
    n = cfg.num_return_sequences
    pad = pad_id(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    device = input_device(model)
    stop_t = torch.tensor(stops or [-1], dtype=torch.long, device=device)
    cache_name, takes_positions, takes_keep = _forward_kwargs(model)
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))  # similar lengths: fewer pads
    batches = [order[j:j + cfg.batch_size] for j in range(0, len(order), cfg.batch_size)]
    out: list[Generation | None] = [None] * (len(texts) * n)
    prompt_texts = [tokenizer.decode(e, skip_special_tokens=True) for e in encoded]
    iterator: Iterable[Any] = enumerate(batches)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(batches), desc=desc, file=sys.stderr, leave=False)
    was_training = model.training
    model.eval()
    try:
        for b, idx in iterator:
            rows = [(i, s) for i in idx for s in range(n)]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (i, _) in enumerate(rows):
                row = encoded[i]
                ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
                attn[r, width - len(row):] = 1
            gen = None
            if cfg.do_sample:
                gen = torch.Generator(device=device)
                gen.manual_seed(derive_seed(cfg.seed, desc, b))
            if on_batch is not None:
                on_batch([i * n + s for i, s in rows])
            ctx = batch_context(width) if batch_context is not None else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                new = _decode_batch(model, ids.to(device), attn.to(device), cfg, gen, pad, stop_t, cache_name,
                                    takes_positions, takes_keep, on_step)
            for r, (i, s) in enumerate(rows):
                tokens = new[r]
                cut = next((p for p, t in enumerate(tokens) if t in stops), None)
                stop_id = tokens[cut] if cut is not None else None
                tokens = tokens[:cut] if cut is not None else tokens
                out[i * n + s] = Generation(
                    prompt_index=i, sample=s, prompt=texts[i], prompt_ids=list(encoded[i]), token_ids=tokens,
                    text=decode_new(tokenizer, encoded[i], tokens, prompt_texts[i]),
                    stop="eos" if cut is not None else "length", stop_token_id=stop_id)
    finally:
        model.train(was_training)
    return [g for g in out if g is not None]


def _decode_batch(model: "nn.Module", ids: "torch.Tensor", attn: "torch.Tensor", cfg: GenerateConfig,
                  gen: "torch.Generator | None", pad: int, stop_t: "torch.Tensor", cache_name: str,
                  takes_positions: bool, takes_keep: bool,
                  on_step: Callable[[int, "torch.Tensor", "torch.Tensor"], None] | None) -> list[list[int]]:
    """The KV-cached decode loop of one left-padded batch; new token ids per row (a row's list
    ends at its stop token, included)."""
    import torch

    B = ids.shape[0]
    cache = _new_cache(model)
    positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    chosen: list[torch.Tensor] = []
    step_ids, step_pos = ids, positions
    for step in range(cfg.max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": attn, cache_name: cache, "use_cache": True}
        if takes_positions:
            kwargs["position_ids"] = step_pos
        if takes_keep:
            kwargs["logits_to_keep"] = 1
        logits = model(**kwargs).logits[:, -1, :].float()
        token = _choose(logits, cfg, gen).to(ids.device)
        token = torch.where(finished, torch.full_like(token, pad), token)
        done_now = ~finished & torch.isin(token, stop_t)
        finished = finished | done_now
        chosen.append(token)
        if on_step is not None:
            on_step(step, token, finished.clone())
        if bool(finished.all()) or step + 1 == cfg.max_new_tokens:
            break
        live = (~finished).long()
        step_ids = torch.where(finished, torch.full_like(token, pad), token).unsqueeze(1)
        attn = torch.cat([attn, live.unsqueeze(1)], dim=1)
        step_pos = positions[:, -1:] + 1
        positions = step_pos
    toks = torch.stack(chosen, 1).cpu().tolist()
    stops = set(stop_t.cpu().tolist())
    result: list[list[int]] = []
    for row in toks:
        cut = next((p for p, t in enumerate(row) if t in stops), None)
        result.append(row if cut is None else row[:cut + 1])
    return result
