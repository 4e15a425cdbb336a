"""Record how often every MLP neuron fires, per language.

Design choices (see docs/pitfalls.md for why each one matters):

* **One forward per example, right padding.** Batches are right padded, so under causal
  attention every real token sees exactly what it would see unbatched: counts do not depend
  on the batch size (tested: batch 1 vs 8 give identical counts).
* **Token roles by character offsets.** In the ``response`` scope the model reads
  ``prompt + separator + response`` in ONE pass; a token is counted iff its character span
  starts at or after the response's first character (tokens straddling the boundary are
  not counted). This equals the published "full minus prefix" two-pass method wherever the
  prompt's tokens are a prefix of the full tokenisation, at half the compute and without its
  negative counts.
* **Chat models' pairs** (``chat``, default: when the tokenizer has a chat template): the prompt
  of a prompt/response pair is rendered with the chat template (as the model reads it when it
  answers), the response follows it directly; plain models read ``prompt + separator +
  response`` (``separator`` default "\n"; the published code uses none: ``--separator ''``).
* **Generated answers** (`TokenExample`, from `langneurons generate`) are counted from their
  token ids: the model reads exactly ``prompt_ids + token_ids`` and exactly the generated
  tokens are counted (no re-tokenisation). `GenerationCounter` counts the same tokens while
  `lm.generate` decodes them (docs/generate.md has the measured agreement).
* **Special tokens** (BOS/EOS added by the tokenizer) are not counted by default
  (``include_special=False``): BOS is the same in every language and would inflate the
  "general" class. The choice is written to the artifact's metadata.
* **No LM head.** Counting runs the transformer body only (`arch.body_of`).
* **Hooks verified.** Every layer's hook must fire once per batch and count exactly the
  masked tokens; a fused kernel or compiled graph that bypasses hooks fails loudly.
* **Resumable.** Finished languages are skipped; inside a language, counts are flushed every
  ``flush_every`` batches to ``stats/.partial/`` (atomically), and a restarted run continues
  after the last flushed batch without double counting.
* **Data parallel.** Under ``torchrun``/``accelerate launch`` each rank counts a
  deterministic shard (example i goes to rank i mod world size) and one
  ``all_reduce(SUM)`` per language combines the counts; rank 0 decides which languages are
  finished (broadcast to all ranks) and is the only writer; every rank flushes its own
  partial file. See `distributed` and docs/scaling.md.
* **Bounded memory.** Besides the model, counting holds O(L·N) numbers per language and
  handles a batch's activations in chunks of `CHUNK_ELEMENTS` (docs/scaling.md has the formula).
* **Per-bucket counts for resampling.** With ``buckets = B > 0`` (default 16) document j of a
  language (its index among the language's counted documents, the same on every shard and
  rank) goes to bucket ``j mod B``, and the counts are also kept per bucket (O(B·L·N) more).
  Totals are the sums of the buckets by construction (each chunk's count is added to both), so
  bootstrap / permutation resamples of documents (`langneurons.confidence`) need no per-token
  activations. Buckets are all-reduced, flushed and resumed like the totals.
* **Long sequences are truncated** to the model's context (or ``max_length``) with a warning,
  not windowed: a window would restart the context mid-document.
* **Bad input is refused**: a language whose examples all tokenize to nothing is an error
  (never a zero-token stats file); a damaged partial file is warned about and its language
  starts over; a damaged stats file stops the run, naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from . import __version__, distributed
from .arch import ActivationSites, body_of, locate_activations
from .corpus import Corpus, Example
from .errors import CorpusError, LangNeuronsError, StatsError
from .lm import Encoded, encode_example, render_prompt, use_chat  # noqa: F401  (re-exported: record.encode_example)
from .runs import RunDir
from .stats import ActivationStats, LanguageStats, read_manifest_checked

log = logging.getLogger(__name__)
Scope = Literal["all", "response"]


@dataclass
class RecordConfig:
    """How tokens are chosen and batched. Everything that changes the counts is recorded."""

    scope: Scope = "all"
    batch_size: int = 8
    max_length: int | None = None  # truncate longer sequences (warned); default: model context
    max_tokens_per_lang: int | None = None  # stop adding examples once this many counted tokens
    include_special: bool = False  # count BOS/EOS added by the tokenizer
    separator: str = "\n"  # between prompt and response of a plain (non-chat) rendering of a pair
    chat: bool | None = None  # render pairs' prompts with the chat template (None: when the tokenizer has one)
    keep_sums: bool = True
    seed: int = 0
    act_path: str | None = None  # --mlp-act-path override
    flush_every: int = 50  # batches between partial flushes (0: only at the end of a language)
    shard: tuple[int, int] | None = None  # (i, n): count only examples with index % n == i
    buckets: int = 16  # per-bucket counts (document j -> bucket j mod buckets) for resampling; 0: none

    def validate(self) -> "RecordConfig":
        """One-line errors for bad values, the same from Python as from the command line."""
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise LangNeuronsError(message)

        require(self.scope in ("all", "response"), f"--scope must be 'all' or 'response', got {self.scope!r}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.flush_every >= 0,
                f"--flush-every must be >= 0 (0: flush only at the end of a language), got {self.flush_every}")
        require(self.max_tokens_per_lang is None or self.max_tokens_per_lang >= 1,
                f"--max-tokens-per-lang must be >= 1, got {self.max_tokens_per_lang}")
        require(self.max_length is None or self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        require(self.buckets >= 0, f"--buckets must be >= 0 (0: none), got {self.buckets}")
        require(self.act_path is None or "{i}" in self.act_path,
                f"--mlp-act-path must contain {{i}} (the layer index), got {self.act_path!r}")
        if self.shard is not None:
            i, n = self.shard
            require(0 <= i < n, f"--shard {i}/{n}: need 0 <= i < n")
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        d = asdict(self)
        # batch_size, flush_every, keep_sums and buckets do not change the totals (buckets only
        # add a finer split of them), so stats recorded with other values are re-used.
        for k in ("batch_size", "flush_every", "keep_sums", "buckets"):
            d.pop(k)
        # ``chat`` matters for prompt/response pairs only; `record` adds its resolved value there
        # (text corpora keep the keys they had before the option existed)
        d.pop("chat")
        return d


@dataclass(frozen=True)
class TokenExample(Example):
    """A prompt/response pair given as the token ids the model read and wrote (a generated
    answer): counted from the ids, never re-tokenised. ``prompt`` and ``response`` keep the
    texts for messages and reports."""

    prompt_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()


class ResponseCorpus(Corpus):
    """A corpus of `TokenExample` per language; its fingerprint is that of the token ids (the
    texts alone would not say which tokens were counted)."""

    def fingerprint(self, lang: str) -> str:
        from .stage import input_key

        return input_key([[list(e.prompt_ids), list(getattr(e, "token_ids", ()))]  # type: ignore[attr-defined]
                          for e in self.by_lang[lang]])[:16]


def encode_tokens(ex: TokenExample, scope: str, special_ids: set[int], max_length: int) -> tuple[Encoded, bool]:
    """``prompt_ids + token_ids``; counted: exactly the generated tokens (``response`` scope),
    or every token that is not a special token (``all``)."""
    ids = [int(t) for t in ex.prompt_ids] + [int(t) for t in ex.token_ids]
    if scope == "response":
        counted = [False] * len(ex.prompt_ids) + [True] * len(ex.token_ids)
    else:
        counted = [t not in special_ids for t in ids]
    truncated = len(ids) > max_length
    if truncated:
        ids, counted = ids[:max_length], counted[:max_length]
    return Encoded(ids, counted), truncated


def encode_chat_pair(tokenizer: Any, ex: Example, scope: str, include_special: bool,
                     max_length: int) -> tuple[Encoded, bool]:
    """A prompt/response pair as a chat model reads it: the prompt rendered with the chat
    template (generation prompt included, e.g. ``<|im_start|>assistant\n``), the response right
    after it, tokenised in ONE pass without added special tokens (the rendered template holds
    its own BOS). Token roles by character offsets as in `lm.encode_example`: in the response
    scope a token is counted iff it starts at or after the response's first character; tokens
    of the tokenizer's special vocabulary (BOS, ``<|im_start|>`` ...) are never counted unless
    ``include_special`` (all scope)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LangNeuronsError("rendering pairs with the chat template needs a fast tokenizer (character offsets); "
                               "load the model with a tokenizer.json, or pass --no-chat")
    rendered, _ = render_prompt(tokenizer, ex.prompt or "", True)
    text = rendered + (ex.response or "")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids: list[int] = list(enc["input_ids"])
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special = [t in special_ids for t in ids]
    if scope == "response":
        boundary = len(rendered)
        counted = [not s and start >= boundary and end > start
                   for s, (start, end) in zip(special, enc["offset_mapping"])]
    else:
        counted = [include_special or not s for s in special]
    truncated = len(ids) > max_length
    if truncated:
        ids, counted = ids[:max_length], counted[:max_length]
    return Encoded(ids, counted), truncated


