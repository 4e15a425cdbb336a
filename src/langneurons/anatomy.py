"""Layer anatomy of a NeuronMap: where the language neurons live, and the four phases.

`analyze(nmap)` turns a `NeuronMap` into an `Anatomy`:

* per-layer counts of specific / related / general / unassigned neurons, in total and per
  language ([K, L] per class);
* the appear histogram: selected neurons active in exactly N = 0..K languages (N = 0 are the
  *unassigned* selections, reported, never ablated);
* per-language totals and the pivot (English by default) against the other languages: the
  pivot is a known outlier and the report shows by how much;
* the language-overlap matrix [K, K]: selected specific/related neurons that two languages share
  (diagonal: the language's own count);
* the four phases (multilingual understanding; shared semantic-space reasoning; multilingual
  output-space transformation; vocabulary-space outputting) as contiguous layer ranges.

How the phases are found (docs/anatomy.md has the long version)
-------------------------------------------------------------
Each layer becomes a point with two coordinates: its number of *language* neurons
(specific + related) and its number of *general* neurons, each curve divided by its own maximum
over layers so both classes weigh the same whatever their absolute sizes. The layers are split
into exactly four contiguous segments, each at least ``min_len`` layers long, minimising the
within-segment sum of squared deviations from the segment mean (piecewise-constant least
squares). The minimum is found exactly by dynamic programming over change points (O(4·L²)),
never by hard-coded layer numbers. Ties (costs equal within 1e-10 of the total sum of squares)
go to the earliest possible start of each segment, scanning from the last segment backwards, so
the result is deterministic.

The segmentation is *reliable* only when all of these hold (thresholds in `PhaseConfig`):

* the model has more than ``4 · min_len`` layers (min_len defaults to max(2, round(L/16))); with
  exactly ``4 · min_len`` the split is forced, not found;
* the four-segment fit explains at least ``min_r2`` (0.5) of the variance of the curves;
* it beats shuffled layers: a permutation test (``permutations`` = 199 random layer orders with
  a fixed seed, each segmented the same way) gives p <= ``max_p`` (0.05). Noise alone gets a
  sizeable R² when there are few layers per segment; this test calibrates for that;
* the fourth segment is needed: going from 3 to 4 segments removes at least ``min_gain4``
  (1%) of the variance (otherwise the curves show fewer than four phases).

Otherwise the best-effort segmentation is still returned, with ``phases_reliable = False`` and a
plain-English ``phases_note`` saying why. Flat or all-zero curves get four equal-length
segments; fewer than four layers give no phases at all. The phases are named in depth order;
whether they show the paper's signature (fewer language neurons in phase 2 than in phases 1 and
3) is checked and reported as evidence, not assumed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import NeuronMapError
from .io import atomic_write_json, sha256_file
from .neurons import COUNTED_CLASSES, GENERAL, RELATED, SPECIFIC, UNASSIGNED, NeuronMap
from .runs import RunDir

PHASE_NAMES = (
    "multilingual understanding",
    "shared semantic-space reasoning",
    "multilingual output-space transformation",
    "vocabulary-space outputting",
)
CLASSES = COUNTED_CLASSES
_CODES = {"specific": SPECIFIC, "related": RELATED, "general": GENERAL, "unassigned": UNASSIGNED}
SCHEMA_VERSION = 1


@dataclass
class PhaseConfig:
    """Settings of the phase segmentation (defaults are the documented ones)."""

    min_len: int | None = None  # minimum layers per phase; None = max(2, round(L / 16))
    min_r2: float = 0.5  # the 4-segment fit must explain at least this share of the variance
    max_p: float = 0.05  # ... and beat shuffled layer orders at this level
    min_gain4: float = 0.01  # ... and the 4th segment must remove at least this share of the variance
    permutations: int = 199
    seed: int = 0

    def auto_min_len(self, num_layers: int) -> int:
        return self.min_len if self.min_len is not None else max(2, round(num_layers / 16))


# -- segmentation ------------------------------------------------------------------------
@dataclass
class Segmentation:
    """Best split of a curve [L, D] into contiguous segments (exact least squares)."""

    starts: list[int]  # first layer of each segment
    ends: list[int]  # last layer of each segment (inclusive)
    cost: float  # within-segment sum of squared deviations
    total_ss: float  # sum of squared deviations around the global mean (= cost with 1 segment)
    costs_by_k: list[float]  # optimal cost with 1..n_segments segments (inf where impossible)
    min_len: int

    @property
    def r2(self) -> float:
        return 1.0 - self.cost / self.total_ss if self.total_ss > 0 else 0.0


def _cost_matrix(x: np.ndarray, min_len: int) -> np.ndarray:
    """C[b, i, j] = within-segment SSE of rows i..j-1 of x[b] (inf when j - i < min_len)."""
    b, n, _ = x.shape
    s1 = np.concatenate([np.zeros((b, 1, x.shape[2])), np.cumsum(x, axis=1)], axis=1)  # [B, L+1, D]
    s2 = np.concatenate([np.zeros((b, 1)), np.cumsum((x ** 2).sum(-1), axis=1)], axis=1)  # [B, L+1]
    idx = np.arange(n + 1)
    length = idx[None, :] - idx[:, None]  # [i, j] = j - i
    diff = s1[:, None, :, :] - s1[:, :, None, :]  # [B, i, j, D] = S1[j] - S1[i]
    sse = (s2[:, None, :] - s2[:, :, None]) - (diff ** 2).sum(-1) / np.maximum(length, 1)
    return np.where(length >= min_len, np.maximum(sse, 0.0), np.inf)


def _dp(x: np.ndarray, n_segments: int, min_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact DP over change points for a batch x [B, L, D].

    Returns (costs [B, n_segments] for 1..n_segments segments, starts [B, n_segments], total_ss [B]).
    """
    b, n, _ = x.shape
    cost = _cost_matrix(x, min_len)
    total_ss = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2))
    tol = 1e-10 * float(total_ss.max(initial=0.0)) + 1e-15
    best = np.full((b, n + 1), np.inf)
    best[:, 0] = 0.0
    back = np.zeros((n_segments, b, n + 1), dtype=np.int64)
    costs = np.empty((b, n_segments))
    for s in range(n_segments):
        vals = best[:, :, None] + cost  # [B, i, j]: best s-segment cover of :i, then one segment i:j
        low = vals.min(axis=1)  # [B, j]
        # ties: the earliest i whose cost is within tol of the minimum (deterministic)
        back[s] = np.argmax(vals <= low[:, None, :] + tol, axis=1)
        best = low
        costs[:, s] = best[:, n]
    starts = np.empty((b, n_segments), dtype=np.int64)
    j = np.full(b, n)
    rows = np.arange(b)
    for s in range(n_segments - 1, -1, -1):
        j = back[s, rows, j]
        starts[:, s] = j
    return costs, starts, total_ss


