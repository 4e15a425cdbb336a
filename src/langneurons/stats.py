"""Activation statistics: how often each MLP neuron fires, per language.

For language k, layer l, neuron n we keep
    tokens[k]          number of counted tokens (int64)
    positive[k, l, n]  number of counted tokens whose activation is > 0 (int64)
    sums[k, l, n]      sum of the activation over counted tokens (float64, optional)
and p[k, l, n] = positive / tokens. Counts from shards and processes add up exactly, which
is why we store counts and never probabilities: merging is addition.

Per-bucket counts (optional, written by ``record`` with ``RecordConfig.buckets`` = B > 0): the
documents of a language are dealt into B buckets by their global index (document j -> bucket
j mod B) and the same counts are kept per bucket:
    bucket_positive[b, l, n]  bucket_tokens[b]  bucket_docs[b]
They sum EXACTLY to positive / tokens (checked by `LanguageStats.validate`), so resampling
documents (bootstrap, permutation nulls; see `langneurons.confidence`) needs no per-token
activations: a resample's counts are weighted sums of bucket counts. Buckets add up under
merging like every other count; shards and processes use the same global document index, so a
document lands in the same bucket whichever shard or rank counted it. Stats without buckets
(older runs, imports, ``buckets=0``) load with the bucket fields None.

On disk a run directory holds ``stats/<lang>.safetensors`` (tensors ``positive`` [L, N],
``tokens`` 0-d, ``sum`` [L, N], and optionally ``bucket_positive`` [B, L, N] (int32 when every
bucket holds fewer than 2**31 tokens, else int64), ``bucket_tokens`` [B], ``bucket_docs`` [B])
with a JSON metadata blob under the key ``langneurons``, and ``manifest.json`` listing the
languages in order and each file's sha256.

Extra counts (``extra``, tensors ``extra.<name>`` on disk): further non-negative counts that
add up like the others, e.g. a mixture of experts' routed-token counts per expert
(`langneurons.moe`). They are saved, loaded, checked, added by merging and stacked per
language; every input of a merge or stack must carry the same names and shapes.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .corpus import check_language_name
from .errors import StatsError
from .io import atomic_write, sha256_file, torch_load_tensors
from .runs import RunDir

#: metadata keys that must agree for two stats to be merged or stacked
COMPAT_KEYS = ("model_fingerprint", "scope", "hook_point", "include_special", "dtype")
FEW_TOKENS = 1000
#: safetensors metadata key holding the sha256 of a stats file's tensors and metadata
CONTENT_HASH_KEY = "langneurons_sha256"
#: bucket counts are stored as int32 when every bucket has fewer tokens than this (no count can overflow)
INT32_LIMIT = 2**31
BUCKET_TENSORS = ("bucket_positive", "bucket_tokens", "bucket_docs")


def _content_sha256(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    import hashlib

    h = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LanguageStats:
    """Counts for one language (the unit that is written, resumed and merged)."""

    lang: str
    positive: torch.Tensor  # int64 [L, N]
    tokens: int
    sums: torch.Tensor | None = None  # float64 [L, N]
    meta: dict[str, Any] = field(default_factory=dict)
    bucket_positive: torch.Tensor | None = None  # int32/int64 [B, L, N], sums to `positive`
    bucket_tokens: torch.Tensor | None = None  # int64 [B], sums to `tokens`
    bucket_docs: torch.Tensor | None = None  # int64 [B]: documents per bucket
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # further counts that add up (module docstring)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positive.shape)  # type: ignore[return-value]

    @property
    def has_buckets(self) -> bool:
        return self.bucket_positive is not None and self.bucket_tokens is not None and self.bucket_docs is not None

    @property
    def num_buckets(self) -> int:
        return int(self.bucket_tokens.numel()) if self.has_buckets else 0  # type: ignore[union-attr]

    def drop_buckets(self) -> "LanguageStats":
        """The same counts without the per-bucket ones (in place; returns self)."""
        self.bucket_positive = self.bucket_tokens = self.bucket_docs = None
        return self

    def save(self, path: str | Path) -> Path:
        # The language names the file (`RunDir.stats_path`): refuse a name that is not a code
        # before anything is written (a crafted '../../x' would write outside the run directory).
        check_language_name(self.lang, f"stats of {str(self.lang)[:24]!r}", error=StatsError)
        tensors = {"positive": self.positive.to(torch.int64).contiguous().cpu(),
                   "tokens": torch.tensor(int(self.tokens), dtype=torch.int64)}
        if self.sums is not None:
            tensors["sum"] = self.sums.to(torch.float64).contiguous().cpu()
        if self.has_buckets:
            tensors.update(_bucket_tensors_for_disk(self))
        for name, t in self.extra.items():
            tensors[f"extra.{name}"] = t.contiguous().cpu()
        meta = dict(self.meta, lang=self.lang, tokens=int(self.tokens))
        blob = {"langneurons": json.dumps(meta, ensure_ascii=False, default=str)}
        # The file carries a hash of its own content, so a stats file copied without its
        # manifest (a shard moved between machines, a partial flush) still proves it is whole.
        blob[CONTENT_HASH_KEY] = _content_sha256(tensors, blob["langneurons"])
        from .io import save_safetensors  # metadata keys in a fixed order: reproducible bytes

        return atomic_write(path, lambda p: save_safetensors(tensors, p, blob))

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None, *, buckets: bool = True) -> "LanguageStats":
        """Read one stats file; any sign of damage is a `StatsError` naming the file.

        Checked: the sha256 recorded in manifest.json (``expected_sha256``), the safetensors
        structure (truncation), the file's own content hash, its JSON metadata, and the
        counts' consistency (`validate`, including the per-bucket counts). ``buckets=False``
        drops the per-bucket counts after the checks (they are 16x the size of the totals).
        """
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"stats file {path} does not exist; run `langneurons record` first")
        if expected_sha256 is not None and sha256_file(path) != expected_sha256:
            raise StatsError(f"stats file {path} is corrupt (checksum differs from manifest.json); "
                             "delete it and record that language again")
        # A file whose bytes match the manifest's checksum is the file that was written, and its
        # content hash was computed from those tensors at write time: hashing it again proves
        # nothing (and costs as much as the checksum itself).
        verified = expected_sha256 is not None
        try:
            from safetensors import safe_open

            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StatsError(f"stats file {path} is unreadable or truncated ({first}); "
                             "delete it and record that language again") from None
        raw = header.get("langneurons", "{}")
        expected = header.get(CONTENT_HASH_KEY)
        if expected is not None and not verified and _content_sha256(tensors, raw) != expected:
            raise StatsError(f"stats file {path} is corrupt (its content hash does not match); "
                             "delete it and record that language again")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict):
            raise StatsError(f"stats file {path} has unreadable metadata; delete it and record that language again")
        if "positive" not in tensors or "tokens" not in tensors or tensors["tokens"].numel() != 1:
            raise StatsError(f"stats file {path} lacks 'positive'/'tokens' tensors")
        present = [name for name in BUCKET_TENSORS if name in tensors]
        if present and len(present) != len(BUCKET_TENSORS):
            raise StatsError(f"stats file {path} has only some of the bucket tensors ({', '.join(present)}); "
                             "delete it and record that language again")
        lang = check_language_name(meta.get("lang", path.stem), f"stats file {path}", what="language in the metadata",
                                   hint="; the file is damaged or forged, do not use it", error=StatsError)
        out = cls(lang=lang, positive=tensors["positive"].to(torch.int64),
                  tokens=int(tensors["tokens"].item()), sums=tensors.get("sum"), meta=meta)
        out.extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        if present:
            out.bucket_positive = tensors["bucket_positive"]  # int32 or int64, as stored
            out.bucket_tokens = tensors["bucket_tokens"].to(torch.int64)
            out.bucket_docs = tensors["bucket_docs"].to(torch.int64)
        out.validate(f"stats file {path}")
        return out if buckets else out.drop_buckets()

    def validate(self, where: str = "") -> None:
        where = where or self.lang
        if self.positive.dim() != 2:
            raise StatsError(f"{where}: 'positive' must be [layers, neurons], got {tuple(self.positive.shape)}")
        if self.positive.dtype.is_floating_point and torch.isnan(self.positive).any():
            raise StatsError(f"{where}: counts contain NaN")
        if self.tokens < 0 or (self.positive < 0).any():
            raise StatsError(f"{where}: counts are negative; the file is corrupt or was built wrongly")
        if (self.positive > self.tokens).any():
            raise StatsError(f"{where}: some neuron is positive on more tokens ({int(self.positive.max())}) "
                             f"than were counted ({self.tokens}); the stats are inconsistent")
        if self.sums is not None and tuple(self.sums.shape) != tuple(self.positive.shape):
            raise StatsError(f"{where}: 'sum' has shape {tuple(self.sums.shape)} but 'positive' has "
                             f"{tuple(self.positive.shape)}; the stats are inconsistent")
        if self.sums is not None and torch.isnan(self.sums).any():
            raise StatsError(f"{where}: activation sums contain NaN (overflow in a low-precision run?)")
        for name, t in self.extra.items():
            if t.dtype.is_floating_point and bool(torch.isnan(t).any()):
                raise StatsError(f"{where}: extra counts '{name}' contain NaN")
            if t.numel() and bool((t < 0).any()):
                raise StatsError(f"{where}: extra counts '{name}' are negative; the stats are inconsistent")
        self._validate_buckets(where)

    def _validate_buckets(self, where: str) -> None:
        fields = (self.bucket_positive, self.bucket_tokens, self.bucket_docs)
        if all(f is None for f in fields):
            return
        if any(f is None for f in fields):
            raise StatsError(f"{where}: only some of the per-bucket counts are present; the stats are inconsistent")
        bp, bt, bd = fields
        if bp.dtype.is_floating_point or bt.dtype.is_floating_point or bd.dtype.is_floating_point:  # type: ignore[union-attr]
            raise StatsError(f"{where}: per-bucket counts must be integers")
        B = int(bt.numel())  # type: ignore[union-attr]
        if bp.dim() != 3 or tuple(bp.shape[1:]) != tuple(self.positive.shape) or bp.shape[0] != B \
                or tuple(bt.shape) != (B,) or tuple(bd.shape) != (B,):  # type: ignore[union-attr]
            raise StatsError(f"{where}: per-bucket counts have shapes {tuple(bp.shape)}, {tuple(bt.shape)}, "  # type: ignore[union-attr]
                             f"{tuple(bd.shape)}; expected [B, {', '.join(map(str, self.positive.shape))}], [B], [B]")
        if bp.numel() == 0:  # type: ignore[union-attr]
            return
        # Reductions instead of full-size boolean temporaries (these run on every load: at 7B
        # scale a language has 16 x 32 x 14336 bucket counts).
        if bool((bt < 0).any()) or bool((bd < 0).any()) or int(bp.amin()) < 0:  # type: ignore[operator, union-attr]
            raise StatsError(f"{where}: per-bucket counts are negative; the file is corrupt or was built wrongly")
        if int(bt.sum()) != int(self.tokens):  # type: ignore[union-attr]
            raise StatsError(f"{where}: the per-bucket counts do not add up to the totals; the stats are inconsistent")
        if bool((bp.amax(dim=tuple(range(1, bp.dim()))) > bt).any()):  # type: ignore[union-attr]
            raise StatsError(f"{where}: a bucket has a neuron positive on more tokens than the bucket holds")
        # Each bucket value is <= its bucket's tokens (checked above), so their sum is <= the
        # language's tokens: summing in the stored int32 cannot overflow when tokens < 2**31
        # (and is ~10x faster than widening every element to int64 first).
        narrow = bp.dtype == torch.int32 and int(self.tokens) < INT32_LIMIT  # type: ignore[union-attr]
        total = bp.sum(0, dtype=torch.int32 if narrow else torch.int64)  # type: ignore[union-attr]
        if not torch.equal(total.to(torch.int64), self.positive.to(torch.int64)):
            raise StatsError(f"{where}: the per-bucket counts do not add up to the totals; the stats are inconsistent")

    def __add__(self, other: "LanguageStats") -> "LanguageStats":
        if self.lang != other.lang:
            raise StatsError(f"cannot add stats of languages {self.lang!r} and {other.lang!r}")
        check_compatible([self.meta, other.meta], [self.shape, other.shape], what=self.lang)
        sums = None
        if self.sums is not None and other.sums is not None:
            sums = self.sums + other.sums
        meta = dict(self.meta)
        shards = sorted(set(_as_list(self.meta.get("shards"))) | set(_as_list(other.meta.get("shards"))))
        if shards:
            meta["shards"] = shards
        out = LanguageStats(self.lang, self.positive + other.positive, self.tokens + other.tokens, sums, meta)
        out.extra = _add_extra(self.extra, other.extra, self.lang)
        # Buckets add elementwise: both inputs deal document j into bucket j mod B with the SAME
        # global index j (shards and ranks keep the corpus-wide index), so bucket b of the sum
        # holds exactly the documents an unsharded run puts there.
        if self.has_buckets and other.has_buckets and self.num_buckets == other.num_buckets:
            out.bucket_positive = self.bucket_positive.to(torch.int64) + other.bucket_positive.to(torch.int64)  # type: ignore[union-attr]
            out.bucket_tokens = self.bucket_tokens + other.bucket_tokens  # type: ignore[operator]
            out.bucket_docs = self.bucket_docs + other.bucket_docs  # type: ignore[operator]
        elif self.has_buckets or other.has_buckets:
            have = {self.num_buckets, other.num_buckets}
            warnings.warn(f"{self.lang}: only some inputs carry per-bucket counts (buckets: {sorted(have)}); the sum "
                          "keeps the totals only, so `langneurons stability` needs a new recording of it",
                          stacklevel=2)
        return out


def _add_extra(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Extra counts add elementwise; inputs must carry the same names and shapes (a missing one
    would silently drop, e.g., a mixture of experts' routed-token denominators)."""
    if set(a) != set(b) or any(tuple(a[k].shape) != tuple(b[k].shape) for k in a):
        raise StatsError(f"{what}: the inputs carry different extra counts ({sorted(a)} vs {sorted(b)}); "
                         "stats of different kinds of model cannot be combined")
    return {k: a[k] + b[k] for k in a}


