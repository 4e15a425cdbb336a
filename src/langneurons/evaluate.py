"""Evaluation under interventions: perplexity, bits per byte, generations, output language and
MGSM-style task accuracy, and the K x K ablation matrix.

Perplexity
    Token-weighted mean negative log-likelihood (natural log) of the TRUE next token:
    ``log_softmax(logits[t-1])[token t]`` for every scored target t (never an average of top-k
    entries, which biased the published vLLM numbers down). ``ppl = exp(nll)``. Targets are the
    tokens that `langneurons.record.encode_example` counts (same token roles as recording, so both
    agree on the prompt/response boundary): special tokens added by the tokenizer (BOS/EOS) are
    never targets, an EOS written in the text is. The first token has no predecessor and is never
    a target. Batches are right padded (every real token sees what it would see unbatched), so
    results do not depend on the batch size (tested: batch 1 vs 4 within 1e-5).
Perplexity styles (``ppl_style``)
    ``token`` (default): the token-weighted mean above, ``nll = Σ_docs NLL / Σ_docs tokens``.
    ``paper``: what the published code reports (arXiv:2505.21505): each document's mean NLL
    over its scored tokens, averaged over documents, then ``ppl = exp(mean)``; ``bpb`` is then the
    mean over documents of each document's bits per byte. Both use true-token log-probabilities
    only. Short documents weigh as much as long ones in the paper style, so the two differ
    whenever documents differ in length and difficulty (docs/interventions.md).
Bits per byte
    ``bpb = total NLL / ln 2 / total UTF-8 bytes`` of the scored text: the characters from the
    start of the first scored token to the end of the last one (the whole text after BOS, or the
    response in the ``response`` scope). Tokenizers split scripts very unequally, so per-token
    perplexity is not comparable across languages; bits per byte is.
Deltas
    The ablation matrix reports ΔNLL per token (= Δ log PPL) as the primary quantity: one fragile
    language's PPL can rise 1000x and dominate any arithmetic mean of ΔPPL. ΔPPL and Δbpb are
    reported beside it. Every cell has a random control of the same per-layer sizes (several seeds).
Output language
    `lingua-language-detector` (package ``lingua``): offline (models ship in the wheel), maintained,
    accurate on short texts (our responses are often one sentence), 75 languages incl. en, zh, ru,
    de, fr, es, ja, bn, th, sw. Measured here (2 CPU cores, 30 languages): building the detector
    takes < 1 ms with lazily loaded models; the first texts load the needed language models
    (~3 s, ~400 MB RSS for 10 scripts), then ~50 µs per text. Preloading all models takes ~4 s and
    ~650 MB for no gain; low-accuracy mode needs 40 MB but is unreliable below ~120 characters, so
    it is off. langdetect is non-deterministic unless seeded and weak on short texts; fastText's
    lid.176 needs a model download, which this project must not do.
MGSM accuracy
    correct = the LAST number in the response equals the reference answer numerically AND the
    response is detected to be in the prompt's language.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import warnings
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .arch import locate_activations
from .corpus import Example
from .errors import CorpusError, LangNeuronsError, NeuronMapError
from .intervene import deactivate, mask_key, matched_control, random_control
from .io import atomic_write_text
from .lm import encode_example, input_device
from .neurons import DEFAULT_SETS
from .lm import generate as lm_generate
from .lm import pad_id as tokenizer_pad_id
from .record import RecordConfig
from .tasks import ANSWER_FIELDS, answer_number, extract_final_number, read_task

EvalScope = Literal["all", "response"]
METRICS = ("nll", "ppl", "bpb")
#: aggregations of per-document NLL: token-weighted (default) or the paper's mean of document means
PPL_STYLES = ("token", "paper")
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# perplexity and bits per byte
# --------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Token-weighted NLL of one corpus, with per-document sums (for bootstrap intervals)."""

    nll: float  # mean NLL per scored token (nats)
    ppl: float  # exp(nll)
    bpb: float  # bits per UTF-8 byte of the scored text
    n_tokens: int
    n_bytes: int
    doc_nll: list[float]  # per document: summed NLL (nats), in input order
    doc_tokens: list[int]  # per document: scored tokens (0 = skipped)
    doc_bytes: list[int]  # per document: UTF-8 bytes of the scored text
    scope: str = "all"

    @property
    def total_nll(self) -> float:
        return float(sum(self.doc_nll))

    @property
    def n_docs(self) -> int:
        return sum(1 for t in self.doc_tokens if t > 0)

    def metric(self, name: str, style: str = "token") -> float:
        """``name`` (nll, ppl, bpb) in ``style``: token-weighted, or the paper's mean over
        documents of each document's mean (module docstring)."""
        if name not in METRICS:
            raise LangNeuronsError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
        if style == "token":
            return float(getattr(self, name))
        if style != "paper":
            raise LangNeuronsError(f"--ppl-style must be one of {', '.join(PPL_STYLES)}, got {style!r}")
        docs = [(nll, tok, nb) for nll, tok, nb in zip(self.doc_nll, self.doc_tokens, self.doc_bytes) if tok > 0]
        if name == "bpb":
            return sum(nll / LN2 / max(nb, 1) for nll, _, nb in docs) / len(docs)
        mean = sum(nll / tok for nll, tok, _ in docs) / len(docs)
        return mean if name == "nll" else math.exp(mean)

    @classmethod
    def from_docs(cls, doc_nll: Sequence[float], doc_tokens: Sequence[int], doc_bytes: Sequence[int],
                  scope: str = "all") -> "EvalResult":
        n_tok, n_bytes = int(sum(doc_tokens)), int(sum(doc_bytes))
        total = float(sum(doc_nll))
        if n_tok == 0:
            raise CorpusError("no token to score: every text is empty after tokenisation (or has no response)")
        nll = total / n_tok
        return cls(nll=nll, ppl=math.exp(nll), bpb=total / LN2 / max(n_bytes, 1), n_tokens=n_tok, n_bytes=n_bytes,
                   doc_nll=[float(x) for x in doc_nll], doc_tokens=[int(x) for x in doc_tokens],
                   doc_bytes=[int(x) for x in doc_bytes], scope=scope)


