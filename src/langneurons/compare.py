"""Base vs aligned: how multilingual alignment (or further training) changes the neurons.

`compare_runs` reads two or more run directories that analysed different models (a base
model and its aligned version, or a series of checkpoints) with the SAME corpus, languages,
token scope and identification thresholds, and tabulates what changed:

* ``layer_counts``   per layer and class, the count in every run and ``delta`` = last − first;
* ``appear``         appear[N] (selected neurons active in exactly N languages) per run, + delta;
* ``transition``     how every one of the L·N neurons moved between the classes
                     specific / related / general / other (other = none + unassigned),
                     from the first run to each later run;
* ``overlap``        per language and class, |A∩B| / |A| and Jaccard |A∩B| / |A∪B| of the
                     language's neuron sets (NaN where the denominator set is empty);
* ``language_counts``per run, language and class the neuron count and its change;
* ``alignment`` / ``alignment_summary``  spontaneous multilingual alignment: per-language
                     changes for the languages in the alignment data vs all others;
* ``metrics`` / ``metrics_summary``      the same for the un-ablated metrics (``base``
                     column) found in both runs' ablation.parquet;
* ``pivot``          the pivot language (English by default) vs the other languages, per run;
* ``trajectory``     per run, layer and class: count and change relative to the first run.

Runs that cannot be compared are refused with one line that says why (see
`check_comparable`). Identification with an automatic λ may legitimately end with different
λ in each run; then the caller must choose a policy: ``own`` keeps each run's λ, ``shared``
re-identifies the later runs with the first run's λ (from their stats).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import torch

from .errors import LangNeuronsError, StatsError
from .io import atomic_write, atomic_write_json
from .neurons import COUNTED_CLASSES, GENERAL, RELATED, SPECIFIC, NeuronMap
from .runs import RunDir

LambdaPolicy = Literal["strict", "shared", "own"]
LAMBDA_POLICIES = ("strict", "shared", "own")

#: classes counted per layer (`NeuronMap.counts_per_layer` order)
COUNT_CLASSES = COUNTED_CLASSES
#: classes of the transition matrix; "other" = none + unassigned (neither is a language neuron)
TRANSITION_CLASSES = ("specific", "related", "general", "other")
#: per-language neuron sets whose overlap is measured ("specific,related" = the usual ablation set)
OVERLAP_CLASSES = ("specific", "related", "general", "specific,related")
#: per-language classes of the alignment and pivot tables
LANGUAGE_CLASSES = ("specific", "related", "specific,related")

#: numbers closer than this are "the same" parameter (they come from JSON round trips)
_TOL = 1e-9


class CompareError(LangNeuronsError, ValueError):
    """Runs that cannot be compared, or a comparison asked for inconsistently."""


# -- inputs -------------------------------------------------------------------------------
@dataclass
class RunInput:
    """One run as the comparison sees it (a run directory, or a bare NeuronMap in tests)."""

    label: str
    nmap: NeuronMap
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    ablation: pd.DataFrame | None = None
    phases: list[dict[str, Any]] | None = None
    reidentified: bool = False

    @property
    def scope(self) -> Any:
        return self.record_info.get("scope", self.nmap.meta.get("scope"))

    @property
    def include_special(self) -> Any:
        return self.record_info.get("include_special")

    @property
    def record_info(self) -> dict[str, Any]:
        """The run's ``record`` stage section (scope, include_special, tokens ...)."""
        stages = self.manifest.get("stages") if isinstance(self.manifest.get("stages"), dict) else {}
        rec = stages.get("record") if isinstance(stages.get("record"), dict) else {}
        return rec.get("result") if isinstance(rec.get("result"), dict) else {}

    @property
    def model_info(self) -> dict[str, Any]:
        m = self.manifest.get("model")
        return m if isinstance(m, dict) else {}

    @property
    def params(self) -> dict[str, Any]:
        p = self.nmap.meta.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def method(self) -> str | None:
        return self.nmap.meta.get("method")

    @property
    def lam(self) -> float | None:
        lam = self.nmap.meta.get("lambda")
        return None if lam is None else float(lam)

    @property
    def lam_auto(self) -> bool:
        if "lam" in self.params:
            return self.params["lam"] == "auto"
        # no params recorded: a search leaves more than one step (a fixed λ leaves one "fixed" entry)
        trace = self.nmap.meta.get("lambda_trace") or []
        return any(isinstance(t, dict) and t.get("step", "search") != "fixed" for t in trace)