def _bucket_tensors_for_disk(part: LanguageStats) -> dict[str, torch.Tensor]:
    """int32 when no bucket can hold 2**31 tokens (then no count in it can overflow), else int64."""
    bt = part.bucket_tokens.to(torch.int64).contiguous().cpu()  # type: ignore[union-attr]
    small = bt.numel() == 0 or int(bt.max()) < INT32_LIMIT
    dtype = torch.int32 if small else torch.int64
    return {"bucket_positive": part.bucket_positive.to(dtype).contiguous().cpu(),  # type: ignore[union-attr]
            "bucket_tokens": bt, "bucket_docs": part.bucket_docs.to(torch.int64).contiguous().cpu()}  # type: ignore[union-attr]


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_compatible(metas: Sequence[dict], shapes: Sequence[tuple], what: str = "stats") -> None:
    """Refuse to combine counts of different models, scopes or shapes (one clear line)."""
    if len(set(shapes)) > 1:
        raise StatsError(f"{what}: neuron shapes differ ({sorted(set(shapes))}); "
                         "stats of different models cannot be combined")
    for key in COMPAT_KEYS:
        values = {json.dumps(m.get(key), sort_keys=True) for m in metas if m.get(key) is not None}
        if len(values) > 1:
            raise StatsError(f"{what}: '{key}' differs between inputs ({', '.join(sorted(values))}); "
                             "only stats of the same model, scope and dtype can be combined")


