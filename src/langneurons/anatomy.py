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
The language curve (specific + related per layer) leads; the general curve breaks ties. Each is
divided by a robust scale (its 0.9 quantile over layers, so one spike such as the general neurons
of a 7B model's last layer cannot flatten the rest) and clipped; general is weighted 0.25. The
layers are split into four contiguous segments of at least ``min_len`` layers fitted by the
published shape: phase 1 a level, phase 2 a level, phase 3 a line (the gradual rise), phase 4 a
level, minimising the total squared residual exactly by dynamic programming (O(4·L²)); ties go
to the earliest boundaries, so the result is deterministic.

``phases_reliable`` means the shape is there: every check in ``phase_evidence["checks"]`` passes
(enough layers, fit R² >= min_r2, permutation p <= max_p against shuffled layer orders, a low
middle, a rise in phase 3 and a final change in phase 4, the last three at least ``min_step``
of the language curve's scale). ``phase_evidence["missing"]`` names the failed checks and
``phases_note`` says what is missing in words. The best-effort segmentation is always returned.
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
    min_r2: float = 0.5  # the four-phase shape must explain at least this share of the variance
    max_p: float = 0.05  # ... and beat shuffled layer orders at this level
    min_step: float = 0.2  # low middle, rise and final change: each at least this, in language-scale units
    scale_quantile: float = 0.9  # each curve is divided by this quantile over layers (robust to spikes)
    clip: float = 2.0  # ... and clipped at this many scales
    general_weight: float = 0.25  # weight of the general curve (the language curve leads)
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


#: The segment model of each phase, in depth order: "const" = a level, "linear" = a line.
SHAPE_MODELS = ("const", "const", "linear", "const")


def _cost_matrices(x: np.ndarray, models: tuple[str, ...], min_len: int) -> list[np.ndarray]:
    """One [B, L+1, L+1] matrix per distinct model: C[b, i, j] = least-squares SSE of rows i..j-1
    of x[b] under that model (each column fitted separately), inf when j - i < min_len.

    Prefix sums make every entry O(D); the line fit uses layer positions centred on the model's
    middle so the sums stay well conditioned."""
    b, n, _ = x.shape
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros_like(a[:, :1]), np.cumsum(a, axis=1)], axis=1)

    s_y = pad(x)  # [B, L+1, D]
    s_yy = pad(x ** 2)
    idx = np.arange(n + 1)
    length = idx[None, :] - idx[:, None]  # [i, j] = j - i
    ln = np.maximum(length, 1).astype(np.float64)
    sy = s_y[:, None, :, :] - s_y[:, :, None, :]  # [B, i, j, D]
    syy = s_yy[:, None, :, :] - s_yy[:, :, None, :]
    const = (syy - sy ** 2 / ln[None, :, :, None]).sum(-1)
    out: dict[str, np.ndarray] = {"const": const}
    if "linear" in models:
        st1 = np.concatenate([[0.0], np.cumsum(t)])
        st2 = np.concatenate([[0.0], np.cumsum(t ** 2)])
        s_ty = pad(x * t[None, :, None])
        st = st1[None, :] - st1[:, None]
        stt = st2[None, :] - st2[:, None] - st ** 2 / ln  # centred sum of squares of positions
        sty = (s_ty[:, None, :, :] - s_ty[:, :, None, :]) - st[None, :, :, None] * sy / ln[None, :, :, None]
        safe = np.where(stt > 1e-9, stt, np.inf)
        out["linear"] = const - (sty ** 2).sum(-1) / safe[None]
    valid = length >= min_len
    return [np.where(valid, np.maximum(out[m], 0.0), np.inf) for m in models]