def segment_curves(curves: np.ndarray | torch.Tensor, n_segments: int = 4, min_len: int = 1) -> Segmentation:
    """Split the rows (layers) of ``curves`` [L] or [L, D] into ``n_segments`` contiguous segments
    of at least ``min_len`` rows, minimising the within-segment sum of squared deviations (exact).

    Needs ``n_segments * min_len <= L``.
    """
    x = np.asarray(curves, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if n_segments < 1 or min_len < 1 or n_segments * min_len > n:
        raise ValueError(f"cannot split {n} layers into {n_segments} segments of at least {min_len}")
    costs, starts, total_ss = _dp(x[None], n_segments, min_len)
    st = starts[0].tolist()
    ends = [s - 1 for s in st[1:]] + [n - 1]
    return Segmentation(st, ends, float(costs[0, -1]), float(total_ss[0]), costs[0].tolist(), min_len)


def permutation_p_value(curves: np.ndarray, observed_r2: float, n_segments: int, min_len: int,
                        permutations: int = 199, seed: int = 0) -> float:
    """Share of random layer orders whose best segmentation fits at least as well (with the +1
    correction, so p >= 1 / (permutations + 1)). Deterministic for a given seed."""
    x = np.asarray(curves, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if permutations <= 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((permutations, x.shape[0])), axis=1)
    hits = 0
    for chunk in np.array_split(np.arange(permutations), max(1, math.ceil(permutations / 64))):
        xp = x[order[chunk]]  # [b, L, D]
        costs, _, total_ss = _dp(xp, n_segments, min_len)
        r2 = 1.0 - costs[:, -1] / np.where(total_ss > 0, total_ss, 1.0)
        hits += int((r2 >= observed_r2 - 1e-12).sum())
    return (hits + 1) / (permutations + 1)


def phase_features(per_layer: dict[str, list[int]]) -> np.ndarray:
    """[L, 2]: (specific + related, general) per layer, each curve scaled by its max over layers."""
    lang = np.asarray(per_layer["specific"], dtype=np.float64) + np.asarray(per_layer["related"], dtype=np.float64)
    gen = np.asarray(per_layer["general"], dtype=np.float64)
    feats = np.stack([lang, gen], axis=1) if len(lang) else np.zeros((0, 2))
    top = feats.max(axis=0, initial=0.0)
    return feats / np.where(top > 0, top, 1.0)


# -- the anatomy ---------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    start: int  # first layer (0-based, inclusive)
    end: int  # last layer (inclusive)
    mean_share: dict[str, float] = field(default_factory=dict)  # class -> mean share of the layer's neurons

    @property
    def layers(self) -> int:
        return self.end - self.start + 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "end": self.end, "layers": self.layers,
                "mean_share": self.mean_share}


