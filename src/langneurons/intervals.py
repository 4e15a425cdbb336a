"""Bootstrap intervals for the ablation matrix, its control and the selectivity of each set.

Input: the per-document scores that `evaluate.ablation_matrix(..., documents=[])` collects
(`ablation_docs.parquet` in a run): one row per (mask, evaluation document) with the summed NLL,
the scored tokens and bytes. ``neuron_set == "none"`` is the unpatched baseline; a real set is
named by its classes ("specific", ...), its controls ``random:<set>`` with one ``seed`` each.

Quantities (metric "nll": nats per token; "bpb": bits per byte)
    cell (set S, deactivated k, evaluated j): Δ = (Σ_d ablated_d − Σ_d base_d) / Σ_d tokens_d
    control of the cell: the mean of Δ over the control's seeds
    excess = Δ − control
    selectivity of (S, k) = Δ(k, k) − mean_{j ≠ k} Δ(k, j)   (own language minus the others)
    selectivity excess = selectivity − the control's selectivity

One resample (``resamples`` of them, numpy ``default_rng(seed)``)
    * documents: every evaluation language's documents are drawn with replacement, as many as
      it has (multinomial multiplicities), the SAME draw for the baseline, the real set and
      every control seed (paired: the document-to-document variation of difficulty cancels);
    * control seeds: the control's seeds are drawn with replacement too, so the control's own
      variance (which random neurons were drawn) enters every interval that uses it. With one
      seed this part is zero: run several (3 is the default; more tighten it).
    Every statistic above is recomputed from the resampled sums (ratios of sums, not means of
    per-document ratios) and the interval is the percentile interval (2.5 %, 97.5 % at 95 %).

Sample sizes are part of the result: every cell carries its number of documents and tokens,
the number of resamples drawn and the number of DISTINCT document resamples that exist,
C(2n − 1, n) multisets of n documents (2 documents: 3; 5: 126; 10: 92,378). Drawing more
resamples than exist only repeats them: such an interval is reported, but flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import LangNeuronsError

__all__ = ["ablation_intervals", "AblationIntervals", "distinct_resamples", "documents_frame", "DOCS_FILE",
           "DOC_COLUMNS", "FEW_DOCS"]

DOCS_FILE = "ablation_docs.parquet"
DOC_COLUMNS = ["neuron_set", "deactivated_lang", "seed", "control", "eval_lang", "doc", "nll", "tokens", "bytes"]
#: fewer evaluated documents per language than this: the report warns
FEW_DOCS = 10
_CAP = 2 ** 62  # distinct-resample counts are capped (stored as int64)


def distinct_resamples(n: int) -> int:
    """Number of distinct bootstrap resamples (multisets) of n documents: C(2n − 1, n), capped
    at 2**62 (2 documents: 3, 3: 10, 10: 92,378)."""
    if n <= 0:
        return 0
    return min(math.comb(2 * n - 1, n), _CAP)


def documents_frame(rows: Sequence[dict]) -> Any:
    """The per-document rows of `ablation_matrix(documents=...)` as a DataFrame (the schema of
    ``ablation_docs.parquet``)."""
    import pandas as pd

    df = pd.DataFrame(list(rows), columns=DOC_COLUMNS)
    df["seed"] = df["seed"].astype("Int64")
    for c in ("doc", "tokens", "bytes"):
        df[c] = df[c].astype("int64")
    df["nll"] = df["nll"].astype("float64")
    return df


@dataclass
class AblationIntervals:
    cells: Any  # DataFrame: one row per (set, deactivated, evaluated)
    selectivity: Any  # DataFrame: one row per (set, deactivated)
    resamples: int
    seed: int
    level: float
    metric: str


def _pct(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(samples, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def ablation_intervals(docs: Any, *, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                       metric: str = "nll") -> AblationIntervals:
    """Bootstrap intervals of every cell, its excess over the control, and each set's selectivity
    (see the module docstring for the definitions and the resampling scheme)."""
    if metric not in ("nll", "bpb"):
        raise LangNeuronsError(f"intervals are computed for nll or bpb, got {metric!r}")
    if resamples < 1:
        raise LangNeuronsError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise LangNeuronsError(f"level must be in (0, 1), got {level}")
    missing = [c for c in DOC_COLUMNS if c not in docs.columns]
    if missing:
        raise LangNeuronsError(f"the per-document table lacks columns {missing}; write it with "
                               "ablation_matrix(documents=...) and intervals.documents_frame")
    base = docs[docs["neuron_set"] == "none"]
    if base.empty:
        raise LangNeuronsError("the per-document table has no baseline rows (neuron_set 'none')")
    langs = list(dict.fromkeys(base["eval_lang"]))
    rng = np.random.default_rng(seed)
    R = int(resamples)

    # per evaluation language: documents in order, baseline sums, multiplicities of every resample
    order: dict[str, np.ndarray] = {}
    den: dict[str, np.ndarray] = {}
    bnll: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    n_tok: dict[str, int] = {}
    for j in langs:
        bj = base[base["eval_lang"] == j].sort_values("doc")
        order[j] = bj["doc"].to_numpy()
        if len(set(order[j].tolist())) != len(order[j]):
            raise LangNeuronsError(f"the per-document table has duplicate baseline documents for {j!r}")
        tok = bj["tokens"].to_numpy(dtype=np.float64)
        den[j] = tok if metric == "nll" else bj["bytes"].to_numpy(dtype=np.float64) * math.log(2.0)
        bnll[j] = bj["nll"].to_numpy(dtype=np.float64)
        n_tok[j] = int(tok.sum())
        n = len(order[j])
        counts[j] = rng.multinomial(n, np.full(n, 1.0 / n), size=R).astype(np.float64)  # [R, n]

    def vec(rows: Any, j: str) -> np.ndarray:
        r = rows[rows["eval_lang"] == j].set_index("doc")["nll"]
        try:
            return r.loc[order[j]].to_numpy(dtype=np.float64)
        except KeyError:
            raise LangNeuronsError(f"the per-document table lacks some of {j!r}'s documents for a mask") from None

    def delta(rows: Any, j: str) -> tuple[float, np.ndarray]:
        a = vec(rows, j)
        point = float((a.sum() - bnll[j].sum()) / den[j].sum())
        res = (counts[j] @ (a - bnll[j])) / (counts[j] @ den[j])
        return point, res

    other = docs[docs["neuron_set"] != "none"]
    real = other[~other["neuron_set"].str.startswith("random:")]
    ctrl = other[other["neuron_set"].str.startswith("random:")]
    seed_draws: dict[int, np.ndarray] = {}

    def seed_weights(m: int) -> np.ndarray:  # [R, m], rows sum to 1
        if m not in seed_draws:
            seed_draws[m] = np.random.default_rng([seed, m]).multinomial(m, np.full(m, 1.0 / m), size=R) / m
        return seed_draws[m]

    cell_rows: list[dict[str, Any]] = []
    sel_rows: list[dict[str, Any]] = []
    for (nset, k), rows in real.groupby(["neuron_set", "deactivated_lang"], sort=False):
        crow = ctrl[(ctrl["neuron_set"] == f"random:{nset}") & (ctrl["deactivated_lang"] == k)]
        seeds = sorted(int(s) for s in crow["seed"].dropna().unique())
        kind = crow["control"].dropna().iloc[0] if len(crow) and crow["control"].notna().any() else None
        w = seed_weights(len(seeds)) if seeds else None
        per_j: dict[str, tuple[float, np.ndarray, float, np.ndarray | None]] = {}
        for j in langs:
            d, d_r = delta(rows, j)
            c_pt, c_r, c_sd = float("nan"), None, float("nan")
            if seeds:
                pts, res = zip(*(delta(crow[crow["seed"] == s], j) for s in seeds))
                c_pt = float(np.mean(pts))
                c_sd = float(np.std(pts, ddof=1)) if len(pts) > 1 else float("nan")
                c_r = (w * np.stack(res, axis=1)).sum(1)  # type: ignore[operator]
            per_j[j] = (d, d_r, c_pt, c_r)
            lo, hi = _pct(d_r, level)
            ex = ex_lo = ex_hi = float("nan")
            if c_r is not None:
                ex = d - c_pt
                ex_lo, ex_hi = _pct(d_r - c_r, level)
            n = len(order[j])
            cell_rows.append({"neuron_set": nset, "deactivated_lang": k, "eval_lang": j, "control": kind,
                              "delta": d, "ci_low": lo, "ci_high": hi, "control_mean": c_pt, "control_sd": c_sd,
                              "control_seeds": len(seeds), "excess": ex, "excess_low": ex_lo, "excess_high": ex_hi,
                              "excludes_control": bool(c_r is not None and (ex_lo > 0 or ex_hi < 0)),
                              "n_docs": n, "n_tokens": n_tok[j], "n_resamples": R,
                              "distinct_resamples": distinct_resamples(n)})
        if k not in per_j or len(langs) < 2:
            continue
        others = [j for j in langs if j != k]
        own, own_r, c_own, c_own_r = per_j[k]
        sel = own - float(np.mean([per_j[j][0] for j in others]))
        sel_r = own_r - np.mean([per_j[j][1] for j in others], axis=0)
        row = {"neuron_set": nset, "deactivated_lang": k, "control": kind, "own": own,
               "others_mean": float(np.mean([per_j[j][0] for j in others])), "selectivity": sel}
        row["selectivity_low"], row["selectivity_high"] = _pct(sel_r, level)
        nan = float("nan")
        row.update(control_own=c_own, excess=nan, excess_low=nan, excess_high=nan, control_selectivity=nan,
                   selectivity_excess=nan, selectivity_excess_low=nan, selectivity_excess_high=nan)
        if c_own_r is not None:
            c_sel = c_own - float(np.mean([per_j[j][2] for j in others]))
            c_sel_r = c_own_r - np.mean([per_j[j][3] for j in others], axis=0)  # type: ignore[misc]
            row.update(excess=own - c_own, control_selectivity=c_sel, selectivity_excess=sel - c_sel)
            row["excess_low"], row["excess_high"] = _pct(own_r - c_own_r, level)
            row["selectivity_excess_low"], row["selectivity_excess_high"] = _pct(sel_r - c_sel_r, level)
        distinct = 1
        for j in langs:
            distinct = min(distinct * distinct_resamples(len(order[j])), _CAP)
        row.update(control_seeds=len(seeds), n_docs=len(order[k]), n_tokens=n_tok[k],
                   n_docs_min=min(len(order[j]) for j in langs), n_resamples=R, distinct_resamples=distinct)
        sel_rows.append(row)

    import pandas as pd

    cells = pd.DataFrame(cell_rows)
    selectivity = pd.DataFrame(sel_rows)
    return AblationIntervals(cells, selectivity, R, seed, level, metric)