def _dp_models(x: np.ndarray, models: tuple[str, ...], min_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact DP over change points for a batch x [B, L, D], segment s following models[s].

    Returns (costs [B, S]: best cover of all L layers by the first s+1 segments, starts [B, S],
    total_ss [B]). Ties (within 1e-10 of the largest total sum of squares) go to the earliest
    start of each segment, backtracking from the last segment, so the result is deterministic."""
    b, n, _ = x.shape
    mats = _cost_matrices(x, models, min_len)
    total_ss = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2))
    tol = 1e-10 * float(total_ss.max(initial=0.0)) + 1e-15
    best = np.full((b, n + 1), np.inf)
    best[:, 0] = 0.0
    back = np.zeros((len(models), b, n + 1), dtype=np.int64)
    costs = np.empty((b, len(models)))
    for s, cost in enumerate(mats):
        vals = best[:, :, None] + cost  # [B, i, j]
        low = vals.min(axis=1)
        back[s] = np.argmax(vals <= low[:, None, :] + tol, axis=1)
        best = low
        costs[:, s] = best[:, n]
    starts = np.empty((b, len(models)), dtype=np.int64)
    j = np.full(b, n)
    rows = np.arange(b)
    for s in range(len(models) - 1, -1, -1):
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
    costs, starts, total_ss = _dp_models(x[None], ("const",) * n_segments, min_len)
    st = starts[0].tolist()
    ends = [s - 1 for s in st[1:]] + [n - 1]
    return Segmentation(st, ends, float(costs[0, -1]), float(total_ss[0]), costs[0].tolist(), min_len)


def segment_shape(curves: np.ndarray | torch.Tensor, models: tuple[str, ...] = SHAPE_MODELS,
                  min_len: int = 1) -> Segmentation:
    """Split the rows (layers) of ``curves`` [L] or [L, D] into ``len(models)`` contiguous segments
    of at least ``min_len`` rows, segment s fitted by ``models[s]`` ("const": its mean, "linear":
    a least-squares line per column), minimising the total squared residual (exact DP).

    ``costs_by_k[s]`` is the best cover of all layers by the first s+1 segment models."""
    x = np.asarray(curves, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n, k = x.shape[0], len(models)
    if k < 1 or min_len < 1 or k * min_len > n or any(m not in ("const", "linear") for m in models):
        raise ValueError(f"cannot split {n} layers into segments {models} of at least {min_len}")
    costs, starts, total_ss = _dp_models(x[None], tuple(models), min_len)
    st = starts[0].tolist()
    ends = [s - 1 for s in st[1:]] + [n - 1]
    return Segmentation(st, ends, float(costs[0, -1]), float(total_ss[0]), costs[0].tolist(), min_len)


def permutation_p_value(curves: np.ndarray, observed_r2: float, n_segments: int, min_len: int,
                        permutations: int = 199, seed: int = 0, models: tuple[str, ...] | None = None) -> float:
    """Share of random layer orders whose best segmentation fits at least as well (with the +1
    correction, so p >= 1 / (permutations + 1)). Deterministic for a given seed. ``models``
    (default: ``n_segments`` constant segments) is the segment model used for every shuffle."""
    x = np.asarray(curves, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if permutations <= 0:
        return float("nan")
    models = tuple(models) if models is not None else ("const",) * n_segments
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((permutations, x.shape[0])), axis=1)
    hits = 0
    for chunk in np.array_split(np.arange(permutations), max(1, math.ceil(permutations / 64))):
        xp = x[order[chunk]]  # [b, L, D]
        costs, _, total_ss = _dp_models(xp, models, min_len)
        r2 = 1.0 - costs[:, -1] / np.where(total_ss > 0, total_ss, 1.0)
        hits += int((r2 >= observed_r2 - 1e-12).sum())
    return (hits + 1) / (permutations + 1)


def robust_scale(v: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of ``v`` over layers (linear interpolation), else its max, else 1.

    A high quantile is the typical high level of a curve; unlike the max, one spike (e.g. general
    neurons in the last layer) does not shrink every other layer to nothing."""
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        return 1.0
    q = float(np.quantile(v, quantile))
    if q > 0:
        return q
    top = float(v.max())
    return top if top > 0 else 1.0


def phase_features(per_layer: dict[str, list[int]], config: "PhaseConfig | None" = None,
                   general_available: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """([L, 2], scales): the segmented curves and the scales used.

    Column 0: language neurons (specific + related) / their robust scale, clipped at ``clip``;
    column 1: general neurons / their robust scale, clipped at ``clip``, times ``general_weight``
    (the language curve leads, general breaks ties); all zero when general is not available."""
    cfg = config or PhaseConfig()
    lang = np.asarray(per_layer["specific"], dtype=np.float64) + np.asarray(per_layer["related"], dtype=np.float64)
    gen = np.asarray(per_layer.get("general", [0] * len(lang)), dtype=np.float64)
    s_lang, s_gen = robust_scale(lang, cfg.scale_quantile), robust_scale(gen, cfg.scale_quantile)
    a = np.minimum(lang / s_lang, cfg.clip)
    g = cfg.general_weight * np.minimum(gen / s_gen, cfg.clip) if general_available else np.zeros_like(a)
    feats = np.stack([a, g], axis=1) if len(lang) else np.zeros((0, 2))
    return feats, {"language": s_lang, "general": s_gen if general_available else float("nan")}


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
        """Write RUN_DIR/anatomy.json (atomically). The manifest record is the stage's business
        (`stages.AnatomyStage`)."""
        return atomic_write_json(RunDir(run_dir).anatomy_path, self.to_json())

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


def _check(name: str, value: float | None, threshold: float | None, passed: bool, what: str) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed), "what": what}