@dataclass
class Anatomy:
    languages: list[str]
    num_layers: int
    num_neurons: int
    model: str
    method: str | None
    per_layer: dict[str, list[int]]  # class -> [L]
    per_layer_language: dict[str, list[list[int]]]  # class -> [K][L]
    appear: list[int]  # [K + 1]: selected neurons active in exactly N languages; appear[0] = unassigned
    selected: int
    totals: dict[str, int]
    per_language: dict[str, dict[str, int]]
    pivot: dict[str, Any]
    overlap: list[list[int]]  # [K][K]
    phases: list[Phase]
    phases_reliable: bool
    phases_note: str
    phase_evidence: dict[str, Any]
    neurons_sha256: str | None = None

    @property
    def unassigned(self) -> int:
        return self.appear[0] if self.appear else 0

    @property
    def unassigned_share(self) -> float:
        return self.unassigned / self.selected if self.selected else 0.0

    def phase_of_layer(self) -> list[str]:
        out = [""] * self.num_layers
        for ph in self.phases:
            for layer in range(ph.start, ph.end + 1):
                out[layer] = ph.name
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [p.to_json() for p in self.phases]
        d["unassigned"] = self.unassigned
        d["unassigned_share"] = self.unassigned_share
        d["schema_version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Anatomy":
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        kw["phases"] = [Phase(p["name"], int(p["start"]), int(p["end"]), dict(p.get("mean_share", {})))
                        for p in d.get("phases", [])]
        return cls(**kw)

    def save(self, run_dir: str | Path) -> Path:
        run = RunDir(run_dir)
        path = atomic_write_json(run.anatomy_path, self.to_json())
        run.update_manifest({"anatomy": {
            "file": run.anatomy_path.name, "pivot": self.pivot.get("lang"),
            "phases": [[p.name, p.start, p.end] for p in self.phases],
            "phases_reliable": self.phases_reliable, "neurons_sha256": self.neurons_sha256}})
        run.record_checksum(path)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> "Anatomy":
        import json

        path = RunDir(run_dir).anatomy_path
        if not path.is_file():
            raise NeuronMapError(f"{path} does not exist; run `langneurons anatomy {run_dir}` first")
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise NeuronMapError(f"{path} is not a valid anatomy file ({exc}); run `langneurons anatomy` again") from None


def _class_counts(nmap: NeuronMap) -> tuple[dict[str, list[int]], dict[str, list[list[int]]]]:
    """Per-layer counts per class, in total and per language ([K, L]).

    Only the classified neurons (a few % of all) are gathered and counted with bincount: summing
    the full bool [K, L, N] masks class by class takes seconds on 7B-size models."""
    n_lang, n_layers, n_neurons = nmap.K, nmap.num_layers, nmap.num_neurons
    flat_cls = nmap.classes.reshape(-1)
    idx = (flat_cls != 0).nonzero().squeeze(1)
    layer_of, codes = idx // max(n_neurons, 1), flat_cls[idx]
    act = nmap.active.to(torch.bool).reshape(n_lang, -1)[:, idx]  # [K, M]
    per_layer, per_lang = {}, {}
    for name in CLASSES:
        m = codes == _CODES[name]
        layers_c = layer_of[m]
        per_layer[name] = torch.bincount(layers_c, minlength=n_layers).tolist()
        kk, mm = act[:, m].nonzero(as_tuple=True)
        per_lang[name] = torch.bincount(kk * n_layers + layers_c[mm], minlength=n_lang * n_layers) \
            .view(n_lang, n_layers).tolist()
    return per_layer, per_lang


def _pivot_summary(pivot: str, per_language: dict[str, dict[str, int]]) -> dict[str, Any]:
    if pivot not in per_language:
        return {"lang": pivot, "present": False,
                "note": f"the pivot language {pivot!r} is not among the analysed languages "
                        f"({', '.join(per_language) or 'none'}); no pivot comparison"}
    own = per_language[pivot]["language"]
    others = [v["language"] for k, v in per_language.items() if k != pivot]
    if not others:
        return {"lang": pivot, "present": True, "count": own, "others": 0,
                "note": f"{pivot} is the only language; nothing to compare it with"}
    mean, median = statistics.fmean(others), float(statistics.median(others))
    rank = 1 + sum(1 for v in others if v > own)
    ratio = own / mean if mean > 0 else None
    ratio_txt = f"{ratio:.2f}x the mean" if ratio is not None else "the others have none"
    return {"lang": pivot, "present": True, "count": own, "others": len(others), "others_mean": mean,
            "others_median": median, "others_min": min(others), "others_max": max(others),
            "ratio_to_mean": ratio, "rank": rank,
            "note": f"{pivot} has {own:,} specific+related neurons, {ratio_txt} of the other "
                    f"{len(others)} languages (mean {mean:,.1f}, median {median:,.1f}); rank {rank} of "
                    f"{len(others) + 1}"}


def find_phases(per_layer: dict[str, list[int]], num_neurons: int,
                config: PhaseConfig | None = None) -> tuple[list[Phase], bool, str, dict[str, Any]]:
    """Segment the class curves into the four phases; returns (phases, reliable, note, evidence)."""
    cfg = config or PhaseConfig()
    n_layers = len(per_layer["specific"])
    n_seg = len(PHASE_NAMES)
    counts = {c: np.asarray(per_layer.get(c, [0] * n_layers), dtype=np.float64) for c in CLASSES}
    shares = {c: v / max(num_neurons, 1) for c, v in counts.items()}
    shares["language"] = shares["specific"] + shares["related"]
    evidence: dict[str, Any] = {
        "method": "exact dynamic programming over change points (piecewise-constant least squares)",
        "features": ["specific+related count per layer / its max over layers",
                     "general count per layer / its max over layers"],
        "thresholds": {"min_r2": cfg.min_r2, "max_p": cfg.max_p, "min_gain4": cfg.min_gain4,
                       "permutations": cfg.permutations, "seed": cfg.seed},
    }
    if n_layers < n_seg:
        note = (f"the model has {n_layers} layer(s); four phases need at least {n_seg} layers "
                "(one per phase), so no phases are reported")
        return [], False, note, evidence

    problems: list[str] = []
    min_len = cfg.auto_min_len(n_layers)
    if n_layers < n_seg * min_len:
        problems.append(f"{n_layers} layers are too few for four phases of at least {min_len} layers each; "
                        f"the split uses {max(1, n_layers // n_seg)}-layer phases and is only indicative")
        min_len = max(1, n_layers // n_seg)
    elif n_layers == n_seg * min_len:
        problems.append(f"{n_layers} layers allow only one split into four phases of at least {min_len} layers: "
                        "the boundaries are forced, not found")
    evidence["min_segment_layers"] = min_len
    x = phase_features(per_layer)
    total_ss = float(((x - x.mean(axis=0)) ** 2).sum())
    evidence["total_ss"] = total_ss
    if not any(counts[c].any() for c in ("specific", "related", "general")):
        problems.append("no layer has any specific, related or general neuron: there are no class curves to "
                        "segment (equal-length phases shown)")
        starts = [int(a[0]) for a in np.array_split(np.arange(n_layers), n_seg)]
        evidence.update(cost=0.0, r2=0.0, r2_by_segments=[0.0] * n_seg, gain4=0.0, p_value=None)
    elif total_ss <= 1e-12:
        problems.append("the class curves are flat (every layer has the same counts): nothing separates the "
                        "phases (equal-length phases shown)")
        starts = [int(a[0]) for a in np.array_split(np.arange(n_layers), n_seg)]
        evidence.update(cost=0.0, r2=0.0, r2_by_segments=[0.0] * n_seg, gain4=0.0, p_value=None)
    else:
        seg = segment_curves(x, n_seg, min_len)
        starts = seg.starts
        r2_by = [min(1.0, max(0.0, 1.0 - c / total_ss)) for c in seg.costs_by_k]
        gain4 = (seg.costs_by_k[-2] - seg.costs_by_k[-1]) / total_ss
        p = permutation_p_value(x, seg.r2, n_seg, min_len, cfg.permutations, cfg.seed) \
            if cfg.permutations > 0 else None  # permutations=0 switches the test off
        evidence.update(cost=seg.cost, r2=seg.r2, r2_by_segments=r2_by, gain4=gain4, p_value=p)
        if seg.r2 < cfg.min_r2:
            problems.append(f"four phases explain only {seg.r2:.0%} of the variation of the class curves "
                            f"(needs {cfg.min_r2:.0%}): the curves are too flat or noisy")
        if p is not None and p > cfg.max_p:
            problems.append(f"the split is no better than for randomly shuffled layers (permutation p = {p:.2f} "
                            f"> {cfg.max_p})")
        if gain4 < cfg.min_gain4:
            problems.append(f"a fourth phase adds only {gain4:.1%} explained variance over three "
                            f"(needs {cfg.min_gain4:.0%}): the curves show fewer than four distinct phases")
    ends = [s - 1 for s in starts[1:]] + [n_layers - 1]
    phases = []
    for name, a, b in zip(PHASE_NAMES, starts, ends):
        phases.append(Phase(name, int(a), int(b), {c: float(v[a:b + 1].mean()) for c, v in shares.items()}))
    lang_means = [p.mean_share["language"] for p in phases]
    dip = bool(lang_means[1] < lang_means[0] and lang_means[1] < lang_means[2])
    evidence["language_dip_in_phase_2"] = dip
    reliable = not problems
    notes = list(problems)
    if not dip and (counts["specific"].any() or counts["related"].any()):
        notes.append("phase 2 does not have fewer language neurons than phases 1 and 3 (the published pattern); "
                     "read the phase names as positions, not as established functions")
    return phases, reliable, "; ".join(notes), evidence


def analyze(nmap: NeuronMap, pivot: str = "en", config: PhaseConfig | None = None,
            neurons_sha256: str | None = None) -> Anatomy:
    """Layer anatomy of ``nmap`` (see the module docstring)."""
    per_layer, per_lang = _class_counts(nmap)
    k = nmap.K
    flat_active = nmap.active.to(torch.bool).reshape(k, -1)
    selected = nmap.selected.to(torch.bool).reshape(-1)
    n_act = flat_active[:, selected.nonzero().squeeze(1)].sum(0)
    appear = torch.bincount(n_act.to(torch.int64), minlength=k + 1).tolist()
    flat_cls = nmap.classes.reshape(-1)
    owned = ((flat_cls == SPECIFIC) | (flat_cls == RELATED)).nonzero().squeeze(1)
    lang_cls = flat_active[:, owned].to(torch.float64)  # [K, M]: the specific/related neurons of each language
    overlap = (lang_cls @ lang_cls.T).round().to(torch.int64).tolist() if k else []
    own = lang_cls.sum(1).round().to(torch.int64).tolist()
    per_language = {}
    for i, lang in enumerate(nmap.languages):
        spec = sum(per_lang["specific"][i])
        rel = sum(per_lang["related"][i])
        per_language[lang] = {"specific": spec, "related": rel, "general": sum(per_lang["general"][i]),
                              "language": int(own[i])}
    totals = {c: sum(per_layer[c]) for c in CLASSES}
    phases, reliable, note, evidence = find_phases(per_layer, nmap.num_neurons, config)
    return Anatomy(
        languages=list(nmap.languages), num_layers=nmap.num_layers, num_neurons=nmap.num_neurons,
        model=str(nmap.meta.get("model") or ""), method=nmap.meta.get("method"),
        per_layer=per_layer, per_layer_language=per_lang, appear=appear, selected=int(selected.sum()),
        totals=totals, per_language=per_language, pivot=_pivot_summary(pivot, per_language), overlap=overlap,
        phases=phases, phases_reliable=reliable, phases_note=note, phase_evidence=evidence,
        neurons_sha256=neurons_sha256,
    )


def analyze_run(run_dir: str | Path, pivot: str = "en", config: PhaseConfig | None = None) -> Anatomy:
    """Load RUN_DIR/neurons.safetensors and analyse it (does not write anything)."""
    run = RunDir(run_dir)
    if not run.neurons_path.is_file():
        raise NeuronMapError(f"{run.neurons_path} does not exist; run `langneurons identify {run_dir}` first")
    nmap = NeuronMap.load(run.neurons_path)
    if not nmap.meta.get("model"):
        model = run.read_manifest().get("model")
        if isinstance(model, dict) and model.get("model"):
            nmap.meta["model"] = model["model"]
    return analyze(nmap, pivot, config, neurons_sha256=sha256_file(run.neurons_path))


def load_or_analyze(run_dir: str | Path, pivot: str | None = None, save: bool = True) -> Anatomy:
    """RUN_DIR/anatomy.json when it matches the current neuron map (and pivot), else recompute
    (and save when ``save``)."""
    run = RunDir(run_dir)
    if not run.neurons_path.is_file():
        raise NeuronMapError(f"{run.neurons_path} does not exist; run `langneurons identify {run_dir}` first")
    previous = None
    if run.anatomy_path.is_file():
        try:
            previous = Anatomy.load(run_dir)
        except NeuronMapError:
            previous = None
        if (previous is not None and previous.neurons_sha256 == sha256_file(run.neurons_path)
                and (pivot is None or previous.pivot.get("lang") == pivot)):
            return previous
    if pivot is None:
        pivot = str(previous.pivot.get("lang") or "en") if previous is not None else "en"
    an = analyze_run(run_dir, pivot)
    if save:
        an.save(run_dir)
    return an