#: activations handled at once by the counting hook (rows x neurons); the hook's transient memory
#: is at most CHUNK_ELEMENTS * (dtype bytes + 17) bytes, about 300 MB.
CHUNK_ELEMENTS = 1 << 24


class _Counter:
    """Forward hooks that add per-layer counts of the masked tokens (kept on each layer's device).

    With ``num_buckets`` > 0 the counted rows of a batch are grouped by their document's bucket
    (`set_batch`), and every chunk's count is added both to the total and to its bucket, so the
    buckets sum to the totals exactly, by construction.
    """

    def __init__(self, sites: ActivationSites, keep_sums: bool, num_buckets: int = 0):
        self.sites = sites
        self.keep_sums = keep_sums
        self.num_buckets = int(num_buckets)
        self.positive: list[torch.Tensor | None] = [None] * sites.num_layers
        self.sums: list[torch.Tensor | None] = [None] * sites.num_layers
        self.bucket_positive: list[torch.Tensor | None] = [None] * sites.num_layers
        self.fired = [0] * sites.num_layers
        self.counted_rows = [0] * sites.num_layers
        self.shapes: list[tuple[int, ...]] = [()] * sites.num_layers
        self.flat_index: torch.Tensor | None = None
        self._index_on: dict[torch.device, torch.Tensor] = {}
        self.segments: list[tuple[int, torch.Tensor]] | None = None
        self._segments_on: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}

    def set_batch(self, flat_index: torch.Tensor, row_bucket: torch.Tensor | None = None) -> None:
        """``flat_index``: the counted rows of the flattened [B*T] batch; ``row_bucket``: each
        counted row's bucket (same length), or None without buckets."""
        self.flat_index = flat_index
        self._index_on = {flat_index.device: flat_index}
        self.fired = [0] * self.sites.num_layers
        self.counted_rows = [0] * self.sites.num_layers
        self.segments, self._segments_on = None, {}
        if self.num_buckets and row_bucket is not None:
            # Rows of one bucket together (stable, so each segment keeps increasing row order):
            # one count per (bucket, chunk), at most min(batch size, B) segments per batch.
            row_bucket = row_bucket.to(torch.int64).cpu()
            order = torch.argsort(row_bucket, stable=True)
            keys, sizes = torch.unique_consecutive(row_bucket[order], return_counts=True)
            rows = flat_index.cpu()[order]
            self.segments = list(zip(keys.tolist(), rows.split(sizes.tolist())))
            self._segments_on = {torch.device("cpu"): self.segments}

    def __call__(self, layer: int, out: torch.Tensor) -> None:
        assert self.flat_index is not None
        dev = out.device
        idx = self._index_on.get(dev)
        if idx is None:
            idx = self._index_on[dev] = self.flat_index.to(dev)
        width = out.shape[-1]
        flat = out.reshape(-1, width)
        if self.positive[layer] is None:
            self.positive[layer] = torch.zeros(width, dtype=torch.int64, device=dev)
            if self.keep_sums:
                self.sums[layer] = torch.zeros(width, dtype=torch.float64, device=dev)
            if self.num_buckets:
                self.bucket_positive[layer] = torch.zeros(self.num_buckets, width, dtype=torch.int64, device=dev)
        positive, sums = self.positive[layer], self.sums[layer]
        # In chunks of counted rows: (acts > 0).sum() and sum(dtype=float64) materialise int64 /
        # float64 copies of their input, 8 bytes per element; for a 70B model's batch of 32k
        # tokens x 28,672 neurons that would be 7.5 GB per layer. Chunks bound it (docs/scaling.md).
        rows = max(1, CHUNK_ELEMENTS // max(width, 1))
        if self.segments is None:
            for part in idx.split(rows):
                acts = flat.index_select(0, part)
                positive += (acts > 0).sum(0)  # type: ignore[operator]
                if self.keep_sums:
                    sums += acts.sum(0, dtype=torch.float64)  # type: ignore[operator]
        else:
            segments = self._segments_on.get(dev)
            if segments is None:
                segments = self._segments_on[dev] = [(b, seg.to(dev)) for b, seg in self.segments]
            bucket_positive = self.bucket_positive[layer]
            for b, seg in segments:
                for part in seg.split(rows):
                    acts = flat.index_select(0, part)
                    count = (acts > 0).sum(0)
                    positive += count  # type: ignore[operator]
                    bucket_positive[b] += count  # type: ignore[index]
                    if self.keep_sums:
                        sums += acts.sum(0, dtype=torch.float64)  # type: ignore[operator]
        self.fired[layer] += 1
        self.counted_rows[layer] += int(idx.numel())
        self.shapes[layer] = tuple(out.shape[:-1])  # checked against the batch: one row per token
        return None

    def collect(self, num_neurons: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        L = self.sites.num_layers
        pos = torch.zeros(L, num_neurons, dtype=torch.int64)
        sums = torch.zeros(L, num_neurons, dtype=torch.float64) if self.keep_sums else None
        for layer in range(L):
            if self.positive[layer] is not None:
                pos[layer] = self.positive[layer].cpu()  # type: ignore[union-attr]
                if sums is not None:
                    sums[layer] = self.sums[layer].cpu()  # type: ignore[union-attr]
        return pos, sums

    def collect_buckets(self, num_neurons: int) -> torch.Tensor | None:
        """int64 [B, L, N] per-bucket positive counts (None without buckets)."""
        if not self.num_buckets:
            return None
        L = self.sites.num_layers
        out = torch.zeros(self.num_buckets, L, num_neurons, dtype=torch.int64)
        for layer in range(L):
            if self.bucket_positive[layer] is not None:
                out[:, layer] = self.bucket_positive[layer].cpu()  # type: ignore[union-attr]
        return out


def _dist() -> tuple[int, int]:
    return distributed.rank_world()


def _context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Recorder:
    """Counts positive activations of a loaded model's MLP neurons over examples."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: RecordConfig | None = None,
                 sites: ActivationSites | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or RecordConfig()
        if self.config.include_special and self.config.scope == "response":
            raise LangNeuronsError("--include-special applies to the 'all' scope only: the response scope counts "
                                   "the response's own tokens (drop --include-special, or use --scope all)")
        if self.config.batch_size < 1:
            raise LangNeuronsError(f"--batch-size must be >= 1, got {self.config.batch_size}")
        self.sites = sites or locate_activations(model, self.config.act_path)
        self.body = body_of(model)
        self.identity = ""  # model fingerprint / dtype / hook point, set by record(); part of the partial key
        self.device = model.get_input_embeddings().weight.device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise LangNeuronsError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_id = int(pad)
        ctx = _context_length(model)
        if self.config.max_length is not None:
            if self.config.max_length < 1:
                raise LangNeuronsError(f"--max-length must be >= 1, got {self.config.max_length}")
            if ctx is not None and self.config.max_length > ctx:
                # Learned position embeddings would index out of range (a deep IndexError);
                # rotary ones would run, but on positions the model never saw in training.
                raise LangNeuronsError(f"--max-length {self.config.max_length} exceeds the model's context of "
                                       f"{ctx} tokens; pass --max-length {ctx} or less")
        if self.config.flush_every < 0:
            raise LangNeuronsError(f"--flush-every must be >= 0, got {self.config.flush_every}")
        if isinstance(self.config.buckets, bool) or not isinstance(self.config.buckets, int) \
                or self.config.buckets < 0:
            raise LangNeuronsError(f"--buckets must be an integer >= 0 (0: no per-bucket counts), "
                                   f"got {self.config.buckets!r}")
        # Longer sequences are truncated (warned), not windowed: a window would restart the
        # context mid-document and count tokens in a state the model never sees in use.
        self.max_length = int(self.config.max_length or ctx or 4096)
        # pairs' prompts are rendered with the chat template when the tokenizer has one (None) or
        # when asked (True: an error without a template); text corpora are not affected
        self.chat = use_chat(tokenizer, self.config.chat)
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])

    def encode_one(self, ex: Example) -> tuple[Encoded, bool]:
        """Token ids and counted-token flags of one example, and whether it was truncated."""
        cfg = self.config
        if isinstance(ex, TokenExample):
            return encode_tokens(ex, cfg.scope, self._special_ids, self.max_length)
        if ex.is_pair and self.chat:
            return encode_chat_pair(self.tokenizer, ex, cfg.scope, cfg.include_special, self.max_length)
        return encode_example(self.tokenizer, ex, cfg, self.max_length)

    # -- preparation -----------------------------------------------------------------------
    def encode(self, examples: Sequence[Example], lang: str = "") -> list[Encoded]:
        """Tokenise, drop examples without a counted token, apply the token budget, then
        keep this shard's / this rank's share. Every rank encodes the whole language, so
        the budget and the shard assignment (example j -> rank j mod world) agree across
        ranks and equal a single-process run."""
        cfg = self.config
        rank, world = _dist()
        encoded: list[Encoded] = []
        truncated = empty = 0
        budget = cfg.max_tokens_per_lang
        total = 0
        for ex in examples:
            enc, was_truncated = self.encode_one(ex)
            truncated += was_truncated
            n = sum(enc.counted)
            if n == 0:
                empty += 1
                continue
            enc.doc_index = len(encoded)  # the global index: shards and ranks split by it below
            encoded.append(enc)
            total += n
            if budget is not None and total >= budget:
                break
        where = f"{lang}: " if lang else ""
        what = "responses" if cfg.scope == "response" else "texts"
        if not encoded:
            raise CorpusError(f"{where}none of its {len(examples)} example(s) has a token to count (the {what} "
                              "tokenize to nothing); give that language real text or drop it with --langs")
        if rank == 0:  # every rank sees the same examples: warn once
            if truncated:
                warnings.warn(f"{where}{truncated} example(s) were longer than {self.max_length} tokens and were "
                              "truncated to their first tokens (pass --max-length to change the limit)",
                              stacklevel=2)
            if empty:
                warnings.warn(f"{where}{empty} example(s) had {what} that tokenize to no counted token and "
                              "were skipped", stacklevel=2)
        if cfg.shard is not None:
            i, n = cfg.shard
            encoded = [e for j, e in enumerate(encoded) if j % n == i]
        if world > 1:
            encoded = [e for j, e in enumerate(encoded) if j % world == rank]
        return encoded

    def batches(self, encoded: Sequence[Encoded]) -> list[list[Encoded]]:
        # Length bucketing: sort by length (stable, so ties keep corpus order) to waste few pads.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
        bs = self.config.batch_size
        return [[encoded[i] for i in order[j:j + bs]] for j in range(0, len(order), bs)]

    def _tensors(self, batch: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        counted = torch.zeros((len(batch), T), dtype=torch.bool)
        for b, e in enumerate(batch):
            n = len(e.input_ids)
            ids[b, :n] = torch.tensor(e.input_ids)
            attn[b, :n] = 1
            counted[b, :n] = torch.tensor(e.counted)
        return ids, attn, counted

    # -- counting --------------------------------------------------------------------------
    def count(self, examples: Sequence[Example], *, lang: str = "", partial: Path | None = None,
              progress: bool = True) -> LanguageStats:
        """Count one language's examples. ``partial`` enables flush/resume inside the language.

        Under an initialised process group each rank counts its share and the result is the
        sum over all ranks (identical on every rank). ``partial`` must then name a file of
        this rank's own (`record` appends ``.rank<r>``): ranks flush at different moments.
        """
        encoded = self.encode(examples, lang)
        batches = self.batches(encoded)
        num_buckets = self.config.buckets
        counter = _Counter(self.sites, self.config.keep_sums, num_buckets)
        N = self.sites.num_neurons
        state_key = self._partial_key(encoded)
        start_batch, tokens = 0, 0
        base: LanguageStats | None = None  # flushed counts resumed from
        keep_buckets = num_buckets > 0
        bucket_tokens = torch.zeros(num_buckets, dtype=torch.int64)
        bucket_docs = torch.zeros(num_buckets, dtype=torch.int64)
        if partial is not None and partial.exists():
            resumed = self._read_partial(partial, lang, state_key, len(batches))
            if resumed is not None:
                start_batch, tokens = int(resumed.meta["batches_done"]), resumed.tokens
                base = resumed
                log.info("%s: resuming after batch %d of %d (%d tokens) from %s", lang or "counts", start_batch,
                         len(batches), tokens, partial)
                if keep_buckets and not resumed.has_buckets:
                    # Written by a version without buckets: the totals are still right, the
                    # split of the flushed part into buckets is lost for this language.
                    keep_buckets = False
                    warnings.warn(f"{lang or 'counts'}: the partial counts in {partial} carry no per-bucket counts; "
                                  "resuming without them (`langneurons stability` will need this language "
                                  "recorded again)", stacklevel=2)

        def snapshot() -> LanguageStats:
            """Counts so far (resumed + counted here) as one LanguageStats."""
            pos, sums = counter.collect(N)
            if base is not None:
                pos = pos + base.positive
                if sums is not None and base.sums is not None:
                    sums = sums + base.sums
            out = LanguageStats(lang, pos, tokens, sums, {})
            if keep_buckets:
                bpos, btok, bdocs = counter.collect_buckets(N), bucket_tokens.clone(), bucket_docs.clone()
                if base is not None:
                    bpos = bpos + base.bucket_positive.to(torch.int64)  # type: ignore[union-attr,operator]
                    btok += base.bucket_tokens  # type: ignore[arg-type]
                    bdocs += base.bucket_docs  # type: ignore[arg-type]
                out.bucket_positive, out.bucket_tokens, out.bucket_docs = bpos, btok, bdocs
            return out

        handles = self.sites.add_hooks(counter)
        total_tokens = sum(sum(e.counted) for e in encoded)
        bar = _progress(total_tokens, lang, progress)
        bar.update(tokens)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for bi in range(start_batch, len(batches)):
                    ids, attn, counted = self._tensors(batches[bi])
                    flat = counted.reshape(-1).nonzero().squeeze(1)
                    row_bucket = None
                    if num_buckets:
                        doc_bucket = torch.tensor([e.doc_index % num_buckets for e in batches[bi]], dtype=torch.int64)
                        row_bucket = doc_bucket[flat // counted.shape[1]]
                    counter.set_batch(flat.to(self.device), row_bucket)
                    self.body(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False)
                    n = int(counted.sum())
                    self._verify(counter, n, tuple(ids.shape))
                    if num_buckets:  # after the forward pass: an interrupted batch is not in them
                        bucket_tokens.index_add_(0, doc_bucket, counted.sum(1).to(torch.int64))
                        bucket_docs.index_add_(0, doc_bucket, torch.ones(len(doc_bucket), dtype=torch.int64))
                    tokens += n
                    bar.update(n)
                    bar.set_postfix_str(f"{(tokens) / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
                    if partial is not None and self.config.flush_every and (bi + 1) % self.config.flush_every == 0 \
                            and bi + 1 < len(batches):
                        self._flush(partial, snapshot(), bi + 1, state_key)
        finally:
            for h in handles:
                h.remove()
            bar.close()
        return self._all_reduce(snapshot(), num_buckets)

    def _read_partial(self, partial: Path, lang: str, key: str, num_batches: int) -> LanguageStats | None:
        """The flushed counts to resume from, or None (with a warning naming the file) when
        they are unreadable, corrupt or were made with other settings: that language then
        starts over -- a partial file is never half-trusted."""
        try:
            prev = LanguageStats.load(partial)
        except StatsError as exc:
            warnings.warn(f"{lang or 'counts'}: ignoring partial counts that cannot be used ({exc}); "
                          "starting this language over", stacklevel=3)
            return None
        done = prev.meta.get("batches_done")
        L, N = self.sites.num_layers, self.sites.num_neurons
        if prev.meta.get("partial_key") != key:
            warnings.warn(f"{lang or 'counts'}: partial counts in {partial} were made with other settings "
                          "(batch size, shard, number of processes, corpus or options); starting this language over",
                          stacklevel=3)
            return None
        if not isinstance(done, int) or not 0 < done < num_batches or prev.shape != (L, N) \
                or (self.config.keep_sums and prev.sums is None) \
                or (prev.has_buckets and prev.num_buckets != self.config.buckets):
            warnings.warn(f"{lang or 'counts'}: partial counts in {partial} are inconsistent (batches_done={done!r}, "
                          f"shape {prev.shape}); starting this language over", stacklevel=3)
            return None
        return prev

    def _partial_key(self, encoded: Sequence[Encoded]) -> str:
        h = hashlib.sha256()
        # Counts flushed by another model, dtype or hook point must never be resumed.
        if self.identity:
            h.update(self.identity.encode())
        h.update(json.dumps(self.config.fingerprint_fields(), sort_keys=True, default=str).encode())
        h.update(str(self.config.batch_size).encode())
        if self.config.buckets:  # (nothing added without buckets: older partial files stay valid)
            h.update(f"buckets {self.config.buckets}".encode())
        rank, world = _dist()
        h.update(f"rank {rank}/{world}".encode())
        h.update(f"layers {self.sites.num_layers} x {self.sites.num_neurons}".encode())
        for e in encoded:
            h.update(str(len(e.input_ids)).encode())
            h.update(bytes(e.counted))
            h.update(json.dumps(e.input_ids).encode())
        return h.hexdigest()[:16]

    def _flush(self, partial: Path, counts: LanguageStats, batches_done: int, key: str) -> None:
        counts.meta = {"partial_key": key, "batches_done": batches_done}
        with _writing(partial):
            counts.save(partial)

    def _verify(self, counter: _Counter, n: int, batch_shape: tuple[int, ...] | None = None) -> None:
        bad = [layer for layer, f in enumerate(counter.fired) if f != 1]
        if bad:
            raise LangNeuronsError(
                f"the activation hooks of layers {bad[:5]} fired {[counter.fired[b] for b in bad[:5]]} times in one "
                "forward pass (expected once): a fused kernel, torch.compile or a shared module bypasses them; "
                "disable compilation or pass --mlp-act-path")
        if batch_shape is not None:
            ok = {batch_shape, (batch_shape[0] * batch_shape[1],)}  # [B, T, N], or [B*T, N] (OPT)
            odd = [layer for layer, s in enumerate(counter.shapes) if s not in ok]
            if odd:
                raise LangNeuronsError(
                    f"the activation of layers {odd[:5]} has shape {list(counter.shapes[odd[0]])} + [N], not "
                    f"{list(batch_shape)} + [N] (one row per token); this model lays out activations differently "
                    "(packed sequences?) and cannot be counted safely")
        wrong = [layer for layer, c in enumerate(counter.counted_rows) if c != n]
        if wrong:
            raise LangNeuronsError(f"layers {wrong[:5]} counted a different number of tokens than the mask holds "
                                   f"({n}); the activation does not have one row per token")

    def _all_reduce(self, counts: LanguageStats, num_buckets: int) -> LanguageStats:
        """One SUM reduction of the int64 counts and one of the float64 sums: exact for the
        counts, whatever the number of ranks.

        Packed int64 layout: [tokens, lacks_buckets, bucket_tokens (B), bucket_docs (B),
        positive (L·N), bucket_positive (B·L·N)]. Every rank sends the same layout (B comes from
        the shared config); a rank whose counts lost their buckets (resumed from an old partial
        file) sends zeros and lacks_buckets = 1, and then the result keeps the totals only -- on
        every rank alike, so no rank waits in a collective the others skip."""
        rank, world = _dist()
        if world == 1:
            return counts
        shape = counts.positive.shape
        has = counts.has_buckets
        B = num_buckets
        zeros_b = torch.zeros(B, dtype=torch.int64)
        parts = [torch.tensor([counts.tokens, 0 if has or not B else 1], dtype=torch.int64),
                 counts.bucket_tokens.to(torch.int64) if has else zeros_b,  # type: ignore[union-attr]
                 counts.bucket_docs.to(torch.int64) if has else zeros_b,  # type: ignore[union-attr]
                 counts.positive.reshape(-1).to(torch.int64),
                 counts.bucket_positive.reshape(-1).to(torch.int64) if has  # type: ignore[union-attr]
                 else torch.zeros(B * counts.positive.numel(), dtype=torch.int64)]
        packed = torch.cat(parts)
        tensors = [packed] + ([counts.sums.to(torch.float64)] if counts.sums is not None else [])
        reduced = distributed.all_reduce_sum(tensors)
        flat = reduced[0]
        total, lacking = int(flat[0]), int(flat[1])
        at = 2
        bucket_tokens, at = flat[at:at + B], at + B
        bucket_docs, at = flat[at:at + B], at + B
        pos, at = flat[at:at + counts.positive.numel()].reshape(shape), at + counts.positive.numel()
        out = LanguageStats(counts.lang, pos, total, reduced[1] if counts.sums is not None else None, {})
        if B and not lacking:
            out.bucket_positive = flat[at:].reshape(B, *shape)
            out.bucket_tokens, out.bucket_docs = bucket_tokens, bucket_docs
        elif B and rank == 0:
            warnings.warn(f"{counts.lang or 'counts'}: {lacking} process(es) resumed from partial counts without "
                          "per-bucket counts; keeping the totals only (`langneurons stability` will need this "
                          "language recorded again)", stacklevel=3)
        return out


class GenerationCounter:
    """Counts the activations of generated tokens while `lm.generate` decodes them.

    With a KV cache the model computes the activations of generated token t when it is fed
    back, in the forward pass that chooses token t + 1; so hooking that pass counts exactly the
    response tokens at no extra model work, except for the last token of an answer cut by the
    length limit (never fed back): the caller generates one token more than it keeps
    (`GenerateStage` does), so that one more decoding step covers it. Prompt tokens (the
    prefill), pads, the stop token and rows that finished earlier are never counted.

    Use: ``with counter.hooks(): lm.generate(..., on_batch=counter.on_batch,
    on_step=counter.on_step)``, then ``counter.stats(lang)``. Self-checks after every decoding
    pass: every layer's hook fired exactly once and counted exactly the rows fed; at the end
    `row_tokens` (tokens counted per output index) is compared with the answers by the caller.

    The counts are those of a KV-cached, left-padded, one-token-at-a-time computation; a
    separate right-padded pass over ``prompt_ids + token_ids`` computes the same activations
    up to floating-point rounding, so a sign can differ where an activation is within rounding
    of zero (measured in docs/generate.md; compared token by token in tests/test_generate.py).
    """

    def __init__(self, model: nn.Module, config: RecordConfig | None = None, sites: ActivationSites | None = None):
        self.config = config or RecordConfig(scope="response")
        self.sites = sites or locate_activations(model, self.config.act_path)
        self.device = model.get_input_embeddings().weight.device
        self.num_buckets = int(self.config.buckets)
        self.counter = _Counter(self.sites, self.config.keep_sums, self.num_buckets)
        self.row_tokens: dict[int, int] = {}  # output index -> counted tokens
        self.rows: list[int] = []  # output indices of the batch being decoded
        self._pending: list[int] | None = None  # batch rows the next forward pass feeds

    @contextlib.contextmanager
    def hooks(self) -> Iterator["GenerationCounter"]:
        handles = self.sites.add_hooks(self.counter)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._close()

    def on_batch(self, rows: list[int]) -> None:
        """Before a batch's prefill: its prompt tokens are not counted."""
        self._close()
        self.rows = list(rows)
        for out in self.rows:
            self.row_tokens.setdefault(out, 0)
        self._open([])

    def on_step(self, step: int, new_ids: torch.Tensor, finished: torch.Tensor) -> None:
        """After a token is chosen for every row: the next pass feeds the rows not finished."""
        self._close()
        self._open((~finished).nonzero().squeeze(1).tolist())

    def _open(self, live: list[int]) -> None:
        flat = torch.tensor(live, dtype=torch.int64)
        row_bucket = None
        if self.num_buckets:
            row_bucket = torch.tensor([self.rows[r] % self.num_buckets for r in live], dtype=torch.int64)
        self.counter.set_batch(flat.to(self.device), row_bucket)
        self._pending = live

    def _close(self) -> None:
        """Account for the pass that was set up, if it ran (after the last step of a batch the
        decoder stops without another pass: then no hook fired and nothing was counted)."""
        live, self._pending = self._pending, None
        if live is None or not any(self.counter.fired):
            return
        bad = [layer for layer, f in enumerate(self.counter.fired) if f != 1]
        wrong = [layer for layer, c in enumerate(self.counter.counted_rows) if c != len(live)]
        if bad or wrong:
            raise LangNeuronsError(f"counting during generation: the activation hooks of layers {(bad or wrong)[:5]} "
                                   "did not fire once per decoding step with one row per token (a fused kernel or "
                                   "compiled graph?); use the separate counting pass (--counting pass)")
        for r in live:
            self.row_tokens[self.rows[r]] += 1

    def stats(self, lang: str = "") -> LanguageStats:
        """The counts so far as one language's stats (buckets by output index mod B)."""
        self._close()
        N = self.sites.num_neurons
        pos, sums = self.counter.collect(N)
        out = LanguageStats(lang, pos, int(sum(self.row_tokens.values())), sums, {})
        if self.num_buckets:
            btok = torch.zeros(self.num_buckets, dtype=torch.int64)
            bdocs = torch.zeros(self.num_buckets, dtype=torch.int64)
            for doc, n in self.row_tokens.items():
                if n:  # like `Recorder.encode`: a document without a counted token is not a document
                    btok[doc % self.num_buckets] += n
                    bdocs[doc % self.num_buckets] += 1
            out.bucket_positive, out.bucket_tokens, out.bucket_docs = self.counter.collect_buckets(N), btok, bdocs
        return out


def _progress(total: int, lang: str, enabled: bool) -> Any:
    import sys

    from tqdm.auto import tqdm

    # In a batch job's log file (no terminal) a bar redrawn 10 times a second buries
    # everything else: redraw every 30 s there.
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, desc=f"record {lang}", unit="tok", unit_scale=True, disable=not enabled,
                leave=False, dynamic_ncols=True, mininterval=0.1 if interactive else 30.0)


def versions() -> dict[str, str]:
    import transformers

    return {"langneurons": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _in_memory_fingerprint(model: nn.Module) -> str:
    """Identity of a model given as an object (no files to hash): its config plus a sample of
    its weights. The config alone would call two fine-tunes of one base model (or two random
    inits) the same model, and their counts would be merged or resumed into each other."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    params = [(name, p) for name, p in model.named_parameters() if p.device.type != "meta"]
    step = max(len(params) // 8, 1)
    with torch.no_grad():
        for name, p in params[::step]:
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[:1024].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_meta(model: nn.Module, sites: ActivationSites, model_id: str, fingerprint: str | None = None) -> dict:
    cfg = model.config
    if fingerprint is None:
        fingerprint = _in_memory_fingerprint(model)
    dtype = next(model.parameters()).dtype
    return {
        "model": model_id,
        "model_fingerprint": fingerprint,
        "revision": getattr(cfg, "_commit_hash", None),
        "architecture": getattr(cfg, "model_type", type(model).__name__),
        "family": sites.family,
        "hook_point": sites.hook_point,
        "num_layers": sites.num_layers,
        "num_neurons": sites.num_neurons,
        "dtype": str(dtype).replace("torch.", ""),
    }


def partial_identity(model_fingerprint: str, dtype: str, hook_point: str) -> str:
    """What makes flushed partial counts re-usable besides the settings: the same model,
    dtype and hook point (`Recorder.identity`)."""
    return json.dumps({"model_fingerprint": model_fingerprint, "dtype": dtype, "hook_point": hook_point},
                      sort_keys=True)


def record(model: nn.Module, tokenizer: Any, corpus: Corpus, out: str | Path, config: RecordConfig | None = None,
           *, model_id: str = "", model_fingerprint: str | None = None, force: bool = False,
           progress: bool = True, redo_stale: bool = False, by: str = "record",
           counted: Mapping[str, LanguageStats] | None = None) -> ActivationStats:
    """Record every language of ``corpus`` into the run directory ``out`` (resumable).

    A language already recorded with the same settings is skipped; one recorded with other
    settings is an error (it would be silently replaced), unless ``redo_stale`` (what
    `langneurons run` uses when its own settings changed) records it again.

    Data parallel when launched by torchrun/accelerate (see `distributed`): every rank calls
    this with the same arguments; rank 0 decides which languages are finished and is the
    only writer; every rank returns the same (all-reduced) stats.

    counted: counts made elsewhere of exactly these examples' counted tokens (the counts
    `GenerationCounter` made while the answers were generated): a language that is not already
    recorded takes them instead of a counting pass; everything else (checks, metadata, resume,
    the stage record) is as for counted languages. Single process only.
    """
    from .arch import is_moe

    if is_moe(model):  # neurons inside experts: per-expert denominators and router statistics
        from .moe import record_moe

        if counted is not None:
            raise LangNeuronsError("counting during generation is not supported for mixture-of-experts models; "
                                   "use --counting pass")

        return record_moe(model, tokenizer, corpus, out, config, model_id=model_id, model_fingerprint=model_fingerprint,
                          force=force, progress=progress, redo_stale=redo_stale, by=by)
    config = (config or RecordConfig()).validate()
    t_start = time.perf_counter()
    recorder = Recorder(model, tokenizer, config)
    run = RunDir(out)
    rank, world = distributed.init_from_env(str(recorder.device))
    if counted is not None and world > 1:
        raise LangNeuronsError("counts made during generation are taken by a single process; run without torchrun")
    fields = config.fingerprint_fields()
    if any(e.is_pair and not isinstance(e, TokenExample) for exs in corpus.by_lang.values() for e in exs):
        fields["chat"] = recorder.chat  # pairs are read through the chat template (or not): part of the key
    if counted is not None:
        fields["counting"] = "generation"  # counted while decoding, not in a separate pass
    base_meta = {
        **model_meta(model, recorder.sites, model_id or getattr(model.config, "_name_or_path", ""), model_fingerprint),
        "scope": config.scope,
        "include_special": config.include_special,
        "record_config": fields,
        "shard": None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}",
        "versions": versions(),
        "seed": config.seed,
        "buckets": config.buckets,
    }
    torch.manual_seed(config.seed)

    distributed.agree(lambda: check_run_dir(run, base_meta["model_fingerprint"], force))
    recorder.identity = partial_identity(base_meta["model_fingerprint"], base_meta["dtype"], base_meta["hook_point"])
    parts: list[LanguageStats] = []
    speed = [0, 0.0]  # counted tokens and seconds of the languages counted in this call
    for lang in corpus.languages:
        path = run.stats_path(lang)
        meta = dict(base_meta, corpus_fingerprint=corpus.fingerprint(lang), corpus=corpus.source)

        def finished(path: Path = path, meta: dict = meta) -> LanguageStats | None:
            """Rank 0: the stats already written for this language, if they can be re-used."""
            if not path.exists() or force:
                return None
            try:
                checksums = read_manifest_checked(run).get("checksums", {})
                prev = LanguageStats.load(path, checksums.get(f"stats/{path.stem}.safetensors"))
            except StatsError as exc:
                raise StatsError(f"{exc} (or pass --force to record everything again)") from None
            if resume_key(prev.meta) == resume_key(meta):
                return prev
            if redo_stale:
                log.warning("%s: recorded with other settings; recording it again", path.stem)
                return None
            raise StatsError(f"{path} was recorded with other settings (model, scope, corpus or options); "
                             "use another --out, or --force to overwrite")

        # Every rank must take the same branch, or the others would wait forever in all_reduce.
        prev = distributed.agree(finished)
        partial = run.stats_dir / ".partial" / f"{lang}{'' if world == 1 else f'.rank{rank}'}.safetensors"
        if prev is not None:
            log.info("%s: already recorded (%d tokens), skipping", lang, prev.tokens)
            partial.unlink(missing_ok=True)  # left behind by a rank that died after rank 0 wrote
            if rank == 0:
                _remove_partials(run.stats_dir, lang)
            parts.append(prev)
            continue
        if force:  # --force: nothing of an earlier attempt is re-used, partial counts included (a partial
            # of other settings never matches its key, so `redo_stale` needs no deletion here)
            partial.unlink(missing_ok=True)
            if rank == 0:
                _remove_partials(run.stats_dir, lang)
            distributed.barrier()
        t_lang = time.perf_counter()
        if counted is not None:
            stats = _taken_counts(counted, lang, recorder, len(corpus.by_lang[lang]))
        else:
            stats = recorder.count(corpus.by_lang[lang], lang=lang, partial=partial, progress=progress and rank == 0)
        speed[0] += stats.tokens
        speed[1] += time.perf_counter() - t_lang
        stats.meta = dict(meta, buckets=stats.num_buckets)  # 0 when a resumed partial lost them
        if rank == 0:
            with _writing(run.stats_path(lang)):
                run.write_language_stats(stats)
        # Partial counts go only once the language is on disk: a crash before this point
        # resumes from them, after it the language is skipped.
        distributed.barrier()
        partial.unlink(missing_ok=True)
        if rank == 0:  # also those of an earlier run with another number of processes
            _remove_partials(run.stats_dir, lang)
        parts.append(stats)
    result = ActivationStats.stack(parts)
    if rank == 0:
        with _writing(run.manifest_path):
            run.update_manifest({
                "languages": list(corpus.languages),
                "model": {k: base_meta[k] for k in ("model", "model_fingerprint", "architecture", "family", "hook_point",
                                                    "num_layers", "num_neurons", "dtype", "revision")},
                "versions": base_meta["versions"],
            })
            _commit_record_stage(run, parts, config, corpus, base_meta, world, by, time.perf_counter() - t_start,
                                 speed[0] / speed[1] if speed[1] > 0 and speed[0] and counted is None else None)
    distributed.barrier()
    if rank == 0:  # every rank is done writing: clear what killed runs left behind
        _remove_leftovers(run.stats_dir, corpus.languages)
    return result


def _taken_counts(counted: Mapping[str, LanguageStats], lang: str, recorder: Recorder, n_examples: int
                 ) -> LanguageStats:
    """One language's counts made elsewhere, checked against this model's shape."""
    stats = counted.get(lang)
    if stats is None:
        raise StatsError(f"{lang}: no counts were made during generation for this language; generate it again")
    want = (recorder.sites.num_layers, recorder.sites.num_neurons)
    if tuple(stats.positive.shape) != want:
        raise StatsError(f"{lang}: the counts made during generation are {list(stats.positive.shape)}, but the model "
                         f"has {list(want)} layers x neurons; generate again with this model")
    if stats.tokens <= 0:
        raise CorpusError(f"{lang}: none of its {n_examples} answer(s) has a token to count (every response is "
                          "empty); give more --max-new-tokens or drop the language with --langs")
    if recorder.config.keep_sums and stats.sums is None:
        raise StatsError(f"{lang}: the counts made during generation have no activation sums")
    return LanguageStats(lang, stats.positive.to(torch.int64), int(stats.tokens), stats.sums, {},
                         stats.bucket_positive, stats.bucket_tokens, stats.bucket_docs)


def check_run_dir(run: RunDir, model_fingerprint: str, force: bool) -> None:
    """Refuse an --out that is a file, or a run directory of another model (unless --force):
    its stats would be mixed with or silently replaced by this model's."""
    if run.path.exists() and not run.path.is_dir():
        raise StatsError(f"--out {run.path} is a file, not a run directory; give a directory")
    manifest = read_manifest_checked(run)
    old_model = manifest.get("model", {}).get("model_fingerprint") if isinstance(manifest.get("model"), dict) else None
    if old_model and old_model != model_fingerprint and not force:
        raise StatsError(f"{run.path} holds a run of another model ({manifest['model'].get('model')}); "
                         "use another --out or --force")


def record_in_processes(model_cfg: Any, corpus: Corpus, out: str | Path, config: RecordConfig, *,
                        force: bool = False) -> tuple[ActivationStats, int, int]:
    """`langneurons record`: load the model (``config.ModelConfig``) in every process of a
    torchrun/accelerate launch (or the only one), record, and return (stats, rank, world size).
    Each rank gets its own GPU; --device-map/--max-memory (one model over several GPUs) are
    refused under data parallelism, where every process holds its own copy."""
    started_group = distributed.env_world_size() > 1 and not distributed.rank_world()[1] > 1
    rank, world = distributed.init_from_env(model_cfg.device)
    try:
        if world > 1:
            if model_cfg.device_map is not None or model_cfg.max_memory is not None:
                raise LangNeuronsError("--device-map/--max-memory spread ONE model over several GPUs, but under "
                                       f"torchrun/accelerate each of the {world} processes holds its own copy; "
                                       "use one process with --device-map auto, or drop them")
            if model_cfg.device is None and torch.cuda.is_available():
                model_cfg.device = f"cuda:{distributed.local_rank()}"
        loaded = model_cfg.load()
        stats = record(loaded.model, loaded.tokenizer, corpus, out, config, model_id=loaded.source,
                       model_fingerprint=loaded.fingerprint, force=force, progress=rank == 0)
    finally:
        if started_group:
            distributed.shutdown()
    return stats, rank, world


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A full disk or a read-only directory is one line, not a traceback: finished languages
    are kept and a rerun resumes."""
    try:
        yield
    except OSError as exc:
        raise StatsError(f"cannot write {path} ({exc.strerror or exc}); check free space and permissions, "
                         "then run again to resume") from None


def _remove_partials(stats_dir: Path, lang: str) -> None:
    partial_dir = stats_dir / ".partial"
    if partial_dir.is_dir():
        for f in [partial_dir / f"{lang}.safetensors", *partial_dir.glob(f"{glob.escape(lang)}.rank*.safetensors")]:
            f.unlink(missing_ok=True)


def _remove_leftovers(stats_dir: Path, finished: Sequence[str] = ()) -> None:
    """Temporary files of writes that a SIGKILL interrupted (atomic_write's ``.<name>.*.tmp``),
    every file of .partial/ except the partial counts of languages not ``finished`` (a later run
    of those may resume from them), and the then empty partial directory. Only record writes
    under stats/, so this is safe."""
    partial_dir = stats_dir / ".partial"
    for d in (stats_dir, partial_dir):
        if d.is_dir():
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    if partial_dir.is_dir():
        for f in partial_dir.iterdir():
            m = re.fullmatch(r"([^.]+)(\.rank\d+)?\.safetensors", f.name)
            if f.is_file() and not (m and m.group(1) not in finished):
                log.debug("removing %s (left by an interrupted run)", f)
                f.unlink(missing_ok=True)
    try:
        if partial_dir.is_dir() and not any(partial_dir.iterdir()):
            partial_dir.rmdir()
    except OSError:
        pass


#: metadata that must match for a finished language to be re-used by a resumed run
_RESUME_KEYS = ("model_fingerprint", "scope", "include_special", "record_config", "corpus_fingerprint", "dtype",
                "shard")


def resume_key(meta: dict[str, Any]) -> str:
    """The stage key of one language's counts (the stage layer's one rule: equal inputs, equal key)."""
    from .stage import input_key

    return input_key({k: meta.get(k) for k in _RESUME_KEYS})


def _commit_record_stage(run: RunDir, parts: Sequence[LanguageStats], config: RecordConfig, corpus: Corpus,
                         base_meta: dict[str, Any], world: int, by: str, seconds: float,
                         tokens_per_second: float | None) -> None:
    """The ``record`` stage's manifest record: per-language keys, stats checksums, settings, and
    the counting speed (what the ablation's cost estimate starts from; kept from the last call
    that counted anything)."""
    from .stage import commit_stage

    inputs = {"languages": {p.lang: resume_key(p.meta) for p in parts}}
    section = {"scope": config.scope, "include_special": config.include_special, "corpus": corpus.source,
               "config": base_meta["record_config"], "tokens": {p.lang: p.tokens for p in parts},
               "buckets": {p.lang: p.num_buckets for p in parts}, "shard": base_meta["shard"], "processes": world,
               "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second
               else run.stage_result("record").get("tokens_per_second")}
    commit_stage(run, "record", inputs, [run.stats_path(p.lang) for p in parts], section, seconds, by=by,
                 stage_versions=base_meta["versions"])