def load_run(path: str | Path, label: str | None = None) -> RunInput:
    """Read what the comparison needs from a run directory (neuron map required)."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise CompareError(f"run directory {run.path} does not exist; give run directories written by "
                           "`langneurons record` + `identify`")
    nmap = NeuronMap.load(run.neurons_path)
    ablation = None
    if run.ablation_path.is_file():
        try:
            ablation = pd.read_parquet(run.ablation_path)
        except (OSError, ValueError) as exc:
            warnings.warn(f"{run.ablation_path} is unreadable ({exc}); its metrics are left out", stacklevel=2)
    return RunInput(label or run.path.name, nmap, run.read_manifest(), run.path, ablation, read_phases(run.path))


def read_phases(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The phases of RUN_DIR/anatomy.json ([{"name", "start", "end"}], 0-based inclusive), if any.

    Read as plain JSON (anatomy.py is not imported): a missing or malformed file just means
    no phase shading.
    """
    path = RunDir(run_dir).anatomy_path
    if not path.is_file():
        return None
    try:
        phases = json.loads(path.read_text(encoding="utf-8")).get("phases")
        out = [{"name": str(p["name"]), "start": int(p["start"]), "end": int(p["end"])} for p in phases]
    except (ValueError, TypeError, KeyError, AttributeError):
        warnings.warn(f"{path} has no readable 'phases'; figures are drawn without phase shading", stacklevel=2)
        return None
    return out or None


def _unique_labels(labels: Sequence[str]) -> list[str]:
    reserved = {"layer", "class", "delta", "N", "language", "run", "run_index"}
    out: list[str] = []
    for i, label in enumerate(labels):
        label = label or f"run{i}"
        while label in out or label in reserved:
            label = f"{label}#{i}"
        out.append(label)
    return out


def reorder_languages(nmap: NeuronMap, order: Sequence[str]) -> NeuronMap:
    """The same map with its language axis in ``order`` (same set of languages)."""
    if list(nmap.languages) == list(order):
        return nmap
    idx = torch.tensor([nmap.languages.index(lang) for lang in order])
    return replace(nmap, languages=list(order), active=nmap.active[idx])


# -- comparability --------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=_TOL, abs_tol=_TOL)
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_comparable(runs: Sequence[RunInput], lambda_policy: LambdaPolicy = "strict") -> list[str]:
    """Raise `CompareError` (saying why and what to do) unless every run can be compared with
    the first one; return warnings about differences that are allowed but worth saying
    (dtype, corpus, values that could not be verified)."""
    if lambda_policy not in LAMBDA_POLICIES:
        raise CompareError(f"unknown λ policy {lambda_policy!r}; use --lambda shared or --lambda own")
    if len(runs) < 2:
        raise CompareError("compare needs at least two runs (e.g. a base model's run and its aligned model's run)")
    base = runs[0]
    notes: list[str] = []
    for run in runs[1:]:
        pair = f"cannot compare {base.label} and {run.label}"
        a_langs, b_langs = set(base.nmap.languages), set(run.nmap.languages)
        if a_langs != b_langs:
            only_a = ",".join(sorted(a_langs - b_langs)) or "-"
            only_b = ",".join(sorted(b_langs - a_langs)) or "-"
            raise CompareError(f"{pair}: their languages differ (only in {base.label}: {only_a}; only in "
                               f"{run.label}: {only_b}); record and identify both with the same --langs")
        a_shape = (base.nmap.num_layers, base.nmap.num_neurons)
        b_shape = (run.nmap.num_layers, run.nmap.num_neurons)
        if a_shape != b_shape:
            raise CompareError(f"{pair}: neuron shapes differ ({a_shape[0]}x{a_shape[1]} vs {b_shape[0]}x{b_shape[1]} "
                               "layers x neurons); only checkpoints of the same architecture can be compared")
        checks = [
            ("token scope", base.scope, run.scope, "record both with the same --scope"),
            ("include_special", base.include_special, run.include_special,
             "record both with the same --include-special setting"),
            ("hook point", base.model_info.get("hook_point"), run.model_info.get("hook_point"),
             "record both at the same activation (--mlp-act-path)"),
            ("identification method", base.method, run.method, "identify both with the same --method"),
            ("top_rate", base.params.get("top_rate"), run.params.get("top_rate"),
             "identify both with the same --top-rate"),
            ("bar", base.params.get("bar"), run.params.get("bar"), "identify both with the same --bar"),
        ]
        for what, a, b, todo in checks:
            if a is None and b is None:
                continue
            if a is None or b is None:
                notes.append(f"{what} of {base.label if a is None else run.label} is unknown; "
                             "could not check that it matches")
                continue
            if not _same(a, b):
                raise CompareError(f"{pair}: {what} differs ({a} vs {b}); {todo}")
        lam_a, lam_b = base.lam, run.lam
        if lam_a is not None and lam_b is not None and not _same(lam_a, lam_b) and lambda_policy == "strict":
            if base.lam_auto and run.lam_auto:
                raise CompareError(
                    f"{pair} as they are: both chose λ automatically and ended with different values "
                    f"({lam_a:.6g} vs {lam_b:.6g}); pass --lambda own to compare each as identified, or "
                    f"--lambda shared to re-identify every run with the first run's λ")
            raise CompareError(f"{pair} as they are: they were identified with different λ ({lam_a:.6g} vs "
                               f"{lam_b:.6g}); identify both with the same --lam, or pass --lambda own|shared")
        if (lam_a is None) != (lam_b is None) and base.method == run.method == "entropy-lambda":
            notes.append(f"λ of {base.label if lam_a is None else run.label} is unknown; could not check it")
        a_dtype, b_dtype = base.model_info.get("dtype"), run.model_info.get("dtype")
        if a_dtype and b_dtype and a_dtype != b_dtype:
            notes.append(f"{base.label} was recorded in {a_dtype} and {run.label} in {b_dtype}: low precision can flip "
                         "the sign of activations near 0, so part of the difference may come from the dtype")
        diff = _corpus_differences(base, run)
        if diff:
            notes.append(f"the corpus differs between {base.label} and {run.label} for {','.join(diff)} "
                         "(corpus fingerprints differ): differences may come from the texts, not the models")
    return notes