@dataclass
class ScoredDoc:
    input_ids: list[int]
    scored: list[bool]  # position t is a scored target (predicted from t-1)
    n_bytes: int


def _as_example(x: Example | str) -> Example:
    return x if isinstance(x, Example) else Example("", text=str(x))


def model_max_length(model: nn.Module, max_length: int | None) -> int:
    cfg = model.config
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(max_length or ctx or 4096)


def encode_for_eval(tokenizer: Any, ex: Example | str, scope: EvalScope = "all", max_length: int = 4096,
                    separator: str = "\n") -> ScoredDoc:
    """Token ids, scored-target flags and scored bytes of one example (token roles exactly as
    `record.encode_example` with ``include_special=False``)."""
    ex = _as_example(ex)
    cfg = RecordConfig(scope=scope, include_special=False, separator=separator)
    enc, _ = encode_example(tokenizer, ex, cfg, max_length)
    scored = list(enc.counted)
    if scored:
        scored[0] = False  # no predecessor to predict it from
    if not any(scored):
        return ScoredDoc(enc.input_ids, scored, 0)
    text = ex.text if not ex.is_pair else ex.prompt + separator + ex.response  # type: ignore[operator]
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                            truncation=False)["offset_mapping"][:len(enc.input_ids)]
        spans = [offsets[t] for t, s in enumerate(scored) if s]
        start, end = min(a for a, _ in spans), max(b for _, b in spans)
        n_bytes = len(text[start:end].encode("utf-8"))
    else:  # no offsets: the whole text (a slow tokenizer is only allowed in the 'all' scope)
        n_bytes = len(text.encode("utf-8"))
    return ScoredDoc(enc.input_ids, scored, n_bytes)