@dataclass
class ActivationStats:
    """Counts for K languages, stacked: the input of every identification method."""

    languages: list[str]
    positive: torch.Tensor  # int64 [K, L, N]
    tokens: torch.Tensor  # int64 [K]
    sums: torch.Tensor | None = None  # float64 [K, L, N]
    meta: dict[str, Any] = field(default_factory=dict)
    bucket_positive: torch.Tensor | None = None  # int32/int64 [K, B, L, N] (see the module docstring)
    bucket_tokens: torch.Tensor | None = None  # int64 [K, B]
    bucket_docs: torch.Tensor | None = None  # int64 [K, B]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # [K, ...] extra counts (module docstring)

    @property
    def has_buckets(self) -> bool:
        return self.bucket_positive is not None and self.bucket_tokens is not None and self.bucket_docs is not None

    @property
    def num_buckets(self) -> int:
        return int(self.bucket_tokens.shape[1]) if self.has_buckets else 0  # type: ignore[union-attr]

    @property
    def num_layers(self) -> int:
        return int(self.positive.shape[1])

    @property
    def num_neurons(self) -> int:
        return int(self.positive.shape[2])

    def probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """p[k, l, n] = positive / tokens (0 for a language with no tokens)."""
        denom = self.tokens.clamp(min=1).to(torch.float64).view(-1, 1, 1)
        return (self.positive.to(torch.float64) / denom).to(dtype)

    def means(self) -> torch.Tensor:
        """Mean activation per language and neuron (needs the sums). For a mixture of experts the
        mean of an expert neuron is over the tokens routed to its expert (it has no activation on
        the others), as its firing probability is (`moe.neuron_denominators`)."""
        if self.sums is None:
            raise StatsError("these stats carry no activation sums (imported files have none); "
                             "record them with langneurons to use mean-value interventions")
        from .moe import is_moe_stats, neuron_denominators

        if is_moe_stats(self):
            return self.sums / neuron_denominators(self).clamp(min=1).to(torch.float64)
        return self.sums / self.tokens.clamp(min=1).to(torch.float64).view(-1, 1, 1)

    def language(self, lang: str) -> LanguageStats:
        k = self.languages.index(lang)
        out = LanguageStats(lang, self.positive[k], int(self.tokens[k]),
                            None if self.sums is None else self.sums[k], dict(self.meta))
        out.extra = {name: t[k] for name, t in self.extra.items()}
        if self.has_buckets:
            out.bucket_positive = self.bucket_positive[k]  # type: ignore[index]
            out.bucket_tokens = self.bucket_tokens[k]  # type: ignore[index]
            out.bucket_docs = self.bucket_docs[k]  # type: ignore[index]
        return out

    def subset(self, langs: Sequence[str]) -> "ActivationStats":
        missing = [x for x in langs if x not in self.languages]
        if missing:
            raise StatsError(f"languages {missing} are not in the stats (have: {','.join(self.languages)})")
        idx = torch.tensor([self.languages.index(x) for x in langs])
        out = ActivationStats(list(langs), self.positive[idx], self.tokens[idx],
                              None if self.sums is None else self.sums[idx], dict(self.meta))
        out.extra = {name: t[idx] for name, t in self.extra.items()}
        if self.has_buckets:
            out.bucket_positive = self.bucket_positive[idx]  # type: ignore[index]
            out.bucket_tokens = self.bucket_tokens[idx]  # type: ignore[index]
            out.bucket_docs = self.bucket_docs[idx]  # type: ignore[index]
        return out

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(json.dumps(self.languages).encode())
        h.update(self.tokens.numpy().tobytes())
        h.update(self.positive.numpy().tobytes())
        for name in sorted(self.extra):  # (nothing added without extras: dense fingerprints are unchanged)
            h.update(name.encode())
            h.update(self.extra[name].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def validate(self, *, min_languages: int = 2, buckets: bool = True) -> None:
        """Raise StatsError on inputs that would silently give wrong neurons. ``buckets=False``
        leaves the per-bucket counts unchecked (identification does not read them, and
        `LanguageStats.load` has checked them already)."""
        if len(self.languages) < min_languages:
            raise StatsError(f"need at least {min_languages} languages to identify language neurons, "
                             f"got {len(self.languages)} ({','.join(self.languages)})")
        if len(set(self.languages)) != len(self.languages):
            raise StatsError(f"duplicate languages in stats: {self.languages}")
        for k, lang in enumerate(self.languages):
            if int(self.tokens[k]) == 0:
                raise StatsError(f"language {lang!r} has zero counted tokens; give it text or drop it with --langs")
        # One vectorised pass over all languages; a language that fails it is validated on its
        # own, which raises the precise one-line message.
        suspect = self._suspect_languages(buckets)
        for k in suspect:
            self.language(self.languages[k]).validate()
        for k, lang in enumerate(self.languages):
            if int(self.tokens[k]) < FEW_TOKENS:
                warnings.warn(f"language {lang!r} has only {int(self.tokens[k])} counted tokens; "
                              "its activation probabilities are noisy", stacklevel=2)

    def _suspect_languages(self, buckets: bool) -> list[int]:
        """Languages that may fail `LanguageStats.validate` (a superset of those that do)."""
        K = len(self.languages)
        pos = self.positive
        if pos.dim() != 3 or pos.shape[0] != K or pos.numel() == 0:
            return list(range(K))
        flat = pos.reshape(K, -1)
        bad = (self.tokens < 0) | (flat.amin(1) < 0) | (flat.amax(1) > self.tokens)
        if pos.dtype.is_floating_point:
            bad |= flat.isnan().any(1)
        if self.sums is not None:
            if tuple(self.sums.shape) != tuple(pos.shape):
                return list(range(K))
            bad |= self.sums.reshape(K, -1).isnan().any(1)
        present = [x is not None for x in (self.bucket_positive, self.bucket_tokens, self.bucket_docs)]
        if buckets and any(present):
            if not all(present):
                return list(range(K))
            for k in range(K):  # per language: the bucket tensors are the big ones (B x L x N)
                try:
                    self.language(self.languages[k])._validate_buckets(self.languages[k])
                except StatsError:
                    bad[k] = True
        return [int(k) for k in torch.nonzero(bad).flatten()]

    @classmethod
    def stack(cls, parts: Sequence[LanguageStats]) -> "ActivationStats":
        if not parts:
            raise StatsError("no language statistics given")
        check_compatible([p.meta for p in parts], [p.shape for p in parts])
        has_sums = all(p.sums is not None for p in parts)
        meta = {k: v for k, v in parts[0].meta.items() if k not in ("lang", "tokens", "corpus_fingerprint")}
        out = cls(
            languages=[p.lang for p in parts],
            positive=torch.stack([p.positive for p in parts]),
            tokens=torch.tensor([p.tokens for p in parts], dtype=torch.int64),
            sums=torch.stack([p.sums for p in parts]) if has_sums else None,  # type: ignore[misc]
            meta=meta,
        )
        names = {tuple(sorted(p.extra)) for p in parts}
        if len(names) > 1 or any(len({tuple(p.extra[n].shape) for p in parts}) > 1 for n in parts[0].extra):
            raise StatsError(f"the languages carry different extra counts ({sorted(names)}); they come from "
                             "different kinds of model or recording")
        out.extra = {n: torch.stack([p.extra[n] for p in parts]) for n in parts[0].extra}
        # Per-bucket counts only when every language has them with the same number of buckets
        # (`langneurons.confidence.require_buckets` names the languages that lack them).
        if all(p.has_buckets for p in parts) and len({p.num_buckets for p in parts}) == 1:
            wide = any(p.bucket_positive.dtype == torch.int64 for p in parts)  # type: ignore[union-attr]
            dtype = torch.int64 if wide else parts[0].bucket_positive.dtype  # type: ignore[union-attr]
            out.bucket_positive = torch.stack([p.bucket_positive.to(dtype) for p in parts])  # type: ignore[union-attr]
            out.bucket_tokens = torch.stack([p.bucket_tokens.to(torch.int64) for p in parts])  # type: ignore[union-attr]
            out.bucket_docs = torch.stack([p.bucket_docs.to(torch.int64) for p in parts])  # type: ignore[union-attr]
        return out

    # -- run directories -----------------------------------------------------------------
    def save(self, run_dir: str | Path, extra_manifest: dict[str, Any] | None = None) -> RunDir:
        run = RunDir(run_dir)
        for lang in self.languages:
            part = self.language(lang)
            part.meta = dict(self.meta)
            run.write_language_stats(part)
        run.update_manifest({"languages": list(self.languages), **(extra_manifest or {})})
        return run

    @classmethod
    def load(cls, path: str | Path, langs: Sequence[str] | None = None, *, buckets: bool = True) -> "ActivationStats":
        """Load from a run directory (uses manifest order) or a bare ``stats/`` directory.
        ``buckets=False`` leaves out the per-bucket counts (checked, then dropped)."""
        return cls.stack(load_language_stats(path, langs, buckets=buckets))


def read_manifest_checked(run: RunDir) -> dict[str, Any]:
    """manifest.json as a dict, or a StatsError naming it (valid JSON of the wrong shape, e.g.
    ``null`` from an interrupted editor, must not become an AttributeError deep inside)."""
    manifest = run.read_manifest()
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checksums", {}), dict) \
            or not isinstance(manifest.get("languages", []), list):
        raise StatsError(f"{run.manifest_path} is damaged (not a manifest object); restore it, or delete it "
                         "and record again")
    return manifest


def load_language_stats(path: str | Path, langs: Sequence[str] | None = None, *,
                        buckets: bool = True) -> list[LanguageStats]:
    """Each language's stats of a run directory, with its own metadata (corpus fingerprint,
    shard), checked against the checksums in manifest.json."""
    path = Path(path)
    if not path.exists():
        raise StatsError(f"{path} does not exist; give a run directory written by `langneurons record`")
    run = RunDir(path if (path / "stats").is_dir() or (path / "manifest.json").exists() else path.parent)
    stats_dir = path if path.name == "stats" and not (path / "stats").is_dir() else run.stats_dir
    manifest = read_manifest_checked(run)
    order = list(langs) if langs else manifest.get("languages") or sorted(p.stem for p in stats_dir.glob("*.safetensors"))
    if not order:
        raise StatsError(f"no stats found under {stats_dir}; run `langneurons record` first")
    for lang in order:  # manifest.json and --langs name files too
        check_language_name(lang, str(run.manifest_path if not langs else stats_dir), error=StatsError)
    checksums = manifest.get("checksums", {})
    return [LanguageStats.load(stats_dir / f"{lang}.safetensors", checksums.get(f"stats/{lang}.safetensors"),
                               buckets=buckets)
            for lang in order]


def merge_language_stats(parts: Iterable[LanguageStats]) -> LanguageStats:
    """Add the counts of one language (exact; refuses different models, scopes or shapes)."""
    parts = list(parts)
    if not parts:
        raise StatsError("no language statistics to merge")
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def shard_coverage(meta: dict[str, Any]) -> tuple[int, frozenset[int]] | None:
    """Which shards ``i/n`` of the corpus these counts cover: (n, {i, ...}), or None for a
    whole corpus. Written by ``record --shard i/n`` (``shard``) and by `merge_runs`
    (``shards`` + ``num_shards``)."""
    shard = meta.get("shard")
    if shard:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
        except ValueError:
            raise StatsError(f"unreadable shard {shard!r} in the stats metadata; expected i/n") from None
        return n, frozenset([i])
    shards, n = meta.get("shards"), meta.get("num_shards")
    if shards is not None and n is not None:
        covered = frozenset(int(i) for i in _as_list(shards))
        return None if covered == frozenset(range(int(n))) else (int(n), covered)
    return None


def _fmt_shards(idx: Iterable[int], n: int) -> str:
    return ", ".join(f"{i}/{n}" for i in sorted(idx))


def check_shards(lang: str, parts: Sequence[tuple[str, LanguageStats]]) -> dict[str, Any]:
    """Refuse to count any example twice; warn when shards are missing.

    Inputs of one language are grouped by corpus (``corpus_fingerprint``): counts of
    *different* corpora simply add up, but within one corpus the inputs must be disjoint
    shards of the same split (a repeated shard, a different n, or a whole-corpus run next to
    anything else is an error); missing shards give a warning naming them. Returns the shard
    metadata of the merged counts.
    """
    groups: dict[Any, list[tuple[str, LanguageStats, tuple[int, frozenset[int]] | None]]] = {}
    for src, part in parts:
        groups.setdefault(part.meta.get("corpus_fingerprint"), []).append((src, part, shard_coverage(part.meta)))
    result: dict[str, Any] = {"shard": None}
    for fp, members in groups.items():
        whole = [src for src, _, cov in members if cov is None]
        if whole and len(members) > 1 and fp is not None:
            others = [src for src, _, _ in members if src != whole[0]] or whole[1:]
            raise StatsError(f"{lang}: {whole[0]} already counts the whole corpus, and {others[0]} counts the same "
                             "corpus again; merging would count its examples twice")
        sharded = [(src, cov) for src, _, cov in members if cov is not None]
        if not sharded:
            continue
        ns = sorted({n for _, (n, _) in sharded})
        if len(ns) > 1:
            raise StatsError(f"{lang}: shards of different splits given together (n = {', '.join(map(str, ns))}); "
                             "merge shards of one --shard i/n split only")
        n = ns[0]
        owner: dict[int, str] = {}
        for src, (_, idx) in sharded:
            for i in sorted(idx):
                if i in owner:
                    raise StatsError(f"{lang}: shard {i}/{n} given twice ({owner[i]} and {src}); "
                                     "each shard may be merged once")
                owner[i] = src
        missing = sorted(set(range(n)) - set(owner))
        if missing:
            warnings.warn(f"{lang}: merged shards {_fmt_shards(owner, n)} of {n}; missing {_fmt_shards(missing, n)}: "
                          "the merge is incomplete (merge them in when they are done)", stacklevel=3)
        if len(groups) == 1:
            result.update(shards=sorted(owner), num_shards=n, shards_missing=missing)
    if len(groups) > 1:
        fps = sorted(str(fp) for fp in groups)
        result["corpus_fingerprint"] = "+".join(fps)
    return result


def merge_runs(inputs: Sequence[str | Path], out: str | Path) -> ActivationStats:
    """Add the counts of several runs/shards of the same model (``langneurons merge``).

    Checked before anything is written: same model, scope, dtype and shape (`check_compatible`),
    and per language disjoint, complete shards (`check_shards`).
    """
    if not inputs:
        raise StatsError("give at least one run directory to merge")
    out = Path(out)
    resolved = {Path(p).resolve() for p in inputs}
    if out.resolve() in resolved:
        raise StatsError(f"--out {out} is one of the inputs; write the merge to a new directory")
    if out.exists() and not out.is_dir():
        raise StatsError(f"--out {out} is a file, not a run directory; give a directory")
    loaded = [(str(p), load_language_stats(p)) for p in inputs]
    langs: list[str] = []
    for _, parts in loaded:
        langs += [x.lang for x in parts if x.lang not in langs]
    merged: list[LanguageStats] = []
    for lang in langs:
        parts = [(src, x) for src, ps in loaded for x in ps if x.lang == lang]
        total = merge_language_stats([x for _, x in parts])
        meta = {k: v for k, v in total.meta.items() if k not in ("shard", "shards", "num_shards", "shards_missing")}
        total.meta = {**meta, **check_shards(lang, parts)}
        merged.append(total)
    result = ActivationStats.stack(merged)
    run = RunDir(out)
    try:
        for part in merged:
            run.write_language_stats(part)
    except OSError as exc:
        raise StatsError(f"cannot write the merge to {out} ({exc.strerror or exc}); check free space and "
                         "permissions") from None
    first_manifest = read_manifest_checked(RunDir(inputs[0])) if Path(inputs[0]).is_dir() else {}
    extra: dict[str, Any] = {"languages": list(result.languages), "merged_from": [str(p) for p in inputs]}
    if isinstance(first_manifest.get("model"), dict):
        extra["model"] = first_manifest["model"]
    run.update_manifest(extra)
    from .stage import commit_stage

    # the merged counts are this run's `record` stage (the report, package and cost estimate read it)
    commit_stage(run, "record", {"merged_from": [str(p) for p in inputs], "stats_fingerprint": result.fingerprint()},
                 [run.stats_path(p.lang) for p in merged],
                 {"scope": result.meta.get("scope"), "tokens": dict(zip(result.languages, result.tokens.tolist())),
                  "shard": None, "shards": {p.lang: p.meta.get("shards") for p in merged},
                  "shards_missing": {p.lang: p.meta.get("shards_missing") for p in merged if p.meta.get("shards_missing")}},
                 0.0, by="merge")
    return result


# -- interop with the published formats ---------------------------------------------------
def _torch_load(path: Path) -> Any:
    return torch_load_tensors(path, StatsError)  # pickles of arbitrary objects are refused on purpose


def import_lape(files: dict[str, Path]) -> list[LanguageStats]:
    """LAPE files ``{"n": int, "over_zero": [L, N]}``, one per language (n >= 1: the counted tokens)."""
    out = []
    for lang, f in files.items():
        check_language_name(lang, str(f), error=StatsError)
        obj = _torch_load(f)
        if not isinstance(obj, dict) or "n" not in obj or "over_zero" not in obj:
            raise StatsError(f"{f} is not a LAPE activation file (needs keys 'n' and 'over_zero')")
        n = obj["n"]
        if isinstance(n, torch.Tensor) and n.numel() == 1:
            n = n.item()
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or int(n) < 1:
            raise StatsError(f"{f}: 'n' (the number of counted tokens) is {n!r}, but must be a whole number >= 1 "
                             f"(n = 0 would make every probability of {lang!r} 0/0); re-export the file")
        pos = torch.as_tensor(obj["over_zero"]).to(torch.int64)
        out.append(LanguageStats(lang, pos, int(n), None,
                                 {"source_format": "lape", "source_file": str(f), "scope": "all"}))
    return out


def import_njunlp(files: dict[str, tuple[Path, Path | None]]) -> list[LanguageStats]:
    """The paper authors' full/prefix pairs ``{"total_tokens", "over_zero"}``.

    response counts = clamp(full - prefix, 0), tokens = full - prefix (their two-pass method).
    Their code divides by max(tokens, 1); we keep counts, so two deliberate differences: a
    language with tokens = 0 is refused by `validate` (p would be 0 for every neuron, which
    only adds a meaningless language), and counts are capped at tokens (p <= 1) because the
    boundary effect of the two tokenisations can make full - prefix exceed the response
    tokens. Both are rare and logged in the counts' metadata (`source_format`).
    """
    out = []
    for lang, (full_f, prefix_f) in files.items():
        check_language_name(lang, str(full_f), error=StatsError)
        full = _torch_load(full_f)
        for f, obj in ((full_f, full),):
            if not isinstance(obj, dict) or "total_tokens" not in obj or "over_zero" not in obj:
                raise StatsError(f"{f} is not an activation file (needs 'total_tokens' and 'over_zero')")
        pos = torch.as_tensor(full["over_zero"]).to(torch.int64)
        tokens = int(full["total_tokens"])
        scope = "all"
        if prefix_f is not None:
            prefix = _torch_load(prefix_f)
            if not isinstance(prefix, dict) or "total_tokens" not in prefix:
                raise StatsError(f"{prefix_f} is not an activation file (needs 'total_tokens' and 'over_zero')")
            pos = (pos - torch.as_tensor(prefix["over_zero"]).to(torch.int64)).clamp(min=0)
            tokens = max(tokens - int(prefix["total_tokens"]), 0)
            scope = "response"
            pos = pos.clamp(max=tokens)
        out.append(LanguageStats(lang, pos, tokens, None,
                                 {"source_format": "njunlp", "source_file": str(full_f), "scope": scope}))
    return out


def find_import_files(fmt: str, paths: Sequence[Path], langs: Sequence[str] | None) -> list[LanguageStats]:
    """Collect published activation files by name and import them in the requested order."""
    import re

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise StatsError(f"{p} does not exist")
    if fmt == "lape":
        found: dict[str, Path] = {}
        for f in files:
            # LAPE writes activation.<lang>.train.<model> (no extension); also accept <lang>.pt
            m = re.match(r"(?:activation\.)?([^.]+)(?:\..*)?$", f.name)
            if m and not f.name.startswith(("prefix.", ".")):
                found[m.group(1)] = f
        order = list(langs) if langs else sorted(found)
        missing = [x for x in order if x not in found]
        if missing:
            raise StatsError(f"no LAPE file for languages {missing} among {[f.name for f in files]}")
        return import_lape({lang: found[lang] for lang in order})
    if fmt == "njunlp":
        full: dict[str, Path] = {}
        prefix: dict[str, Path] = {}
        for f in files:
            m = re.match(r"(prefix\.)?activation\.([^.]+)\..+\.pt$", f.name)
            if m:
                (prefix if m.group(1) else full)[m.group(2)] = f
        order = list(langs) if langs else sorted(full)
        missing = [x for x in order if x not in full]
        if missing:
            raise StatsError(f"no activation.<lang>.<tag>.pt file for languages {missing}")
        return import_njunlp({lang: (full[lang], prefix.get(lang)) for lang in order})
    raise StatsError(f"unknown import format {fmt!r}; use 'lape' or 'njunlp'")