def _corpus_fingerprints(run: RunInput) -> dict[str, str]:
    """Per-language corpus fingerprints from the stats files' metadata (no tensors are read)."""
    if run.path is None:
        return {}
    from safetensors import safe_open

    out = {}
    for lang in run.nmap.languages:
        path = RunDir(run.path).stats_path(lang)
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("langneurons", "{}"))
        except Exception:  # unreadable stats are the stats loader's business, not ours
            continue
        if meta.get("corpus_fingerprint"):
            out[lang] = meta["corpus_fingerprint"]
    return out


def _corpus_differences(a: RunInput, b: RunInput) -> list[str]:
    fa, fb = _corpus_fingerprints(a), _corpus_fingerprints(b)
    return sorted(lang for lang in set(fa) & set(fb) if fa[lang] != fb[lang])


def _apply_lambda_policy(runs: list[RunInput], policy: LambdaPolicy) -> list[str]:
    """Re-identify (``shared``) runs whose λ differs from the first run's; return notes."""
    base = runs[0]
    lams = [r.lam for r in runs]
    differ_idx = [i for i, r in enumerate(runs) if i > 0 and r.lam is not None and base.lam is not None
                  and not _same(r.lam, base.lam)]
    differs = [runs[i] for i in differ_idx]
    if policy == "strict" or not differs:
        if policy != "strict" and base.lam is not None:
            return [f"--lambda {policy}: every run already has λ = {base.lam:.6g}; nothing to reconcile"]
        if policy != "strict":
            return [f"--lambda {policy}: the runs carry no λ (method {base.method}); the policy has no effect"]
        return []
    if policy == "own":
        return ["--lambda own: each run keeps the λ it was identified with ("
                + ", ".join(f"{r.label}: {lam:.6g}" if lam is not None else f"{r.label}: ?"
                            for r, lam in zip(runs, lams)) + "); class changes partly reflect the λ change"]
    try:
        from .identify import identify
    except ImportError as exc:  # identify.py is a sibling stage; say so instead of a traceback
        raise CompareError(f"--lambda shared needs langneurons.identify ({exc}); use --lambda own") from None
    from .stats import ActivationStats

    for i in differ_idx:
        run = runs[i]
        if run.path is None:
            raise CompareError(f"--lambda shared re-identifies {run.label} from its stats, but it is not a run "
                               "directory; use --lambda own")
        try:
            stats = ActivationStats.load(run.path).subset(base.nmap.languages)
        except StatsError as exc:
            raise CompareError(f"--lambda shared re-identifies {run.label} from its stats, but: {exc}; "
                               "or use --lambda own") from None
        if run.nmap.meta.get("stats_fingerprint") and run.nmap.meta["stats_fingerprint"] != stats.fingerprint():
            warnings.warn(f"{run.label}: its stats changed since identification; the re-identified map "
                          "reflects the current stats", stacklevel=2)
        params = {k: run.params[k] for k in ("top_rate", "bar") if run.params.get(k) is not None}
        new = identify(stats, run.method or "entropy-lambda", **params, lam=float(base.lam))  # type: ignore[arg-type]
        runs[i] = replace(run, nmap=new, reidentified=True)
    notes = ["--lambda shared: re-identified " + ", ".join(r.label for r in differs)
             + f" with the first run's λ = {base.lam:.6g} (own λ: "
             + ", ".join(f"{r.label}: {r.lam:.6g}" for r in differs) + ")"]
    for i in differ_idx:
        all_k = runs[i].nmap.appear()[-1]
        if all_k:
            notes.append(f"with the shared λ, {all_k} selected neuron(s) of {runs[i].label} are active in all "
                         f"{runs[i].nmap.K} languages (its own automatic λ avoided that)")
    return notes