@torch.inference_mode()
def score_docs(model: nn.Module, docs: Sequence[ScoredDoc], *, pad_id: int, batch_size: int, scope: str,
                rows_per_chunk: int = 1024, after_batch: Any = None) -> EvalResult:
    """Summed true-token NLL per document (right padding, length-bucketed batches)."""
    if batch_size < 1:
        raise LangNeuronsError(f"--batch-size must be >= 1, got {batch_size}")
    device = input_device(model)
    doc_nll = torch.zeros(len(docs), dtype=torch.float64)
    doc_tokens = [sum(d.scored) for d in docs]
    live = [i for i, d in enumerate(docs) if doc_tokens[i] > 0]
    order = sorted(live, key=lambda i: -len(docs[i].input_ids))
    for j in range(0, len(order), batch_size):
        batch = order[j:j + batch_size]
        T = max(len(docs[i].input_ids) for i in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        scored = torch.zeros((len(batch), T), dtype=torch.bool)
        for b, i in enumerate(batch):
            n = len(docs[i].input_ids)
            ids[b, :n] = torch.tensor(docs[i].input_ids)
            attn[b, :n] = 1
            scored[b, :n] = torch.tensor(docs[i].scored)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
        if after_batch is not None:
            after_batch()
        rows, cols = scored.nonzero(as_tuple=True)  # target positions (all >= 1)
        labels = ids[rows, cols]
        for c in range(0, rows.numel(), rows_per_chunk):  # bounded [rows, vocab] float32 buffer
            r, t, y = rows[c:c + rows_per_chunk], cols[c:c + rows_per_chunk], labels[c:c + rows_per_chunk]
            dev = logits.device
            logp = torch.log_softmax(logits[r.to(dev), (t - 1).to(dev)].float(), dim=-1)
            nll = -logp.gather(1, y.to(dev).unsqueeze(1)).squeeze(1)
            doc_idx = torch.tensor(batch, dtype=torch.long)[r]
            doc_nll.index_add_(0, doc_idx, nll.double().cpu())
        del logits
    return EvalResult.from_docs(doc_nll.tolist(), doc_tokens, [d.n_bytes if doc_tokens[i] else 0
                                                              for i, d in enumerate(docs)], scope)


def perplexity(model: nn.Module, tokenizer: Any, texts_or_examples: Sequence[Example | str], *,
               batch_size: int = 8, scope: EvalScope = "all", max_length: int | None = None,
               separator: str = "\n") -> EvalResult:
    """Token-weighted NLL, perplexity and bits per byte of texts (or of the responses of
    prompt/response examples with ``scope="response"``)."""
    if scope not in ("all", "response"):
        raise LangNeuronsError(f"scope must be 'all' or 'response', got {scope!r}")
    limit = model_max_length(model, max_length)
    docs = [encode_for_eval(tokenizer, x, scope, limit, separator) for x in texts_or_examples]
    _warn_skipped(docs, scope)
    return score_docs(model.eval(), docs, pad_id=tokenizer_pad_id(tokenizer), batch_size=batch_size, scope=scope)


def _warn_skipped(docs: Sequence[ScoredDoc], scope: str, what: str = "") -> None:
    empty = sum(1 for d in docs if not any(d.scored))
    if empty:
        warnings.warn(f"{what}{empty} example(s) have no {'response ' if scope == 'response' else ''}token to "
                      "score and were skipped", stacklevel=3)


# --------------------------------------------------------------------------------------------
# the ablation matrix
# --------------------------------------------------------------------------------------------
def control_seed(seed: int, lang: str, neuron_set: str) -> int:
    """The generator seed of the random control for (user seed, deactivated language, set):
    distinct per language and set, so controls of different rows are independent draws."""
    return zlib.crc32(f"{seed}\0{lang}\0{neuron_set}".encode("utf-8"))


def _resolve_scope(examples: Sequence[Example], scope: str) -> EvalScope:
    if scope == "auto":
        return "response" if examples and all(e.is_pair for e in examples) else "all"
    if scope not in ("all", "response"):
        raise LangNeuronsError(f"scope must be auto, all or response, got {scope!r}")
    return scope  # type: ignore[return-value]


@dataclass
class _Job:
    neuron_set: str  # "specific" ... or "random:specific"
    lang: str  # deactivated language
    seed: int | None
    mask: torch.Tensor  # bool [L, N]
    control: str | None = None  # "matched" | "layer" for control rows, None for real sets
    experts: bool = False  # mask is bool [L, E] of whole experts (MoE: router logits masked)

    @property
    def key(self) -> bytes:
        return (b"experts:" if self.experts else b"") + mask_key(self.mask)


#: prefix of a neuron set that removes whole experts of a mixture of experts (docs/moe.md)
EXPERTS_PREFIX = "experts:"


def _expert_jobs(nmap: Any, langs: Sequence[str], spec: str, control: str | None,
                 control_seeds: Sequence[int]) -> list[_Job]:
    """Jobs of an ``experts:<classes>`` set: a language's experts of those classes (from the
    routing statistics, `moe.experts_map`) are removed by masking their router logits. The
    control is random experts with the same count per layer, outside every selected expert (an
    expert's "activity" is its routing share, which the selection is made on: no finer match)."""
    from .moe import experts_map
    from .neurons import parse_classes

    classes = parse_classes(spec[len(EXPERTS_PREFIX):])
    name = EXPERTS_PREFIX + ",".join(classes)
    emap = experts_map(nmap)
    jobs = []
    for lang in langs:
        real = emap.language_mask(lang, classes)
        jobs.append(_Job(name, lang, None, real, experts=True))
        if control is None:
            continue
        for seed in control_seeds:
            rand = random_control(real, control_seed(seed, lang, name), exclude=real | emap.selected.to(torch.bool),
                                  strict=False)
            jobs.append(_Job(f"random:{name}", lang, int(seed), rand, "layer", experts=True))
    return jobs


CONTROLS = ("matched", "layer")


def plan_jobs(nmap: Any, langs: Sequence[str], neuron_sets: Sequence[str], control: str | None,
               control_seeds: Sequence[int], activity: torch.Tensor | None = None, control_bins: int = 20,
               match_info: list[dict] | None = None) -> list[_Job]:
    from .neurons import parse_classes

    jobs: list[_Job] = []
    for spec in neuron_sets:
        if spec.startswith(EXPERTS_PREFIX):
            jobs.extend(_expert_jobs(nmap, langs, spec, control, control_seeds))
            continue
        classes = parse_classes(spec)
        name = ",".join(classes)
        for lang in langs:
            real = nmap.language_mask(lang, classes)
            jobs.append(_Job(name, lang, None, real))
            if control is None:
                continue
            for seed in control_seeds:
                cseed = control_seed(seed, lang, name)
                if control == "layer":
                    rand = random_control(real, cseed, exclude=real, strict=False)
                else:
                    info: dict[str, Any] = {}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # re-said below with the language and set
                        # never another selected (language) neuron: on Gemma a matched draw that
                        # took Russian's related neurons hurt Russian more than its specific set
                        rand = matched_control(real, activity, cseed,  # type: ignore[arg-type]
                                               exclude=real | nmap.selected.to(torch.bool), bins=control_bins,
                                               info=info)
                    if info["shortfall"]:
                        short = sum(x["needed"] - x["available"] for x in info["shortfall"])
                        first = info["shortfall"][0]
                        warnings.warn(f"matched control of {lang} {name} (seed {seed}): {short} neuron(s) could "
                                      f"not be drawn from their activity stratum ({len(info['shortfall'])} strata "
                                      f"too small, e.g. layer {first['layer']} needs {first['needed']}, has "
                                      f"{first['available']}); the nearest-activity neurons of the layer stand in "
                                      "(see stats['control_match'])", stacklevel=3)
                    if match_info is not None:
                        match_info.append({"neuron_set": name, "deactivated_lang": lang, "seed": int(seed),
                                           "n_neurons": int(real.sum()), **info})
                jobs.append(_Job(f"random:{name}", lang, int(seed), rand, control))
    return jobs


def job_patch(model: nn.Module, job: _Job, *, sites: Any = None, mode: str = "zero", factor: float = 0.0) -> Any:
    """The intervention context of one planned job: whole experts removed at the router
    (``experts:`` sets), else the job's neurons deactivated at all positions."""
    if job.experts:
        from .moe import mask_experts

        return mask_experts(model, job.mask)
    return deactivate(model, job.mask, mode=mode, factor=factor, sites=sites)  # type: ignore[arg-type]


def score_each_mask(model: nn.Module, unique: Mapping[bytes, _Job], score_all: Any, *, sites: Any = None,
                    desc: str = "ablation", progress: bool = True, mode: str = "zero", factor: float = 0.0,
                    after_baseline: Any = None) -> dict[bytes | None, Any]:
    """``score_all()`` once unpatched (key None) and once under each distinct mask (`job_patch`,
    checked to have fired), with a progress bar over the passes; ``after_baseline(result)`` runs
    after the first pass (e.g. to say what the rest will cost)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1 + len(unique), desc=desc, unit="pass", disable=not progress, dynamic_ncols=True, leave=False)
    out: dict[bytes | None, Any] = {}
    try:
        bar.set_postfix_str("baseline")
        out[None] = score_all()
        bar.update(1)
        if after_baseline is not None:
            after_baseline(out[None])
        for key, job in unique.items():
            bar.set_postfix_str(f"{job.neuron_set} -{job.lang}")
            with job_patch(model, job, sites=sites, mode=mode, factor=factor) as iv:
                out[key] = score_all()
            iv.check_fired()
            bar.update(1)
    finally:
        bar.close()
    return out


def distinct_masks(jobs: Sequence[_Job]) -> dict[bytes, _Job]:
    """One job per distinct non-empty mask: an empty mask is the baseline, and identical masks
    (e.g. "specific" and "specific,related" for a language without related neurons) run once."""
    unique: dict[bytes, _Job] = {}
    for job in jobs:
        if job.mask.any():
            unique.setdefault(job.key, job)
    return unique


def check_control(control: str | None, activity: torch.Tensor | None = None,
                   shape: tuple[int, int] | None = None) -> str | None:
    """Normalise the control kind: "matched" (activity-matched, needs ``activity``), "layer"
    (per-layer counts only; "random" is its old name), or None ("none", "")."""
    if control in (None, "none", ""):
        return None
    if control == "random":
        control = "layer"
    if control not in CONTROLS:
        raise LangNeuronsError(f"--control must be matched, layer or none, got {control!r}")
    if control == "matched":
        if activity is None:
            raise LangNeuronsError("control='matched' needs the neurons' activity [layers, neurons] "
                                   "(activity_from_probs(stats.probs())); or use control='layer'")
        if shape is not None and tuple(torch.as_tensor(activity).shape) != tuple(shape):
            raise NeuronMapError(f"the activity is {list(torch.as_tensor(activity).shape)} but the model has "
                                 f"{shape[0]} layers x {shape[1]} neurons; it was recorded on another model")
    return control


def plan_passes(nmap: Any, *, langs: Sequence[str] | None = None, neuron_sets: Sequence[str] = DEFAULT_SETS,
                control: str | None = "matched", control_seeds: Sequence[int] = (0, 1, 2),
                activity: torch.Tensor | None = None, control_bins: int = 20) -> int:
    """The number of forward passes over the pooled held-out corpus that `ablation_matrix` will
    run with these settings: 1 baseline + one per distinct non-empty mask (cheap: no model)."""
    control = check_control(control, activity)
    langs = list(langs) if langs else list(nmap.languages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jobs = plan_jobs(nmap, langs, neuron_sets, control, control_seeds, activity, control_bins)
    return 1 + len(distinct_masks(jobs))


def _bootstrap(base: EvalResult, abl: EvalResult, metric: str, n: int, seed: int = 0,
               style: str = "token") -> tuple[float, float]:
    """95% percentile interval of the metric's delta, resampling documents (paired), in the
    perplexity style of the rows."""
    import numpy as np

    tok = np.asarray(base.doc_tokens, dtype=np.float64)
    keep = tok > 0
    tok = tok[keep]
    b_nll = np.asarray(base.doc_nll)[keep]
    a_nll = np.asarray(abl.doc_nll)[keep]
    nbytes = np.asarray(base.doc_bytes, dtype=np.float64)[keep]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, tok.size, size=(n, tok.size))
    if style == "paper":  # means over the resampled documents of per-document means
        if metric == "bpb":
            db, da = b_nll / LN2 / np.maximum(nbytes, 1), a_nll / LN2 / np.maximum(nbytes, 1)
            d = da[idx].mean(1) - db[idx].mean(1)
        else:
            mb, ma = (b_nll / tok)[idx].mean(1), (a_nll / tok)[idx].mean(1)
            d = ma - mb if metric == "nll" else np.exp(ma) - np.exp(mb)
        lo, hi = np.percentile(d, [2.5, 97.5])
        return float(lo), float(hi)
    t, B, A = tok[idx].sum(1), b_nll[idx].sum(1), a_nll[idx].sum(1)
    if metric == "nll":
        d = (A - B) / t
    elif metric == "ppl":
        d = np.exp(A / t) - np.exp(B / t)
    else:
        d = (A - B) / LN2 / nbytes[idx].sum(1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def ablation_matrix(model: nn.Module, tokenizer: Any, nmap: Any, eval_corpus: Mapping[str, Sequence[Example | str]],
                    *, neuron_sets: Sequence[str] = DEFAULT_SETS, control: str | None = "matched",
                    control_seeds: Sequence[int] = (0, 1, 2), metrics: Sequence[str] = METRICS,
                    batch_size: int = 8, progress: bool = True, langs: Sequence[str] | None = None,
                    scope: str = "auto", max_length: int | None = None, mode: str = "zero", factor: float = 0.0,
                    act_path: str | None = None, bootstrap: int = 0, separator: str = "\n",
                    stats: dict[str, Any] | None = None, activity: torch.Tensor | None = None,
                    control_bins: int = 20, documents: list[dict] | None = None,
                    echo: Any = None, ppl_style: str = "token") -> "Any":
    """The K x K intervention matrix in the ``ablation.parquet`` schema.

    Rows of the result: one per (deactivated language k, eval language j, neuron set, metric
    [, seed]). Cost: one unpatched pass per eval language (the shared baseline), then one pass per
    eval language for every DISTINCT non-empty mask: a set that is empty for k reuses the baseline
    (an empty mask is exactly the unpatched model), and identical masks (e.g. "specific" and
    "specific,related" when k has no related neurons) run once. ``stats`` (optional dict) receives
    ``passes``, ``reused``, ``seconds``, ``control`` and, for the matched control, ``control_match``
    (per set, language and seed: mean activity of the real set and of the control, and any stratum
    that was too small).

    Controls (``control=``): ``"matched"`` (default) draws, per layer and activity stratum, as many
    random neurons as the real set has there (`intervene.matched_control`; ``activity`` is the
    [L, N] tensor of `intervene.activity_from_probs(stats.probs())`, ``control_bins`` the number
    of quantile strata per layer); ``"layer"`` (old name ``"random"``) matches only the per-layer
    counts; None runs no control. Control rows are named ``random:<set>`` and carry the kind in
    the ``control`` column.

    ``documents`` (optional list) receives one dict per (mask, evaluation document): neuron_set
    ("none" for the unpatched baseline), deactivated_lang, seed, control, eval_lang, doc, nll
    (summed nats), tokens, bytes -- what `confidence.ablation_intervals` resamples (written by the
    pipeline as ``ablation_docs.parquet``).

    ``ppl_style``: "token" (token-weighted NLL, the default) or "paper" (mean over documents of
    each document's mean NLL, then exp; the published aggregation): see the module docstring.

    ``echo`` (e.g. ``print``): after the baseline pass, one line with the time the remaining
    passes will take at the speed just measured (`ablation_cost`), so a long matrix is said
    before it runs.
    """
    metrics = [m for m in metrics if m != "accuracy"]
    if ppl_style not in PPL_STYLES:
        raise LangNeuronsError(f"--ppl-style must be one of {', '.join(PPL_STYLES)}, got {ppl_style!r}")
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise LangNeuronsError(f"unknown metric(s) {bad}; use nll, ppl, bpb (accuracy: accuracy_matrix)")
    sites = locate_activations(model, act_path)
    nmap.check_fits(sites.num_layers, sites.num_neurons)
    control = check_control(control, activity, (sites.num_layers, sites.num_neurons))
    langs = list(langs) if langs else list(nmap.languages)
    missing = [x for x in langs if x not in nmap.languages]
    if missing:
        raise LangNeuronsError(f"languages {missing} are not in the neuron map ({','.join(nmap.languages)})")
    if not eval_corpus:
        raise CorpusError("the evaluation corpus is empty")
    model = model.eval()
    pad_id = tokenizer_pad_id(tokenizer)
    limit = model_max_length(model, max_length)

    docs: dict[str, list[ScoredDoc]] = {}
    scopes: dict[str, EvalScope] = {}
    for j, items in eval_corpus.items():
        examples = [_as_example(x) for x in items]
        if not examples:
            raise CorpusError(f"evaluation language {j!r} has no examples")
        scopes[j] = _resolve_scope(examples, scope)
        docs[j] = [encode_for_eval(tokenizer, e, scopes[j], limit, separator) for e in examples]
        _warn_skipped(docs[j], scopes[j], f"{j}: ")

    match_info: list[dict] = []
    jobs = plan_jobs(nmap, langs, neuron_sets, control, control_seeds, activity, control_bins, match_info)
    unique = distinct_masks(jobs)
    t0 = time.perf_counter()

    # All evaluation languages are scored in ONE pass per mask: the documents are pooled so
    # batches are full (small per-language batches waste most of a CPU's matmul throughput),
    # then the per-document sums are split back by language. Results are identical to
    # per-language passes (right padding: no document sees another).
    pooled: list[ScoredDoc] = [d for j in eval_corpus for d in docs[j]]
    spans: dict[str, tuple[int, int]] = {}
    start = 0
    for j in eval_corpus:
        spans[j] = (start, start + len(docs[j]))
        start += len(docs[j])

    def score_all() -> dict[str, EvalResult]:
        res = score_docs(model, pooled, pad_id=pad_id, batch_size=batch_size, scope="pooled")
        out = {}
        for j, (a, b) in spans.items():
            try:
                out[j] = EvalResult.from_docs(res.doc_nll[a:b], res.doc_tokens[a:b], res.doc_bytes[a:b], scopes[j])
            except CorpusError as exc:
                raise CorpusError(f"evaluation language {j!r}: {exc}") from None
        return out

    t_base = time.perf_counter()

    def said_cost(baseline: dict[str, EvalResult]) -> None:
        if echo is not None and unique:
            n_tok = sum(r.n_tokens for r in baseline.values())
            speed = n_tok / max(time.perf_counter() - t_base, 1e-9)
            echo(ablation_cost(len(unique), n_tok, speed).line().replace(" tok/s", " tok/s (measured on the "
                                                                         "baseline pass)"))

    by_mask = score_each_mask(model, unique, score_all, sites=sites, desc="ablation", progress=progress, mode=mode,
                              factor=factor, after_baseline=said_cost)
    results = {(key, j): res for key, scored in by_mask.items() for j, res in scored.items()}

    rows = []
    for job in jobs:
        n_neurons = int(job.mask.sum())
        key = job.key if n_neurons else None
        for j in eval_corpus:
            base, abl = results[(None, j)], results[(key, j)]
            for m in metrics:
                b, a = base.metric(m, ppl_style), abl.metric(m, ppl_style)
                lo = hi = float("nan")
                if bootstrap and n_neurons:
                    lo, hi = _bootstrap(base, abl, m, bootstrap, style=ppl_style)
                rows.append({"deactivated_lang": job.lang, "eval_lang": j, "neuron_set": job.neuron_set, "metric": m,
                             "base": b, "ablated": a, "delta": a - b, "n_tokens": base.n_tokens,
                             "seed": job.seed, "n_neurons": n_neurons, "ci_low": lo, "ci_high": hi,
                             "n_docs": base.n_docs, "n_resamples": int(bootstrap) if n_neurons else 0,
                             "control": job.control})
    if documents is not None:
        def add_docs(res: EvalResult, j: str, job: _Job | None) -> None:
            for d, (nll, tok, nb) in enumerate(zip(res.doc_nll, res.doc_tokens, res.doc_bytes)):
                if tok > 0:
                    documents.append({"neuron_set": "none" if job is None else job.neuron_set,
                                      "deactivated_lang": None if job is None else job.lang,
                                      "seed": None if job is None else job.seed,
                                      "control": None if job is None else job.control, "eval_lang": j, "doc": d,
                                      "nll": nll, "tokens": tok, "bytes": nb})
        for j in eval_corpus:
            add_docs(results[(None, j)], j, None)
        for job in jobs:
            key = job.key if job.mask.any() else None
            for j in eval_corpus:
                add_docs(results[(key, j)], j, job)
    if stats is not None:
        stats.update(passes=1 + len(unique), reused=len(jobs) - len(unique),
                     seconds=round(time.perf_counter() - t0, 3),
                     scope={j: s for j, s in scopes.items()}, control=control or "none", ppl_style=ppl_style)
        if control == "matched":
            stats["control_match"] = match_info
            stats["control_bins"] = control_bins
    return ablation_frame(rows)


# --------------------------------------------------------------------------------------------
# sizing the held-out evaluation by tokens, and its cost said up front
# --------------------------------------------------------------------------------------------
@dataclass
class EvalSelection:
    """Held-out documents picked per language up to a token budget (`select_eval_docs`)."""

    by_lang: dict[str, list[Example]]
    tokens: dict[str, int]  # scored tokens per language
    available: dict[str, int]  # held-out documents that were offered per language
    budget: int

    @property
    def docs(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.by_lang.items()}

    @property
    def tokens_per_pass(self) -> int:
        """Scored tokens of one pass over the pooled corpus (every language at once)."""
        return int(sum(self.tokens.values()))

    def summary(self) -> dict[str, Any]:
        return {"eval_tokens_per_lang": self.budget, "documents": self.docs, "tokens": dict(self.tokens),
                "available": dict(self.available), "tokens_per_pass": self.tokens_per_pass}


def select_eval_docs(tokenizer: Any, eval_corpus: Mapping[str, Sequence[Example | str]], tokens_per_lang: int, *,
                     scope: str = "auto", max_length: int = 4096, separator: str = "\n",
                     min_docs: int = 10) -> EvalSelection:
    """Pick held-out documents per language, in their given order, until the next one would
    take the language past ``tokens_per_lang`` scored tokens (the same tokens the ablation
    scores: `encode_for_eval`). At least one document per language, even when it alone is over
    the budget. Documents without a scored token are skipped.

    Why tokens, not documents: the cost of a pass is its number of tokens, and languages whose
    script the tokenizer splits finely would otherwise cost several times more. Why many short
    documents rather than a few long ones: the bootstrap resamples documents, so the number of
    documents (not tokens) decides whether an interval means anything. A language left with
    fewer than ``min_docs`` documents gets a warning naming it."""
    if tokens_per_lang < 1:
        raise LangNeuronsError(f"--eval-tokens-per-lang must be >= 1, got {tokens_per_lang}")
    out: dict[str, list[Example]] = {}
    tokens: dict[str, int] = {}
    available: dict[str, int] = {}
    for lang, items in eval_corpus.items():
        examples = [_as_example(x) for x in items]
        sc = _resolve_scope(examples, scope)
        picked: list[Example] = []
        total = 0
        for ex in examples:
            n = sum(encode_for_eval(tokenizer, ex, sc, max_length, separator).scored)
            if n == 0:
                continue
            if picked and total + n > tokens_per_lang:
                break
            picked.append(ex)
            total += n
        out[lang], tokens[lang], available[lang] = picked, total, len(examples)
    few = {k: len(v) for k, v in out.items() if len(v) < min_docs}
    if few:
        warnings.warn(f"{len(few)} language(s) have fewer than {min_docs} evaluation documents within "
                      f"{tokens_per_lang:,} tokens ({', '.join(f'{k}: {n}' for k, n in few.items())}); their "
                      "intervals will be rough: raise --eval-tokens-per-lang or hold out more (shorter) documents",
                      stacklevel=2)
    return EvalSelection(out, tokens, available, int(tokens_per_lang))


def eval_cost_factor(model: nn.Module) -> float:
    """How much more one evaluated token costs than one recorded token, from the parameter
    counts: recording runs the body only (no LM head), evaluation adds the LM head
    (vocabulary x hidden multiply-adds per token). A first-order estimate (it ignores the
    log-softmax over the vocabulary and attention's length term); the measured ratio belongs in
    ``ablation_cost(factor=...)`` when known. Measured on Gemma 3 270M (262,144-token
    vocabulary, CPU): this ratio is 2.67, the measured one 3.8 (the log-softmax over the
    vocabulary is memory-bound), so for large vocabularies treat it as a lower bound and trust the
    re-estimate `ablation_matrix(echo=...)` prints after its baseline pass."""
    emb = model.get_input_embeddings().weight
    vocab, hidden = int(emb.shape[0]), int(emb.shape[1])
    seen: set[int] = set()
    body = 0
    out_emb = model.get_output_embeddings()
    skip = {id(emb)} | ({id(out_emb.weight)} if out_emb is not None else set())
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        body += p.numel()
    return (body + vocab * hidden) / max(body, 1)


@dataclass
class CostEstimate:
    passes: int
    tokens_per_pass: int
    tokens_per_second: float  # measured while recording
    factor: float  # evaluation cost per token relative to recording

    @property
    def seconds(self) -> float:
        return self.passes * self.tokens_per_pass * self.factor / max(self.tokens_per_second, 1e-9)

    def line(self) -> str:
        """e.g. "61 passes x 12,000 tokens ≈ 7 min at 1,700 tok/s (recording speed; x2.7 per evaluated token)"."""
        sec = self.seconds
        when = f"{sec:.0f} s" if sec < 90 else (f"{sec / 60:.0f} min" if sec < 5400 else f"{sec / 3600:.1f} h")
        extra = "" if abs(self.factor - 1) < 1e-9 else f" (recording speed; x{self.factor:.2g} per evaluated token)"
        return (f"{self.passes:,} passes x {self.tokens_per_pass:,} tokens ≈ {when} at "
                f"{self.tokens_per_second:,.0f} tok/s{extra}")


def ablation_cost(passes: int, tokens_per_pass: int, tokens_per_second: float, *, factor: float = 1.0,
                  echo: Any = None) -> CostEstimate:
    """The time the ablation matrix will take, said before it starts: ``passes`` from
    `plan_passes`, ``tokens_per_pass`` from `EvalSelection.tokens_per_pass`, ``tokens_per_second``
    measured while recording, ``factor`` from `eval_cost_factor` (or measured). ``echo`` (e.g.
    ``print``) receives the line."""
    if passes < 0 or tokens_per_pass < 0:
        raise LangNeuronsError("passes and tokens per pass must be >= 0")
    if not tokens_per_second or tokens_per_second <= 0 or not math.isfinite(tokens_per_second):
        raise LangNeuronsError(f"tokens per second must be a positive number, got {tokens_per_second}")
    est = CostEstimate(int(passes), int(tokens_per_pass), float(tokens_per_second), float(factor))
    if echo is not None:
        echo(est.line())
    return est


COLUMNS = ["deactivated_lang", "eval_lang", "neuron_set", "metric", "base", "ablated", "delta", "n_tokens",
           "seed", "n_neurons", "ci_low", "ci_high", "n_docs", "n_resamples", "control"]


def ablation_frame(rows: list[dict]) -> Any:
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["seed"] = df["seed"].astype("Int64")
    for c in ("n_docs", "n_resamples"):
        df[c] = df[c].fillna(0).astype("int64")
    df["control"] = df["control"].astype("object")
    df["n_tokens"] = df["n_tokens"].astype("int64")
    df["n_neurons"] = df["n_neurons"].astype("int64")
    for c in ("base", "ablated", "delta", "ci_low", "ci_high"):
        df[c] = df[c].astype("float64")
    return df


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             mask: Any = None, positions: str = "all", batch_size: int = 8, mode: str = "zero",
             factor: float = 0.0, values: torch.Tensor | None = None, act_path: str | None = None,
             chat: bool | None = False) -> list[str]:
    """Greedy continuations of ``prompts`` (texts of the new tokens, in input order), optionally
    with neurons deactivated; a thin wrapper of `lm.generate` (which also gives token ids and
    stop reasons).

    ``chat``: apply the tokenizer's chat template (None: when the tokenizer has one).
    """
    sites = locate_activations(model, act_path) if mask is not None else None

    def during(width: int) -> Any:
        return _checked_deactivate(model, mask, mode=mode, factor=factor, values=values, positions=positions,
                                   prompt_length=width, sites=sites)

    gens = lm_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat,
                       batch_context=during if mask is not None else None)
    return [g.text for g in gens]


@contextlib.contextmanager
def _checked_deactivate(model: nn.Module, mask: Any, **kw: Any) -> Any:
    with deactivate(model, mask, **kw) as iv:
        yield iv
    iv.check_fired()


GENERATION_FIELDS = ("prompt", "output", "deactivated_lang", "neuron_set", "requested_lang", "detected_lang")


def write_generations(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write generations as JSONL (atomically). Each row has the GENERATION_FIELDS (missing -> null)
    and may carry more fields (answer, correct, seed...)."""
    lines = []
    for row in rows:
        rec = {k: row.get(k) for k in GENERATION_FIELDS}
        rec.update({k: v for k, v in row.items() if k not in rec})
        lines.append(json.dumps(rec, ensure_ascii=False, default=str))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------------
# output language
# --------------------------------------------------------------------------------------------
#: ~30 languages: the ten of the paper (en zh ru de fr es ja bn th sw) and common neighbours, so
#: that a response drifting into a related language is named rather than forced into the set.
DEFAULT_DETECT_LANGUAGES = ("en", "zh", "ru", "de", "fr", "es", "ja", "bn", "th", "sw", "ar", "hi", "ko", "it",
                            "pt", "nl", "pl", "tr", "vi", "id", "uk", "fa", "he", "el", "cs", "sv", "ta", "te",
                            "ur", "ms")
_DETECTORS: dict[tuple[str, ...], Any] = {}


def _primary(code: str) -> str:
    """The ISO 639-1 code lingua speaks, from any form (``de``, ``deu``, ``deu_Latn``, ``de-AT``)."""
    from .langcodes import to_iso639_1

    return to_iso639_1(code) or re.split(r"[-_]", code.strip())[0].lower()


def language_detector(languages: Sequence[str] | None = None) -> Any:
    """A lingua detector for these ISO 639-1 codes, built once per language set (module cache).
    High-accuracy mode, language models loaded lazily on first use."""
    codes = tuple(sorted({_primary(c) for c in (languages or DEFAULT_DETECT_LANGUAGES)}))
    det = _DETECTORS.get(codes)
    if det is not None:
        return det
    try:
        from lingua import IsoCode639_1, LanguageDetectorBuilder
    except ImportError:
        raise LangNeuronsError("language identification (the accuracy metric's language check) needs lingua: "
                               "pip install 'langneurons[eval]'") from None

    isos, unknown = [], []
    for c in codes:
        iso = getattr(IsoCode639_1, c.upper(), None)
        (isos if iso is not None else unknown).append(iso if iso is not None else c)
    if unknown:
        raise LangNeuronsError(f"language identification does not know {unknown} (lingua supports 75 ISO 639-1 "
                               "codes, e.g. en, zh, ru, de, fr, es, ja, bn, th, sw); rename the languages to ISO 639-1")
    if len(isos) < 2:
        raise LangNeuronsError("language identification needs at least two candidate languages")
    det = _DETECTORS[codes] = LanguageDetectorBuilder.from_iso_codes_639_1(*isos).build()
    return det


def detect_language(text: str, languages: Sequence[str] | None = None) -> str | None:
    """ISO 639-1 code of ``text``'s language, or None when it has no letters or is undecidable."""
    if not text or not any(ch.isalpha() for ch in text):
        return None
    lang = language_detector(languages).detect_language_of(text)
    return None if lang is None else lang.iso_code_639_1.name.lower()


# --------------------------------------------------------------------------------------------
# MGSM-style accuracy
# --------------------------------------------------------------------------------------------
def score_math(response: str, answer: Any, lang: str, *, languages: Sequence[str] | None = None) -> dict[str, Any]:
    """{"correct", "number_ok", "lang_ok", "detected", "predicted"} for one MGSM-style response."""
    predicted = extract_final_number(response)
    reference = answer_number(answer)
    if reference is None:
        raise CorpusError(f"reference answer {answer!r} has no number")
    number_ok = predicted is not None and Decimal(predicted) == reference
    detected = detect_language(response, languages)
    lang_ok = detected is not None and detected == _primary(lang)
    return {"correct": bool(number_ok and lang_ok), "number_ok": bool(number_ok), "lang_ok": bool(lang_ok),
            "detected": detected, "predicted": predicted}


@dataclass(frozen=True)
class MathExample(Example):
    """A prompt/response example with a numeric reference ``answer`` (a canonical number string)."""

    answer: str = ""


def read_mgsm(path: str | Path, lang: str | None = None) -> list[MathExample]:
    """MGSM-style math problems with a numeric answer, read by `tasks.read_task` (MGSM TSV,
    the HF MGSM JSON/JSONL rows, MSVAMP JSON, {lang, id, question, answer} JSONL; a directory
    of them). ``lang`` keeps one language (and names a file without mgsm_<lang>)."""
    out = []
    for ex in read_task(path, lang, parallel=False):
        if ex.answer is None:
            raise CorpusError(f"{ex.source}: no numeric answer (one of {', '.join(ANSWER_FIELDS)}); "
                              "accuracy needs a number to compare with")
        out.append(MathExample(ex.lang, prompt=ex.question, response=ex.answer_text or ex.answer, id=ex.id,
                               source=ex.source, answer=ex.answer))
    return out


def group_by_lang(examples: Iterable[Example]) -> dict[str, list[Example]]:
    by_lang: dict[str, list[Example]] = {}
    for e in examples:
        by_lang.setdefault(e.lang, []).append(e)
    return by_lang


def accuracy_matrix(model: nn.Module, tokenizer: Any, nmap: Any, math_corpus: Mapping[str, Sequence[MathExample]],
                    *, neuron_sets: Sequence[str] = DEFAULT_SETS, control: str | None = None,
                    control_seeds: Sequence[int] = (0, 1, 2), batch_size: int = 8, max_new_tokens: int = 256,
                    progress: bool = True, langs: Sequence[str] | None = None, chat: bool | None = None,
                    prompt_template: str = "{question}", detect_languages: Sequence[str] | None = None,
                    act_path: str | None = None, generations: list[dict] | None = None,
                    positions: str = "all", stats: dict[str, Any] | None = None,
                    activity: torch.Tensor | None = None, control_bins: int = 20) -> Any:
    """MGSM-style accuracy matrix: greedy generation with language k's neurons zeroed (all
    positions, or only the new tokens with ``positions="generated"``) for every eval language j,
    scored with `score_math`. Metrics: ``accuracy``
    (number right AND in j's language), ``number_accuracy``, ``language_accuracy``; n_tokens holds
    the number of problems. ``generations`` (a list) receives one JSONL row per generation.
    ``control``/``activity``/``control_bins`` as in `ablation_matrix` (no control by default:
    generation is expensive)."""
    sites = locate_activations(model, act_path)
    nmap.check_fits(sites.num_layers, sites.num_neurons)
    control = check_control(control, activity, (sites.num_layers, sites.num_neurons))
    langs = list(langs) if langs else list(nmap.languages)
    det_langs = tuple(sorted(set(detect_languages or DEFAULT_DETECT_LANGUAGES) | set(map(_primary, math_corpus))))
    language_detector(det_langs)  # fail early on languages lingua does not know
    jobs = plan_jobs(nmap, langs, neuron_sets, control, control_seeds, activity, control_bins)
    if positions != "all" and any(job.experts for job in jobs):
        raise LangNeuronsError("experts: sets mask the router at every position; use --positions all with them")
    unique = distinct_masks(jobs)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=len(math_corpus) * (1 + len(unique)), desc="accuracy", unit="cell", disable=not progress,
               dynamic_ncols=True, leave=False)
    scores: dict[tuple[bytes | None, str], list[dict]] = {}

    def run(key: bytes | None, job: _Job | None, j: str) -> None:
        exs = math_corpus[j]
        prompts = [prompt_template.format(question=e.prompt) for e in exs]
        if job is not None and job.experts:  # whole experts: the router never picks them, at every step
            from .moe import mask_experts

            with mask_experts(model, job.mask) as iv:
                outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                chat=chat, act_path=act_path)
            iv.check_fired()
        else:
            outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            chat=chat, mask=None if job is None else job.mask, positions=positions,
                            act_path=act_path)
        cell = []
        for e, prompt, out in zip(exs, prompts, outs):
            s = score_math(out, e.answer, j, languages=det_langs)
            cell.append(s)
            if generations is not None:
                generations.append({"prompt": prompt, "output": out,
                                    "deactivated_lang": None if job is None else job.lang,
                                    "neuron_set": "none" if job is None else job.neuron_set,
                                    "requested_lang": j, "detected_lang": s["detected"], "answer": e.answer,
                                    "predicted": s["predicted"], "correct": s["correct"],
                                    "seed": None if job is None else job.seed})
        scores[(key, j)] = cell
        bar.update(1)

    try:
        for j in math_corpus:
            run(None, None, j)
        for key, job in unique.items():
            for j in math_corpus:
                run(key, job, j)
    finally:
        bar.close()

    def mean(cell: list[dict], field_: str) -> float:
        return sum(1.0 for s in cell if s[field_]) / max(len(cell), 1)

    rows = []
    for job in jobs:
        n_neurons = int(job.mask.sum())
        key = job.key if n_neurons else None
        for j in math_corpus:
            base, abl = scores[(None, j)], scores[(key, j)]
            for metric, fld in (("accuracy", "correct"), ("number_accuracy", "number_ok"),
                                ("language_accuracy", "lang_ok")):
                b, a = mean(base, fld), mean(abl, fld)
                rows.append({"deactivated_lang": job.lang, "eval_lang": j, "neuron_set": job.neuron_set,
                             "metric": metric, "base": b, "ablated": a, "delta": a - b, "n_tokens": len(base),
                             "seed": job.seed, "n_neurons": n_neurons, "ci_low": float("nan"),
                             "ci_high": float("nan"), "n_docs": len(base), "n_resamples": 0,
                             "control": job.control})
    if stats is not None:
        stats.update(generation_cells=len(math_corpus) * (1 + len(unique)), reused=len(jobs) - len(unique),
                     seconds=round(time.perf_counter() - t0, 3))
    return ablation_frame(rows)
