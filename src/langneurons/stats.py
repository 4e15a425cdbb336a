"""Activation statistics: how often each MLP neuron fires, per language.

For language k, layer l, neuron n we keep
    tokens[k]          number of counted tokens (int64)
    positive[k, l, n]  number of counted tokens whose activation is > 0 (int64)
    sums[k, l, n]      sum of the activation over counted tokens (float64, optional)
and p[k, l, n] = positive / tokens. Counts from shards and processes add up exactly, which
is why we store counts and never probabilities: merging is addition.

On disk a run directory holds ``stats/<lang>.safetensors`` (tensors ``positive`` [L, N],
``tokens`` 0-d, ``sum`` [L, N]) with a JSON metadata blob under the key ``langneurons``, and
``manifest.json`` listing the languages in order and each file's sha256.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import StatsError
from .io import atomic_write, sha256_file
from .runs import RunDir

#: metadata keys that must agree for two stats to be merged or stacked
COMPAT_KEYS = ("model_fingerprint", "scope", "hook_point", "include_special", "dtype")
FEW_TOKENS = 1000


@dataclass
class LanguageStats:
    """Counts for one language (the unit that is written, resumed and merged)."""

    lang: str
    positive: torch.Tensor  # int64 [L, N]
    tokens: int
    sums: torch.Tensor | None = None  # float64 [L, N]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positive.shape)  # type: ignore[return-value]

    def save(self, path: str | Path) -> Path:
        tensors = {"positive": self.positive.to(torch.int64).contiguous().cpu(),
                   "tokens": torch.tensor(int(self.tokens), dtype=torch.int64)}
        if self.sums is not None:
            tensors["sum"] = self.sums.to(torch.float64).contiguous().cpu()
        meta = dict(self.meta, lang=self.lang, tokens=int(self.tokens))
        blob = {"langneurons": json.dumps(meta, ensure_ascii=False, default=str)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=blob))

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> "LanguageStats":
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"stats file {path} does not exist; run `langneurons record` first")
        if expected_sha256 is not None and sha256_file(path) != expected_sha256:
            raise StatsError(f"stats file {path} is corrupt (checksum differs from manifest.json); "
                             "delete it and record that language again")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("langneurons", "{}")
        except (SafetensorError, OSError, ValueError) as exc:
            raise StatsError(f"stats file {path} is unreadable or truncated ({exc}); "
                             "delete it and record that language again") from None
        meta = json.loads(raw)
        if "positive" not in tensors or "tokens" not in tensors:
            raise StatsError(f"stats file {path} lacks 'positive'/'tokens' tensors")
        lang = meta.get("lang", path.stem)
        return cls(lang=lang, positive=tensors["positive"].to(torch.int64),
                   tokens=int(tensors["tokens"].item()), sums=tensors.get("sum"), meta=meta)

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
        if self.sums is not None and torch.isnan(self.sums).any():
            raise StatsError(f"{where}: activation sums contain NaN (overflow in a low-precision run?)")

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
        return LanguageStats(self.lang, self.positive + other.positive, self.tokens + other.tokens, sums, meta)


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
        """Mean activation per language and neuron (needs the sums)."""
        if self.sums is None:
            raise StatsError("these stats carry no activation sums (imported files have none); "
                             "record them with langneurons to use mean-value interventions")
        return self.sums / self.tokens.clamp(min=1).to(torch.float64).view(-1, 1, 1)

    def language(self, lang: str) -> LanguageStats:
        k = self.languages.index(lang)
        return LanguageStats(lang, self.positive[k], int(self.tokens[k]),
                             None if self.sums is None else self.sums[k], dict(self.meta))

    def subset(self, langs: Sequence[str]) -> "ActivationStats":
        missing = [x for x in langs if x not in self.languages]
        if missing:
            raise StatsError(f"languages {missing} are not in the stats (have: {','.join(self.languages)})")
        idx = torch.tensor([self.languages.index(x) for x in langs])
        return ActivationStats(list(langs), self.positive[idx], self.tokens[idx],
                               None if self.sums is None else self.sums[idx], dict(self.meta))

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(json.dumps(self.languages).encode())
        h.update(self.tokens.numpy().tobytes())
        h.update(self.positive.numpy().tobytes())
        return h.hexdigest()[:16]

    def validate(self, *, min_languages: int = 2) -> None:
        """Raise StatsError on inputs that would silently give wrong neurons."""
        if len(self.languages) < min_languages:
            raise StatsError(f"need at least {min_languages} languages to identify language neurons, "
                             f"got {len(self.languages)} ({','.join(self.languages)})")
        if len(set(self.languages)) != len(self.languages):
            raise StatsError(f"duplicate languages in stats: {self.languages}")
        for k, lang in enumerate(self.languages):
            if int(self.tokens[k]) == 0:
                raise StatsError(f"language {lang!r} has zero counted tokens; give it text or drop it with --langs")
            self.language(lang).validate()
            if int(self.tokens[k]) < FEW_TOKENS:
                warnings.warn(f"language {lang!r} has only {int(self.tokens[k])} counted tokens; "
                              "its activation probabilities are noisy", stacklevel=2)

    @classmethod
    def stack(cls, parts: Sequence[LanguageStats]) -> "ActivationStats":
        if not parts:
            raise StatsError("no language statistics given")
        check_compatible([p.meta for p in parts], [p.shape for p in parts])
        has_sums = all(p.sums is not None for p in parts)
        meta = {k: v for k, v in parts[0].meta.items() if k not in ("lang", "tokens", "corpus_fingerprint")}
        return cls(
            languages=[p.lang for p in parts],
            positive=torch.stack([p.positive for p in parts]),
            tokens=torch.tensor([p.tokens for p in parts], dtype=torch.int64),
            sums=torch.stack([p.sums for p in parts]) if has_sums else None,  # type: ignore[misc]
            meta=meta,
        )

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
    def load(cls, path: str | Path, langs: Sequence[str] | None = None) -> "ActivationStats":
        """Load from a run directory (uses manifest order) or a bare ``stats/`` directory."""
        path = Path(path)
        if not path.exists():
            raise StatsError(f"{path} does not exist; give a run directory written by `langneurons record`")
        run = RunDir(path if (path / "stats").is_dir() or (path / "manifest.json").exists() else path.parent)
        stats_dir = path if path.name == "stats" and not (path / "stats").is_dir() else run.stats_dir
        manifest = run.read_manifest()
        order = list(langs) if langs else manifest.get("languages") or sorted(p.stem for p in stats_dir.glob("*.safetensors"))
        if not order:
            raise StatsError(f"no stats found under {stats_dir}; run `langneurons record` first")
        checksums = manifest.get("checksums", {})
        parts = [LanguageStats.load(stats_dir / f"{lang}.safetensors", checksums.get(f"stats/{lang}.safetensors"))
                 for lang in order]
        return cls.stack(parts)


def merge_language_stats(parts: Iterable[LanguageStats]) -> LanguageStats:
    parts = list(parts)
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def merge_runs(inputs: Sequence[str | Path], out: str | Path) -> ActivationStats:
    """Add the counts of several runs/shards of the same model (``langneurons merge``)."""
    loaded = [ActivationStats.load(p) for p in inputs]
    langs: list[str] = []
    for s in loaded:
        langs += [x for x in s.languages if x not in langs]
    merged: list[LanguageStats] = []
    for lang in langs:
        parts = [s.language(lang) for s in loaded if lang in s.languages]
        merged.append(merge_language_stats(parts))
    result = ActivationStats.stack(merged)
    _check_shards(loaded, result)
    result.save(out, extra_manifest={"merged_from": [str(p) for p in inputs]})
    return result


def _check_shards(loaded: Sequence[ActivationStats], result: ActivationStats) -> None:
    """Shards declared as ``i/n`` must be disjoint, and complete when all are given."""
    seen: dict[str, list[int]] = {}
    total = None
    for s in loaded:
        shard = s.meta.get("shard")
        if shard is None:
            continue
        i, n = (int(x) for x in str(shard).split("/"))
        total = n if total is None else total
        if n != total:
            raise StatsError(f"shards of different splits given together ({shard} vs n={total})")
        seen.setdefault("all", []).append(i)
    if total is not None:
        idx = seen["all"]
        if len(idx) != len(set(idx)):
            raise StatsError(f"shard indices repeat ({sorted(idx)}): the same shard was given twice")
        result.meta["shard"] = None
        result.meta["shards"] = sorted(idx)
        if sorted(idx) != list(range(total)):
            warnings.warn(f"merged shards {sorted(idx)} of {total}: the merge is incomplete", stacklevel=2)


# -- interop with the published formats ---------------------------------------------------
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles of arbitrary objects are refused on purpose
        raise StatsError(f"cannot read {path} with torch.load(weights_only=True): {exc}") from None


def import_lape(files: dict[str, Path]) -> list[LanguageStats]:
    """LAPE files ``{"n": int, "over_zero": [L, N]}``, one per language."""
    out = []
    for lang, f in files.items():
        obj = _torch_load(f)
        if not isinstance(obj, dict) or "n" not in obj or "over_zero" not in obj:
            raise StatsError(f"{f} is not a LAPE activation file (needs keys 'n' and 'over_zero')")
        pos = torch.as_tensor(obj["over_zero"]).to(torch.int64)
        out.append(LanguageStats(lang, pos, int(obj["n"]), None,
                                 {"source_format": "lape", "source_file": str(f), "scope": "all"}))
    return out


def import_njunlp(files: dict[str, tuple[Path, Path | None]]) -> list[LanguageStats]:
    """The paper authors' full/prefix pairs ``{"total_tokens", "over_zero"}``.

    response counts = clamp(full - prefix, 0), tokens = full - prefix (their two-pass method).
    """
    out = []
    for lang, (full_f, prefix_f) in files.items():
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