# -- tables (pure functions of neuron maps; each is tested against a naive computation) -----
def transition_codes(nmap: NeuronMap) -> torch.Tensor:
    """int64 [L, N]: index into TRANSITION_CLASSES (none and unassigned fold into "other")."""
    out = torch.full(nmap.classes.shape, TRANSITION_CLASSES.index("other"), dtype=torch.int64)
    out[nmap.classes == SPECIFIC] = 0
    out[nmap.classes == RELATED] = 1
    out[nmap.classes == GENERAL] = 2
    return out


def transition_matrix(a: NeuronMap, b: NeuronMap) -> pd.DataFrame:
    """4x4 counts over all L·N neurons: row = class in ``a``, column = class in ``b``."""
    n = len(TRANSITION_CLASSES)
    flat = transition_codes(a).flatten() * n + transition_codes(b).flatten()
    counts = torch.bincount(flat, minlength=n * n).view(n, n)
    return pd.DataFrame(counts.numpy(), index=pd.Index(TRANSITION_CLASSES, name="from"),
                        columns=pd.Index(TRANSITION_CLASSES, name="to"))


def language_sets(nmap: NeuronMap, classes: Sequence[str]) -> torch.Tensor:
    """bool [K, L·N]: language k's neurons of the given classes (flattened, for fast counting)."""
    return nmap.class_mask(classes).flatten().unsqueeze(0) & nmap.active.bool().flatten(1)


def _count(mask: torch.Tensor) -> list[int]:
    # count_nonzero is several times faster than bool .sum() at 7B scale (K·L·N ~ 5M)
    return torch.count_nonzero(mask, dim=1).tolist()


def overlap_table(a: NeuronMap, b: NeuronMap) -> pd.DataFrame:
    """Per language and class: sizes, |A∩B|, |A∪B|, overlap_a = |A∩B|/|A| and jaccard.

    overlap_a is NaN when A is empty (nothing to keep); jaccard is NaN when A and B are both
    empty (0 when only A or only B is empty)."""
    b = reorder_languages(b, a.languages)
    rows = []
    for cls in OVERLAP_CLASSES:
        classes = cls.split(",")
        sa, sb = language_sets(a, classes), language_sets(b, classes)
        counts = zip(_count(sa), _count(sb), _count(sa & sb), _count(sa | sb))
        for lang, (na, nb, ni, nu) in zip(a.languages, counts):
            rows.append({"language": lang, "class": cls, "size_a": na, "size_b": nb, "intersection": ni,
                         "union": nu, "overlap_a": ni / na if na else math.nan,
                         "jaccard": ni / nu if nu else math.nan})
    return pd.DataFrame(rows)


def language_counts(nmap: NeuronMap) -> dict[str, dict[str, int]]:
    """{lang: {class: count}} for specific, related, general and specific,related."""
    per_class = {cls: _count(language_sets(nmap, cls.split(",")))
                 for cls in ("specific", "related", "general", "specific,related")}
    return {lang: {cls: per_class[cls][k] for cls in per_class} for k, lang in enumerate(nmap.languages)}


def concentration(deltas: Sequence[float], share: float = 0.5) -> dict[str, Any] | None:
    """Where a net change lives: the shortest contiguous layer range holding at least ``share``
    of the change in the net direction (ties: the larger part, then the earlier range).

    Returns {"start", "end", "share", "direction"} (0-based inclusive) or None when the net
    change is zero."""
    total = float(sum(deltas))
    if total == 0:
        return None
    sign = 1.0 if total > 0 else -1.0
    part = [max(sign * float(d), 0.0) for d in deltas]
    whole = sum(part)
    best: tuple[int, float, int, int] | None = None
    for i in range(len(part)):
        acc = 0.0
        for j in range(i, len(part)):
            acc += part[j]
            if acc >= share * whole - 1e-12:
                key = (j - i, -acc, i, j)
                if best is None or key < best:
                    best = key
                break
    assert best is not None
    _, neg, i, j = best
    return {"start": i, "end": j, "share": -neg / whole, "direction": "gain" if sign > 0 else "loss"}