def _line_ends(y: np.ndarray) -> tuple[float, float]:
    """Least-squares line through y over its positions: (fitted first value, fitted last value)."""
    if len(y) < 2:
        return float(y[0]), float(y[0])
    t = np.arange(len(y), dtype=np.float64)
    slope, icpt = np.polyfit(t, y, 1)
    return float(icpt), float(icpt + slope * (len(y) - 1))


def find_phases(per_layer: dict[str, list[int]], num_neurons: int, config: PhaseConfig | None = None,
                general_available: bool = True) -> tuple[list[Phase], bool, str, dict[str, Any]]:
    """Segment the class curves into the four phases; returns (phases, reliable, note, evidence).

    ``general_available=False`` (a map imported without statistics) segments the language curve
    alone and says so in the evidence."""
    cfg = config or PhaseConfig()
    n_layers = len(per_layer["specific"])
    n_seg = len(PHASE_NAMES)
    counts = {c: np.asarray(per_layer.get(c, [0] * n_layers), dtype=np.float64) for c in CLASSES}
    if not general_available:
        counts["general"] = np.zeros(n_layers)
    shares = {c: v / max(num_neurons, 1) for c, v in counts.items()}
    shares["language"] = shares["specific"] + shares["related"]
    evidence: dict[str, Any] = {
        "method": "exact dynamic programming over change points, shape-constrained least squares: "
                  "phase 1 a level, phase 2 a level, phase 3 a line, phase 4 a level",
        "models": list(SHAPE_MODELS),
        "features": ["specific+related per layer / its robust scale, clipped",
                     (f"general per layer / its robust scale, clipped, x {cfg.general_weight:g}" if general_available
                      else "general: not available (map imported without statistics); not used")],
        "general_available": general_available,
        "thresholds": {"min_r2": cfg.min_r2, "max_p": cfg.max_p, "min_step": cfg.min_step,
                       "scale_quantile": cfg.scale_quantile, "clip": cfg.clip,
                       "general_weight": cfg.general_weight, "permutations": cfg.permutations, "seed": cfg.seed},
        "checks": [], "missing": [],
    }
    if n_layers < n_seg:
        note = (f"the model has {n_layers} layer(s); four phases need at least {n_seg} layers "
                "(one per phase), so no phases are reported")
        evidence["missing"] = ["layers"]
        evidence["checks"] = [_check("layers", n_layers, n_seg, False, "enough layers for four phases")]
        return [], False, note, evidence

    problems: list[str] = []
    checks: list[dict[str, Any]] = []
    min_len = cfg.auto_min_len(n_layers)
    layers_ok = n_layers > n_seg * min_len
    if n_layers < n_seg * min_len:
        problems.append(f"too few layers: {n_layers} layers cannot hold four phases of at least {min_len} layers "
                        f"each; the split uses {max(1, n_layers // n_seg)}-layer phases and is only indicative")
        min_len = max(1, n_layers // n_seg)
    elif n_layers == n_seg * min_len:
        problems.append(f"too few layers: {n_layers} layers allow only one split into four phases of at least "
                        f"{min_len} layers: the boundaries are forced, not found")
    checks.append(_check("layers", n_layers, n_seg * min_len, layers_ok,
                         "more layers than four phases of the minimum length (otherwise the split is forced)"))
    evidence["min_segment_layers"] = min_len
    x, scales = phase_features(per_layer, cfg, general_available)
    evidence["scales"] = scales
    total_ss = float(((x - x.mean(axis=0)) ** 2).sum())
    evidence["total_ss"] = total_ss
    degenerate = None
    if not any(counts[c].any() for c in ("specific", "related", "general")):
        degenerate = ("no layer has any specific, related or general neuron: there are no class curves to "
                      "segment (equal-length phases shown)")
    elif total_ss <= 1e-12:
        degenerate = ("the class curves are flat (every layer has the same counts): nothing separates the "
                      "phases (equal-length phases shown)")
    if degenerate is not None:
        problems.append(degenerate)
        starts = [int(a[0]) for a in np.array_split(np.arange(n_layers), n_seg)]
        evidence.update(cost=0.0, r2=0.0, r2_by_segments=[0.0] * n_seg, gain4=0.0, p_value=None)
        checks.append(_check("signal", 0.0, None, False, "the curves vary over layers"))
    else:
        seg = segment_shape(x, SHAPE_MODELS, min_len)
        starts = seg.starts
        # reference: piecewise-constant fits with 1..4 segments (how many steps the curves have)
        ref = segment_curves(x, n_seg, min_len)
        r2_by = [min(1.0, max(0.0, 1.0 - c / total_ss)) for c in ref.costs_by_k]
        gain4 = (ref.costs_by_k[-2] - ref.costs_by_k[-1]) / total_ss
        p = permutation_p_value(x, seg.r2, n_seg, min_len, cfg.permutations, cfg.seed, SHAPE_MODELS) \
            if cfg.permutations > 0 else None  # permutations=0 switches the test off
        evidence.update(cost=seg.cost, r2=seg.r2, r2_by_segments=r2_by, gain4=gain4, p_value=p)
        checks.append(_check("fit", seg.r2, cfg.min_r2, seg.r2 >= cfg.min_r2,
                             "share of the curves' variance the four-phase shape explains (R²)"))
        if seg.r2 < cfg.min_r2:
            problems.append(f"poor fit: the four-phase shape explains only {seg.r2:.0%} of the variation of the "
                            f"class curves (needs {cfg.min_r2:.0%}): the curves are too flat or noisy")
        checks.append(_check("permutation", p, cfg.max_p, p is None or p <= cfg.max_p,
                             "share of shuffled layer orders that fit the shape at least as well"))
        if p is not None and p > cfg.max_p:
            problems.append(f"not better than shuffled layers: permutation p = {p:.2f} > {cfg.max_p}")
    # the published shape, measured on the scaled language curve (units of its robust scale)
    ends = [s - 1 for s in starts[1:]] + [n_layers - 1]
    a = x[:, 0]
    g = x[:, 1] / cfg.general_weight if cfg.general_weight > 0 else x[:, 1]
    seg_a = [a[s:e + 1] for s, e in zip(starts, ends)]
    seg_g = [g[s:e + 1] for s, e in zip(starts, ends)]
    m1, m2, m4 = float(seg_a[0].mean()), float(seg_a[1].mean()), float(seg_a[3].mean())
    start3, end3 = _line_ends(seg_a[2])
    low_middle = m1 - m2
    rise = end3 - m2
    fall = end3 - m4
    gen_rise = float(seg_g[3].mean() - seg_g[2].mean()) if general_available else None
    final = max(fall, gen_rise) if gen_rise is not None else fall
    evidence["levels"] = {"phase1_language": m1, "phase2_language": m2, "phase3_language_start": start3,
                          "phase3_language_end": end3, "phase4_language": m4,
                          "phase3_general": float(seg_g[2].mean()) if general_available else None,
                          "phase4_general": float(seg_g[3].mean()) if general_available else None}
    step = cfg.min_step
    shape_checks = [
        ("low_middle", low_middle, "phase 2 has fewer language neurons than phase 1 (mean 1 − mean 2)",
         f"no low middle: phase 2 does not have clearly fewer language neurons than phase 1 "
         f"(difference {low_middle:.2f} of the language curve's scale, needs {step:g})"),
        ("rise", rise, "language neurons rise over phase 3 above phase 2 (end of phase 3's line − mean 2)",
         f"no rise: language neurons do not rise in phase 3 above phase 2 "
         f"(difference {rise:.2f} of the language curve's scale, needs {step:g})"),
        ("final_change", final, "phase 4 falls from phase 3's peak or has more general neurons "
                                "(max of: end of phase 3 − mean 4; general mean 4 − mean 3)",
         f"no final change: in phase 4 language neurons do not fall from phase 3's peak ({fall:.2f}) "
         + (f"and general neurons do not rise ({gen_rise:.2f})" if gen_rise is not None
            else "(general neurons not available)") + f"; needs {step:g} of the curve's scale"),
    ]
    for name, value, what, why in shape_checks:
        ok = degenerate is None and value >= step
        checks.append(_check(name, float(value), step, ok, what))
        if degenerate is None and not ok:
            problems.append(why)
    evidence["checks"] = checks
    evidence["missing"] = [c["name"] for c in checks if not c["passed"]]
    evidence["language_dip_in_phase_2"] = bool(degenerate is None and low_middle >= step and rise >= step)
    phases = []
    for name, s0, s1 in zip(PHASE_NAMES, starts, ends):
        phases.append(Phase(name, int(s0), int(s1), {c: float(v[s0:s1 + 1].mean()) for c, v in shares.items()}))
    reliable = not problems
    return phases, reliable, "; ".join(problems), evidence


def evidence_lines(an: "Anatomy") -> list[str]:
    """The phase evidence as plain-text lines (one per check), for the CLI and the report."""
    ev = an.phase_evidence
    out = []
    for c in ev.get("checks", []):
        v, th = c.get("value"), c.get("threshold")
        vt = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        cmp = {"fit": ">=", "permutation": "<=", "layers": ">"}.get(c["name"], ">=")
        tt = "" if th is None else f" (needs {cmp} {th:g})"
        out.append(f"{'ok  ' if c['passed'] else 'FAIL'} {c['name']}: {vt}{tt} - {c['what']}")
    return out


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
    # a map imported without statistics cannot know which unselected neurons are general
    general_available = nmap.meta.get("general_available", True) is not False
    phases, reliable, note, evidence = find_phases(per_layer, nmap.num_neurons, config, general_available)
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


def load_or_analyze(run_dir: str | Path, pivot: str | None = None, save: bool = True, *,
                    accept_edited: bool = False) -> Anatomy:
    """RUN_DIR/anatomy.json when the anatomy stage is current for this neuron map (and pivot),
    else recompute (and save + record the stage when ``save``). ``pivot`` None keeps the pivot
    of the last anatomy (else "en")."""
    from .stages import AnatomyStage

    run = RunDir(run_dir)
    if not run.neurons_path.is_file():
        raise NeuronMapError(f"{run.neurons_path} does not exist; run `langneurons identify {run_dir}` first")
    if pivot is None:
        pivot = str(run.stage_result("anatomy").get("pivot") or "en")
    stage = AnatomyStage(run, pivot, by="report", accept_edited=accept_edited)
    if save:
        return stage.run_stage()
    return stage.load() if stage.fresh() else stage.compute()
