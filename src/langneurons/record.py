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
  ``all_reduce(SUM)`` per language combines the counts; rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from . import __version__
from .arch import ActivationSites, body_of, locate_activations
from .corpus import Corpus, Example
from .errors import CorpusError, LangNeuronsError, StatsError
from .runs import RunDir
from .stats import ActivationStats, LanguageStats

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
    separator: str = "\n"  # between prompt and response in the response scope
    keep_sums: bool = True
    seed: int = 0
    act_path: str | None = None  # --mlp-act-path override
    flush_every: int = 50  # batches between partial flushes (0: only at the end of a language)
    shard: tuple[int, int] | None = None  # (i, n): count only examples with index % n == i

    def fingerprint_fields(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("batch_size", "flush_every", "keep_sums"):
            d.pop(k)  # do not change the counts
        return d


@dataclass
class Encoded:
    input_ids: list[int]
    counted: list[bool]  # which positions are counted


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def encode_example(tokenizer: Any, ex: Example, cfg: RecordConfig, max_length: int) -> tuple[Encoded, bool]:
    """Tokenise one example and mark its counted tokens. Returns (encoded, truncated)."""
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


class _Counter:
    """Forward hooks that add per-layer counts of the masked tokens (kept on each layer's device)."""

    def __init__(self, sites: ActivationSites, keep_sums: bool):
        self.sites = sites
        self.keep_sums = keep_sums
        self.positive: list[torch.Tensor | None] = [None] * sites.num_layers
        self.sums: list[torch.Tensor | None] = [None] * sites.num_layers
        self.fired = [0] * sites.num_layers
        self.counted_rows = [0] * sites.num_layers
        self.flat_index: torch.Tensor | None = None
        self._index_on: dict[torch.device, torch.Tensor] = {}

    def set_batch(self, flat_index: torch.Tensor) -> None:
        self.flat_index = flat_index
        self._index_on = {flat_index.device: flat_index}
        self.fired = [0] * self.sites.num_layers
        self.counted_rows = [0] * self.sites.num_layers

    def __call__(self, layer: int, out: torch.Tensor) -> None:
        assert self.flat_index is not None
        dev = out.device
        idx = self._index_on.get(dev)
        if idx is None:
            idx = self._index_on[dev] = self.flat_index.to(dev)
        acts = out.reshape(-1, out.shape[-1]).index_select(0, idx)
        pos = (acts > 0).sum(0)
        if self.positive[layer] is None:
            self.positive[layer] = torch.zeros(out.shape[-1], dtype=torch.int64, device=dev)
            if self.keep_sums:
                self.sums[layer] = torch.zeros(out.shape[-1], dtype=torch.float64, device=dev)
        self.positive[layer] += pos  # type: ignore[operator]
        if self.keep_sums:
            self.sums[layer] += acts.sum(0, dtype=torch.float64)  # type: ignore[operator]
        self.fired[layer] += 1
        self.counted_rows[layer] += int(acts.shape[0])
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


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Recorder:
    """Counts positive activations of a loaded model's MLP neurons over examples."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: RecordConfig | None = None,
                 sites: ActivationSites | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or RecordConfig()
        if self.config.batch_size < 1:
            raise LangNeuronsError(f"--batch-size must be >= 1, got {self.config.batch_size}")
        self.sites = sites or locate_activations(model, self.config.act_path)
        self.body = body_of(model)
        self.device = model.get_input_embeddings().weight.device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise LangNeuronsError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.pad_id = int(pad)
        ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_length = int(self.config.max_length or ctx or 4096)

    # -- preparation -----------------------------------------------------------------------
    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        cfg = self.config
        encoded: list[Encoded] = []
        truncated = empty = 0
        budget = cfg.max_tokens_per_lang
        total = 0
        for ex in examples:
            enc, was_truncated = encode_example(self.tokenizer, ex, cfg, self.max_length)
            truncated += was_truncated
            n = sum(enc.counted)
            if n == 0:
                empty += 1
                continue
            encoded.append(enc)
            total += n
            if budget is not None and total >= budget:
                break
        if truncated:
            warnings.warn(f"{truncated} example(s) were longer than {self.max_length} tokens and were "
                          "truncated (pass --max-length to change the limit)", stacklevel=2)
        if empty:
            what = "responses" if cfg.scope == "response" else "texts"
            warnings.warn(f"{empty} example(s) had {what} that tokenize to no counted token and were skipped",
                          stacklevel=2)
        if cfg.shard is not None:
            i, n = cfg.shard
            encoded = [e for j, e in enumerate(encoded) if j % n == i]
        rank, world = _dist()
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
        """Count one language's examples. ``partial`` enables flush/resume inside the language."""
        encoded = self.encode(examples)
        batches = self.batches(encoded)
        counter = _Counter(self.sites, self.config.keep_sums)
        N = self.sites.num_neurons
        start_batch, tokens = 0, 0
        base_pos, base_sums = None, None
        state_key = self._partial_key(encoded)
        if partial is not None and partial.exists():
            try:
                prev = LanguageStats.load(partial)
                if prev.meta.get("partial_key") == state_key:
                    start_batch, tokens = int(prev.meta["batches_done"]), prev.tokens
                    base_pos, base_sums = prev.positive, prev.sums
                    log.info("%s: resuming after batch %d (%d tokens)", lang, start_batch, tokens)
            except StatsError:
                log.warning("%s: ignoring unreadable partial file %s", lang, partial)
        handles = self.sites.add_hooks(counter)
        total_tokens = sum(sum(e.counted) for e in encoded)
        bar = _progress(total_tokens, lang, progress)
        bar.update(tokens)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for bi in range(start_batch, len(batches)):
                    ids, attn, counted = self._tensors(batches[bi])
                    flat = counted.reshape(-1).nonzero().squeeze(1).to(self.device)
                    counter.set_batch(flat)
                    self.body(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False)
                    n = int(counted.sum())
                    self._verify(counter, n)
                    tokens += n
                    bar.update(n)
                    bar.set_postfix_str(f"{(tokens) / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
                    if partial is not None and self.config.flush_every and (bi + 1) % self.config.flush_every == 0 \
                            and bi + 1 < len(batches):
                        pos, sums = counter.collect(N)
                        self._flush(partial, lang, base_pos, base_sums, pos, sums, tokens, bi + 1, state_key)
        finally:
            for h in handles:
                h.remove()
            bar.close()
        pos, sums = counter.collect(N)
        if base_pos is not None:
            pos = pos + base_pos
            if sums is not None and base_sums is not None:
                sums = sums + base_sums
        pos, sums, tokens = self._all_reduce(pos, sums, tokens)
        return LanguageStats(lang, pos, tokens, sums, {})

    def _partial_key(self, encoded: Sequence[Encoded]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.config.fingerprint_fields(), sort_keys=True, default=str).encode())
        h.update(str(self.config.batch_size).encode())
        for e in encoded:
            h.update(str(len(e.input_ids)).encode())
            h.update(bytes(e.counted))
        return h.hexdigest()[:16]

    def _flush(self, partial: Path, lang: str, base_pos: torch.Tensor | None, base_sums: torch.Tensor | None,
               pos: torch.Tensor, sums: torch.Tensor | None, tokens: int, batches_done: int, key: str) -> None:
        if base_pos is not None:
            pos = pos + base_pos
            if sums is not None and base_sums is not None:
                sums = sums + base_sums
        LanguageStats(lang, pos, tokens, sums, {"partial_key": key, "batches_done": batches_done}).save(partial)

    def _verify(self, counter: _Counter, n: int) -> None:
        bad = [layer for layer, f in enumerate(counter.fired) if f != 1]
        if bad:
            raise LangNeuronsError(
                f"the activation hooks of layers {bad[:5]} fired {[counter.fired[b] for b in bad[:5]]} times in one "
                "forward pass (expected once): a fused kernel, torch.compile or a shared module bypasses them; "
                "disable compilation or pass --mlp-act-path")
        wrong = [layer for layer, c in enumerate(counter.counted_rows) if c != n]
        if wrong:
            raise LangNeuronsError(f"layers {wrong[:5]} counted a different number of tokens than the mask holds "
                                   f"({n}); the activation does not have one row per token")

    def _all_reduce(self, pos: torch.Tensor, sums: torch.Tensor | None, tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        rank, world = _dist()
        if world == 1:
            return pos, sums, tokens
        dist = torch.distributed
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([tokens], dtype=torch.int64, device=dev)
        p = pos.to(dev)
        dist.all_reduce(t)
        dist.all_reduce(p)
        if sums is not None:
            s = sums.to(dev)
            dist.all_reduce(s)
            sums = s.cpu()
        return p.cpu(), sums, int(t.item())


def _progress(total: int, lang: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"record {lang}", unit="tok", unit_scale=True, disable=not enabled,
                leave=False, dynamic_ncols=True)


def versions() -> dict[str, str]:
    import transformers

    return {"langneurons": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def model_meta(model: nn.Module, sites: ActivationSites, model_id: str, fingerprint: str | None = None) -> dict:
    cfg = model.config
    if fingerprint is None:
        fingerprint = hashlib.sha256(cfg.to_json_string(use_diff=False).encode()).hexdigest()[:16]
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


def record(model: nn.Module, tokenizer: Any, corpus: Corpus, out: str | Path, config: RecordConfig | None = None,
           *, model_id: str = "", model_fingerprint: str | None = None, force: bool = False,
           progress: bool = True) -> ActivationStats:
    """Record every language of ``corpus`` into the run directory ``out`` (resumable)."""
    config = config or RecordConfig()
    recorder = Recorder(model, tokenizer, config)
    run = RunDir(out)
    rank, world = _dist()
    base_meta = {
        **model_meta(model, recorder.sites, model_id or getattr(model.config, "_name_or_path", ""), model_fingerprint),
        "scope": config.scope,
        "include_special": config.include_special,
        "record_config": config.fingerprint_fields(),
        "shard": None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}",
        "versions": versions(),
        "seed": config.seed,
    }
    torch.manual_seed(config.seed)
    if rank == 0:
        manifest = run.read_manifest()
        old_model = manifest.get("model", {}).get("model_fingerprint") if isinstance(manifest.get("model"), dict) else None
        if old_model and old_model != base_meta["model_fingerprint"] and not force:
            raise StatsError(f"{out} holds a run of another model ({manifest['model'].get('model')}); "
                             "use another --out or --force")
    parts: list[LanguageStats] = []
    for lang in corpus.languages:
        path = run.stats_path(lang)
        meta = dict(base_meta, corpus_fingerprint=corpus.fingerprint(lang), corpus=corpus.source)
        if path.exists() and not force:
            try:
                prev = LanguageStats.load(path, run.read_manifest().get("checksums", {}).get(f"stats/{lang}.safetensors"))
            except StatsError as exc:
                raise StatsError(f"{exc} (or pass --force to record everything again)") from None
            same = all(prev.meta.get(k) == meta.get(k) for k in
                       ("model_fingerprint", "scope", "include_special", "record_config", "corpus_fingerprint", "dtype",
                        "shard"))
            if same:
                log.info("%s: already recorded (%d tokens), skipping", lang, prev.tokens)
                parts.append(prev)
                continue
            raise StatsError(f"{path} was recorded with other settings (model, scope, corpus or options); "
                             "use another --out, or --force to overwrite")
        partial = run.stats_dir / ".partial" / f"{lang}{'' if world == 1 else f'.rank{rank}'}.safetensors"
        stats = recorder.count(corpus.by_lang[lang], lang=lang, partial=partial, progress=progress and rank == 0)
        stats.meta = meta
        if rank == 0:
            run.write_language_stats(stats)
        partial.unlink(missing_ok=True)
        parts.append(stats)
    result = ActivationStats.stack(parts)
    if rank == 0:
        run.update_manifest({
            "languages": list(corpus.languages),
            "model": {k: base_meta[k] for k in ("model", "model_fingerprint", "architecture", "family", "hook_point",
                                                "num_layers", "num_neurons", "dtype", "revision")},
            "record": {"scope": config.scope, "include_special": config.include_special, "corpus": corpus.source,
                       "config": config.fingerprint_fields(), "tokens": {p.lang: p.tokens for p in parts},
                       "shard": base_meta["shard"]},
            "versions": base_meta["versions"],
        })
    return result