# -- the comparison --------------------------------------------------------------------------
@dataclass
class Comparison:
    """Every table of a comparison (pandas DataFrames) plus a JSON-able summary.

    The first run is the reference ("base"); every ``delta`` is later − first.
    """

    runs: pd.DataFrame
    layer_counts: pd.DataFrame
    appear: pd.DataFrame
    transition: pd.DataFrame
    overlap: pd.DataFrame
    language_counts: pd.DataFrame
    alignment: pd.DataFrame
    alignment_summary: pd.DataFrame
    metrics: pd.DataFrame
    metrics_summary: pd.DataFrame
    pivot: pd.DataFrame
    trajectory: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] | None = None  # the first run's, for shading figures

    TABLES = ("runs", "layer_counts", "appear", "transition", "overlap", "language_counts", "alignment",
              "alignment_summary", "metrics", "metrics_summary", "pivot", "trajectory")

    @property
    def labels(self) -> list[str]:
        return list(self.summary["runs"])

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        return {name: getattr(self, name) for name in self.TABLES}

    def transition_matrix(self, run_b: str | None = None) -> pd.DataFrame:
        """The 4x4 matrix from the first run to ``run_b`` (default: the last run)."""
        run_b = run_b or self.labels[-1]
        t = self.transition[self.transition["run_b"] == run_b]
        m = t.pivot(index="from_class", columns="to_class", values="count")
        return m.reindex(index=list(TRANSITION_CLASSES), columns=list(TRANSITION_CLASSES)).fillna(0).astype(int)

    def save(self, out_dir: str | Path) -> Path:
        """Write OUT/tables/<name>.parquet and .csv for every table, and OUT/summary.json."""
        out = Path(out_dir)
        for name, df in self.tables.items():
            atomic_write(out / "tables" / f"{name}.parquet", lambda p, df=df: df.to_parquet(p, index=False))
            atomic_write(out / "tables" / f"{name}.csv", lambda p, df=df: df.to_csv(p, index=False))
        atomic_write_json(out / "summary.json", _jsonable(self.summary))
        return out


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _parse_langs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return [str(x) for x in value]


def compare_runs(run_dirs: Sequence[str | Path], *, trained_langs: Sequence[str] | None = None,
                 lambda_policy: LambdaPolicy = "strict", pivot: str = "en") -> Comparison:
    """Compare the neuron maps of two or more run directories (the first is the reference).

    ``trained_langs``: languages of the alignment data (default: the union of the runs'
    manifest key ``align.trained_langs``). ``lambda_policy``: what to do when the runs were
    identified with different λ (``strict`` refuses; ``own`` keeps each; ``shared``
    re-identifies with the first run's λ). ``pivot``: the pivot language of the pivot table.
    """
    paths = [Path(p) for p in run_dirs]
    if len({p.resolve() for p in paths}) != len(paths):
        warnings.warn("the same run directory is given more than once", stacklevel=2)
    labels = _unique_labels([p.name for p in paths])
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    return compare_inputs(runs, trained_langs=trained_langs, lambda_policy=lambda_policy, pivot=pivot)


def compare_maps(maps: Sequence[NeuronMap], labels: Sequence[str] | None = None, *,
                 trained_langs: Sequence[str] | None = None, lambda_policy: LambdaPolicy = "strict",
                 pivot: str = "en", ablations: Sequence[pd.DataFrame | None] | None = None,
                 phases: list[dict[str, Any]] | None = None) -> Comparison:
    """`compare_runs` for neuron maps in memory (no run directories; ``shared`` λ unavailable)."""
    labels = _unique_labels(list(labels) if labels else [f"run{i}" for i in range(len(maps))])
    ablations = list(ablations) if ablations is not None else [None] * len(maps)
    runs = [RunInput(label, m, {}, None, abl, phases if i == 0 else None)
            for i, (label, m, abl) in enumerate(zip(labels, maps, ablations))]
    return compare_inputs(runs, trained_langs=trained_langs, lambda_policy=lambda_policy, pivot=pivot)


def compare_inputs(runs: Sequence[RunInput], *, trained_langs: Sequence[str] | None = None,
                   lambda_policy: LambdaPolicy = "strict", pivot: str = "en") -> Comparison:
    runs = list(runs)
    warns = check_comparable(runs, lambda_policy)
    base_langs = list(runs[0].nmap.languages)
    runs = [replace(r, nmap=reorder_languages(r.nmap, base_langs)) for r in runs]
    notes = _apply_lambda_policy(runs, lambda_policy)
    runs = [replace(r, nmap=reorder_languages(r.nmap, base_langs)) for r in runs]  # re-identified maps too
    for w in warns:
        warnings.warn(w, stacklevel=2)

    if trained_langs is None:
        from_manifest: list[str] = []
        for r in runs:
            align = r.manifest.get("align") if isinstance(r.manifest.get("align"), dict) else {}
            from_manifest += [x for x in _parse_langs(align.get("trained_langs")) if x not in from_manifest]
        trained = from_manifest
        trained_source = "manifest" if trained else None
    else:
        trained = _parse_langs(list(trained_langs))
        trained_source = "given"
    missing_trained = [x for x in trained if x not in base_langs]
    if missing_trained:
        notes.append(f"trained languages {','.join(missing_trained)} are not among the compared languages; "
                     "they are left out of the alignment tables")
    if pivot not in base_langs:
        notes.append(f"pivot language {pivot!r} is not among the compared languages; the pivot table is empty")

    labels = [r.label for r in runs]
    maps = [r.nmap for r in runs]
    first = maps[0]
    K, L = first.K, first.num_layers

    runs_df = pd.DataFrame([{
        "run_index": i, "run": r.label, "path": str(r.path) if r.path else "",
        "model": r.model_info.get("model", r.nmap.meta.get("model")),
        "model_fingerprint": r.model_info.get("model_fingerprint", r.nmap.meta.get("model_fingerprint")),
        "dtype": r.model_info.get("dtype"), "scope": r.scope, "method": r.method,
        "top_rate": r.params.get("top_rate"), "bar": r.params.get("bar"),
        "lam_param": None if r.params.get("lam") is None else str(r.params.get("lam")),
        "lambda": r.lam, "lambda_saturated": r.nmap.meta.get("lambda_saturated"),
        "reidentified": r.reidentified, "selected": int(r.nmap.selected.sum()),
        "num_layers": r.nmap.num_layers, "num_neurons": r.nmap.num_neurons,
    } for i, r in enumerate(runs)])

    # per layer and class ------------------------------------------------------------------
    per_layer = [m.counts_per_layer() for m in maps]
    layer_rows = []
    traj_rows = []
    for cls in COUNT_CLASSES:
        for layer in range(L):
            row: dict[str, Any] = {"layer": layer, "class": cls}
            for label, counts in zip(labels, per_layer):
                row[label] = int(counts[cls][layer])
            row["delta"] = row[labels[-1]] - row[labels[0]]
            layer_rows.append(row)
            for i, (label, counts) in enumerate(zip(labels, per_layer)):
                traj_rows.append({"run_index": i, "run": label, "layer": layer, "class": cls,
                                  "count": int(counts[cls][layer]),
                                  "delta": int(counts[cls][layer]) - int(per_layer[0][cls][layer])})
    layer_df = pd.DataFrame(layer_rows)
    traj_df = pd.DataFrame(traj_rows)

    appears = [m.appear() for m in maps]
    appear_rows = []
    for n in range(K + 1):
        row = {"N": n}
        for label, app in zip(labels, appears):
            row[label] = int(app[n])
        row["delta"] = row[labels[-1]] - row[labels[0]]
        appear_rows.append(row)
    appear_df = pd.DataFrame(appear_rows)

    # first run -> each later run --------------------------------------------------------------
    trans_rows, overlap_parts = [], []
    for label, m in zip(labels[1:], maps[1:]):
        mat = transition_matrix(first, m)
        for a_cls in TRANSITION_CLASSES:
            for b_cls in TRANSITION_CLASSES:
                trans_rows.append({"run_a": labels[0], "run_b": label, "from_class": a_cls, "to_class": b_cls,
                                   "count": int(mat.loc[a_cls, b_cls])})
        ov = overlap_table(first, m)
        ov.insert(0, "run_b", label)
        ov.insert(0, "run_a", labels[0])
        overlap_parts.append(ov)
    trans_df = pd.DataFrame(trans_rows)
    overlap_df = pd.concat(overlap_parts, ignore_index=True)

    # per language ------------------------------------------------------------------------------
    lang_counts = [language_counts(m) for m in maps]
    lc_rows = []
    for i, (label, counts) in enumerate(zip(labels, lang_counts)):
        for lang in base_langs:
            for cls in ("specific", "related", "general", "specific,related"):
                lc_rows.append({"run_index": i, "run": label, "language": lang, "class": cls,
                                "count": counts[lang][cls], "delta": counts[lang][cls] - lang_counts[0][lang][cls],
                                "trained": lang in trained, "pivot": lang == pivot})
    lc_df = pd.DataFrame(lc_rows)

    align_rows, align_sum_rows = [], []
    for label, counts in zip(labels[1:], lang_counts[1:]):
        for cls in LANGUAGE_CLASSES:
            for lang in base_langs:
                a, b = lang_counts[0][lang][cls], counts[lang][cls]
                align_rows.append({"run_a": labels[0], "run_b": label, "language": lang, "trained": lang in trained,
                                   "pivot": lang == pivot, "class": cls, "count_a": a, "count_b": b, "delta": b - a})
            align_sum_rows += _group_means(
                [r for r in align_rows if r["run_b"] == label and r["class"] == cls],
                {"run_b": label, "class": cls}, value="delta", trained_known=bool(trained))
    align_df = pd.DataFrame(align_rows)
    align_sum_df = pd.DataFrame(align_sum_rows, columns=["run_b", "class", "group", "n_languages", "languages",
                                                         "mean_delta"])

    metric_rows, metric_sum_rows = _metric_tables(runs, trained, pivot)
    metrics_df = pd.DataFrame(metric_rows, columns=["run_a", "run_b", "eval_lang", "metric", "trained", "pivot",
                                                    "value_a", "value_b", "delta"])
    metrics_sum_df = pd.DataFrame(metric_sum_rows, columns=["run_b", "metric", "group", "n_languages", "languages",
                                                            "mean_delta"])

    pivot_rows = []
    if pivot in base_langs:
        others = [x for x in base_langs if x != pivot]
        for i, (label, counts) in enumerate(zip(labels, lang_counts)):
            for cls in LANGUAGE_CLASSES:
                vals = [counts[x][cls] for x in others]
                mean = sum(vals) / len(vals) if vals else math.nan
                pivot_rows.append({"run_index": i, "run": label, "class": cls, "pivot": pivot,
                                   "pivot_count": counts[pivot][cls], "nonpivot_mean": mean,
                                   "nonpivot_min": min(vals) if vals else None,
                                   "nonpivot_max": max(vals) if vals else None,
                                   "ratio": counts[pivot][cls] / mean if vals and mean else math.nan})
    pivot_df = pd.DataFrame(pivot_rows, columns=["run_index", "run", "class", "pivot", "pivot_count", "nonpivot_mean",
                                                 "nonpivot_min", "nonpivot_max", "ratio"])

    comp = Comparison(runs_df, layer_df, appear_df, trans_df, overlap_df, lc_df, align_df, align_sum_df,
                      metrics_df, metrics_sum_df, pivot_df, traj_df, phases=runs[0].phases)
    comp.summary = _summary(comp, runs, trained, trained_source, pivot, lambda_policy, warns, notes)
    return comp


def _group_means(rows: list[dict], key: dict[str, Any], *, value: str, trained_known: bool) -> list[dict]:
    """Mean of ``value`` per group (trained / untrained); groups with no language are left out."""
    out = []
    groups = (("trained", True), ("untrained", False)) if trained_known else (("all", None),)
    for group, flag in groups:
        sel = [r for r in rows if flag is None or r["trained"] == flag]
        vals = [float(r[value]) for r in sel if r[value] is not None and not _isnan(r[value])]
        if not sel:
            continue
        langs = [r.get("language", r.get("eval_lang")) for r in sel]
        out.append({**key, "group": group, "n_languages": len(vals), "languages": ",".join(langs),
                    "mean_delta": sum(vals) / len(vals) if vals else math.nan})
    return out


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _metric_means(df: pd.DataFrame | None) -> dict[tuple[str, str], float]:
    """Mean ``base`` (the un-ablated model's value) per (eval_lang, metric)."""
    if df is None or not {"eval_lang", "metric", "base"} <= set(df.columns):
        return {}
    g = df.groupby(["eval_lang", "metric"])["base"].mean()
    return {(str(lang), str(metric)): float(v) for (lang, metric), v in g.items()}


def _metric_tables(runs: Sequence[RunInput], trained: Sequence[str], pivot: str) -> tuple[list[dict], list[dict]]:
    rows, summary = [], []
    means_a = _metric_means(runs[0].ablation)
    for run in runs[1:]:
        means_b = _metric_means(run.ablation)
        these = []
        for key in sorted(set(means_a) & set(means_b)):
            lang, metric = key
            these.append({"run_a": runs[0].label, "run_b": run.label, "eval_lang": lang, "metric": metric,
                          "trained": lang in trained, "pivot": lang == pivot, "value_a": means_a[key],
                          "value_b": means_b[key], "delta": means_b[key] - means_a[key]})
        rows += these
        for metric in sorted({r["metric"] for r in these}):
            summary += _group_means([r for r in these if r["metric"] == metric], {"run_b": run.label, "metric": metric},
                                    value="delta", trained_known=bool(trained))
    return rows, summary


# -- summary -----------------------------------------------------------------------------------
_CLASS_WORDS = {"specific": "language-specific", "related": "language-related", "general": "general",
                "unassigned": "unassigned", "specific,related": "specific+related"}
_LOWER_IS_BETTER = {"nll", "ppl", "bpb"}


def _signed(x: float, digits: int = 0) -> str:
    if _isnan(x):
        return "n/a"
    return f"{x:+,.{digits}f}"


def _summary(comp: Comparison, runs: Sequence[RunInput], trained: list[str], trained_source: str | None,
             pivot: str, policy: str, warns: list[str], notes: list[str]) -> dict[str, Any]:
    labels = [r.label for r in runs]
    a, b = labels[0], labels[-1]
    ld = comp.layer_counts
    totals = {label: {cls: int(ld.loc[ld["class"] == cls, label].sum()) for cls in COUNT_CLASSES} for label in labels}
    delta_totals = {cls: totals[b][cls] - totals[a][cls] for cls in COUNT_CLASSES}
    where = {cls: concentration(ld.loc[ld["class"] == cls, "delta"].tolist()) for cls in COUNT_CLASSES}

    text = []
    name_b = "The later run" if len(labels) > 2 else "The aligned run"
    for cls in ("specific", "related", "general"):
        d = delta_totals[cls]
        s = (f"{name_b} ({b}) has {_signed(d)} {_CLASS_WORDS[cls]} neurons vs {a} "
             f"({totals[a][cls]:,} → {totals[b][cls]:,})")
        if where[cls] is not None:
            w = where[cls]
            span = f"layer {w['start']}" if w["start"] == w["end"] else f"layers {w['start']}-{w['end']}"
            moves = "gains" if w["direction"] == "gain" else "losses"
            s += f"; {w['share']:.0%} of the per-layer {moves} are in {span}"
        text.append(s + ".")
    mat = comp.transition_matrix(b)
    for cls in ("specific", "related"):
        n = int(mat.loc[cls].sum())
        if n:
            text.append(f"Of {a}'s {n:,} {_CLASS_WORDS[cls]} neurons, {mat.loc[cls, cls] / n:.0%} keep their class in "
                        f"{b}; {mat.loc[cls, 'other'] / n:.0%} become non-language neurons.")
    ov = comp.overlap[(comp.overlap["run_b"] == b) & (comp.overlap["class"] == "specific,related")]
    if ov["overlap_a"].notna().any():
        text.append(f"Per language, {ov['overlap_a'].mean():.0%} of {a}'s specific+related neurons are still the "
                    f"language's neurons in {b} on average (mean Jaccard {ov['jaccard'].mean():.2f}).")
    al = comp.alignment_summary
    al = al[(al["run_b"] == b) & (al["class"] == "specific,related")]
    align_summary: dict[str, Any] = {}
    if trained and not al.empty:
        means = dict(zip(al["group"], al["mean_delta"]))
        align_summary = {"class": "specific,related", **{f"mean_delta_{g}": v for g, v in means.items()}}
        text.append(f"Trained languages ({','.join(x for x in trained if x in runs[0].nmap.languages)}) changed by "
                    f"{_signed(means.get('trained', math.nan), 1)} specific+related neurons on average vs "
                    f"{_signed(means.get('untrained', math.nan), 1)} for the untrained languages.")
    elif not trained:
        text.append("No trained languages given (--trained-langs or manifest align.trained_langs): the alignment "
                    "tables are not split into trained and untrained languages.")
    ms = comp.metrics_summary
    ms = ms[ms["run_b"] == b]
    for metric in sorted(set(ms["metric"])):
        m = dict(zip(ms.loc[ms["metric"] == metric, "group"], ms.loc[ms["metric"] == metric, "mean_delta"]))
        hint = (" (lower is better)" if metric in _LOWER_IS_BETTER
                else " (higher is better)" if metric in ("accuracy", "choice_accuracy") else "")
        if "trained" in m or "untrained" in m:
            text.append(f"Mean change of {metric}{hint}: {_signed(m.get('trained', math.nan), 3)} for trained vs "
                        f"{_signed(m.get('untrained', math.nan), 3)} for untrained languages.")
        else:
            text.append(f"Mean change of {metric}{hint} over languages: {_signed(m.get('all', math.nan), 3)}.")
    pv = comp.pivot
    if not pv.empty:
        parts = []
        for label in (a, b):
            r = pv[(pv["run"] == label) & (pv["class"] == "specific")].iloc[0]
            parts.append(f"{r['pivot_count']:,} in {label} (others: {r['nonpivot_mean']:.1f} on average)")
        text.append(f"Pivot {pivot}: language-specific neurons " + " vs ".join(parts) + ".")
    return {
        "runs": labels,
        "paths": [str(r.path) if r.path else None for r in runs],
        "languages": list(runs[0].nmap.languages),
        "num_layers": runs[0].nmap.num_layers,
        "num_neurons": runs[0].nmap.num_neurons,
        "pivot": pivot,
        "trained_langs": trained,
        "trained_langs_source": trained_source,
        "lambda_policy": policy,
        "lambdas": {r.label: r.lam for r in runs},
        "reidentified": [r.label for r in runs if r.reidentified],
        "totals": totals,
        "delta_totals": delta_totals,
        "delta_concentration": where,
        "alignment": align_summary,
        "warnings": list(warns),
        "notes": list(notes),
        "overlap_nan_rule": "overlap_a = |A∩B|/|A| is NaN when A is empty; "
                            "jaccard is NaN when A and B are both empty",
        "text": text,
    }


__all__ = ["Comparison", "CompareError", "RunInput", "check_comparable", "compare_inputs", "compare_maps",
           "compare_runs", "concentration", "language_counts", "load_run", "overlap_table", "read_phases",
           "reorder_languages", "transition_matrix", "COUNT_CLASSES", "TRANSITION_CLASSES", "OVERLAP_CLASSES",
           "LAMBDA_POLICIES"]
