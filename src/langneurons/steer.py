"""Steering the output language with language neurons, against the strongest baselines.

Deactivating neurons asks what breaks; steering asks whether the neurons *control* the output
language. For a source language s (the language of the prompt) and a target language t, the
prompts are the first words of the held-out documents of s (a parallel corpus: the same
documents exist in t), continued greedily with and without an intervention:

* ``neurons``  the language neurons of t (``classes``; with ``neurons="pair"`` also those of s)
  in a range of layers, patched with one of the modes (a = the neuron's activation, mu_k its mean
  activation in language k from the recorded sums, `ActivationStats.means`, S the strength):

  - ``set``    a := S * mu_t              (Kojima et al. 2024 fix neurons to their typical value)
  - ``add``    a := a + S * (mu_t - mu_s) ("language arithmetic", Gurgurov et al. 2025)
  - ``scale``  a := S * a

* ``random``   the same mode and strength on random neurons with the same number per layer,
  matched on activity within the layer (`intervene.matched_control`), with their own means;
* ``diffmean`` a residual-stream vector: h_l := h_l + S * (m_t(l) - m_s(l)), where m_k(l) is the
  mean residual after block l over the tokens of language k's documents of the run's
  identification corpus (no special tokens, no pads) -- the difference-of-means baseline that
  CLaS-Bench (2026) finds strongest;
* ``experts``  (mixtures of experts, opt-in) the language-specific *experts* of t (``classes`` of
  the expert-level map, `moe.experts_map`) in the layer range are forced into every token's top-k:
  their router logit := the token's best logit + log S, picked before any other expert
  (`moe.route_experts`); with ``neurons="pair"`` the experts of s are also removed from the router;
* ``random-experts`` the same forcing on random experts with the same number per layer, outside
  every selected expert (routing shares are what experts are selected on: no finer match);
* ``none``     no intervention (the baseline every fluency cost is measured against).

Each intervention applies to the prompt's positions, to generated positions only, or to both
(``positions``; `intervene.deactivate`).

Measures per cell (method, strength, layers, s -> t), over the cell's prompts:

* ``success``   forcing success: share of outputs whose detected language (lingua,
  `evaluate.detect_language`) is t;
* ``chrf``      fidelity: mean sentence chrF (sacrebleu, 0-1) of the output against the
  continuation of the same document in t (the target document after the same relative cut
  as the prompt);
* ``harmonic``  2 * success * chrf / (success + chrf), the combination CLaS-Bench uses;
* ``nll``       token-weighted mean NLL of the output under the *unsteered* model given the
  prompt (``ppl = exp(nll)``), and ``fluency_cost`` = nll - the unsteered outputs' nll of the
  same prompts (Δ log PPL; > 0: the steered text reads worse to the model).

Everything is written to RUN_DIR/steer.parquet (rows merged by their key, so a later sweep adds
to an earlier one) and the texts to RUN_DIR/steer_generations.jsonl.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .config import ModelConfig, require
from .errors import LangNeuronsError

STEER_FILE = "steer.parquet"
STEER_GENERATIONS = "steer_generations.jsonl"
STEER_MODES = ("set", "add", "scale")
STEER_POSITIONS = ("both", "prompt", "generated")
STEER_METHODS = ("neurons", "random", "diffmean", "experts", "random-experts")
DEFAULT_METHODS = ("neurons", "random", "diffmean")  # experts: only for a mixture of experts, asked for
EXPERT_METHODS = ("experts", "random-experts")
NEURON_SETS = ("target", "pair")
#: the columns that identify a row (a later run replaces the rows with the same key)
ROW_KEY = ("method", "mode", "classes", "neurons", "positions", "layers", "strength", "seed", "src", "tgt")
COLUMNS = (*ROW_KEY, "n_prompts", "n_neurons", "success", "chrf", "harmonic", "nll", "ppl", "base_nll",
           "fluency_cost", "n_tokens", "mean_chars", "setting")

__all__ = ["SteerConfig", "steer_prompts", "layer_ranges", "residual_means", "diffmean_vectors", "neuron_values",
           "output_nll", "chrf", "harmonic_mean", "steer_grid", "best_settings", "STEER_FILE"]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def _floats(value: Any, what: str) -> tuple[float, ...] | str:
    if isinstance(value, str) and value.strip().lower() == "best":
        return "best"
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(x) for x in items if str(x).strip())
    except ValueError:
        raise LangNeuronsError(f"{what} must be a comma list of numbers or 'best', got {value!r}") from None
    require(bool(out) and all(math.isfinite(x) for x in out), f"{what} needs finite numbers, got {value!r}")
    return out


def layer_ranges(spec: str | Sequence[str], num_layers: int) -> list[tuple[str, list[int]]]:
    """'all;0-5;12-17' (or a list of such items) -> [(name, [layers])]; ranges are inclusive."""
    items = [x.strip() for x in (spec.split(";") if isinstance(spec, str) else spec) if str(x).strip()]
    require(bool(items), "--layers is empty; give all or ranges such as 0-5;12-17")
    out: list[tuple[str, list[int]]] = []
    for item in items:
        if item == "all":
            out.append(("all", list(range(num_layers))))
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        require(m is not None, f"--layers items are all, N or A-B (inclusive), got {item!r}")
        a = int(m.group(1))  # type: ignore[union-attr]
        b = int(m.group(2) or a)  # type: ignore[union-attr]
        require(0 <= a <= b < num_layers, f"--layers {item}: the model has layers 0-{num_layers - 1}")
        out.append((f"{a}-{b}" if b > a else str(a), list(range(a, b + 1))))
    return out


@dataclass
class SteerConfig:
    """What `langneurons steer` does (see the module docstring for the meaning of each part)."""

    sources: list[str] | None = None  # --from (None: every language of the map)
    targets: list[str] | None = None  # --to
    classes: str = "specific"
    mode: str = "set"
    strengths: tuple[float, ...] | str = (1.0, 2.0)  # neurons and random; "best": from steer.parquet
    layers: tuple[str, ...] = ("all",)
    positions: str = "both"
    neurons: str = "target"  # target: the target language's neurons; pair: target's and source's
    methods: tuple[str, ...] = DEFAULT_METHODS
    diffmean_layers: tuple[int, ...] | None = None  # None: the middle block
    diffmean_strengths: tuple[float, ...] | str = (1.0, 2.0, 4.0)
    diffmean_docs: int = 32  # identification documents per language for the mean residuals
    control_seeds: tuple[int, ...] = (0,)
    control_bins: int = 20
    prompts: int = 8  # held-out documents per source language
    prompt_fraction: float = 0.3  # the prompt is this share of the document's characters (word boundary)
    max_new_tokens: int = 32
    batch_size: int = 8
    max_length: int = 128  # tokens per document for the mean residuals
    chat: bool = False
    diagonal: bool = False  # also steer s -> s (a sanity check: nothing to force)
    model: ModelConfig = field(default_factory=ModelConfig)
    force: bool = False

    def validate(self) -> "SteerConfig":
        from .neurons import parse_classes

        self.classes = ",".join(parse_classes(self.classes))
        require(self.mode in STEER_MODES, f"--mode must be one of {', '.join(STEER_MODES)}, got {self.mode!r}")
        require(self.positions in STEER_POSITIONS,
                f"--positions must be one of {', '.join(STEER_POSITIONS)}, got {self.positions!r}")
        require(self.neurons in NEURON_SETS, f"--neurons must be target or pair, got {self.neurons!r}")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in STEER_METHODS]
        require(not bad and bool(self.methods), f"--methods: unknown {bad or list(self.methods)}; use a comma list "
                                                f"of {', '.join(STEER_METHODS)}")
        self.strengths = _floats(self.strengths, "--strength")
        self.diffmean_strengths = _floats(self.diffmean_strengths, "--diffmean-strength")
        self.layers = tuple(self.layers) if not isinstance(self.layers, str) else tuple(self.layers.split(";"))
        if self.diffmean_layers is not None:
            try:
                self.diffmean_layers = tuple(int(x) for x in (self.diffmean_layers.split(",") if isinstance(
                    self.diffmean_layers, str) else self.diffmean_layers))
            except ValueError:
                raise LangNeuronsError(f"--diffmean-layers must be a comma list of block indices, "
                                       f"got {self.diffmean_layers!r}") from None
            require(bool(self.diffmean_layers), "--diffmean-layers is empty")
        self.control_seeds = tuple(int(s) for s in self.control_seeds)
        require(bool(self.control_seeds), "--control-seeds is empty; give e.g. 0")
        for name, lo in (("prompts", 1), ("max_new_tokens", 1), ("batch_size", 1), ("diffmean_docs", 1),
                         ("control_bins", 1), ("max_length", 2)):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= lo, f"--{name.replace('_', '-')} must be an integer >= {lo}, "
                                                            f"got {value!r}")
        require(0 < self.prompt_fraction < 1, f"--prompt-fraction must be in (0, 1), got {self.prompt_fraction}")
        for what, langs in (("--from", self.sources), ("--to", self.targets)):
            require(langs is None or len(langs) >= 1, f"{what} names no language")
        self.model.validate()
        return self

    @property
    def intervention_positions(self) -> str:
        """The positions argument of `intervene.deactivate` / `add_to_residual`."""
        return "all" if self.positions == "both" else self.positions


# --------------------------------------------------------------------------------------------
# prompts and references
# --------------------------------------------------------------------------------------------
def _cut(text: str, fraction: float) -> int:
    """Character index where the prompt ends: the first word boundary at or after ``fraction``
    of the text for a text with spaces; exactly ``fraction`` of the characters for a script
    written without spaces (zh, ja, th). At least one character stays on each side."""
    n = len(text)
    at = max(1, min(n - 1, int(round(fraction * n))))
    if text.count(" ") >= max(2, n // 40):
        nxt = text.find(" ", at)
        prev = text.rfind(" ", 0, at)
        choices = [i for i in (prev, nxt) if 0 < i < n - 1]
        if choices:
            at = min(choices, key=lambda i: abs(i - at))
    return at


def doc_text(doc: Any) -> str:
    """The text of a document: a string, a plain-text Example, or a pair read as prompt + response."""
    if isinstance(doc, str):
        return doc
    return doc.text or f"{doc.prompt or ''} {doc.response or ''}"


def steer_prompts(by_lang: Mapping[str, Sequence[Any]], n: int, fraction: float) -> dict[str, list[dict[str, str]]]:
    """Per language, the first ``n`` documents split into a prompt (the first words) and a
    continuation: ``[{"doc": i, "prompt": ..., "continuation": ...}]``. Documents are parallel
    by position (the held-out split keeps parallel corpora parallel), so document i of the
    source and of the target are translations of each other."""
    out: dict[str, list[dict[str, Any]]] = {}
    for lang, docs in by_lang.items():
        rows = []
        for i, doc in enumerate(list(docs)[:n]):
            text = " ".join(doc_text(doc).split())
            if len(text) < 2:
                continue
            at = _cut(text, fraction)
            rows.append({"doc": i, "prompt": text[:at].rstrip(), "continuation": text[at:].strip()})
        out[lang] = rows
    return out


# --------------------------------------------------------------------------------------------
# statistics the interventions set or add
# --------------------------------------------------------------------------------------------
def neuron_values(mode: str, strength: float, means: torch.Tensor, languages: Sequence[str], src: str,
                  tgt: str) -> tuple[str, float, torch.Tensor | None]:
    """(mode of `intervene.deactivate`, factor, values [L, N]) of one steering mode."""
    k_t = list(languages).index(tgt)
    if mode == "set":
        return "set", 0.0, (strength * means[k_t]).float()
    if mode == "add":
        k_s = list(languages).index(src)
        return "add", 0.0, (strength * (means[k_t] - means[k_s])).float()
    if mode == "scale":
        return "scale", float(strength), None
    raise LangNeuronsError(f"unknown steering mode {mode!r}")


@torch.no_grad()
def residual_means(model: torch.nn.Module, tokenizer: Any, texts_by_lang: Mapping[str, Sequence[str]],
                   layers: Sequence[int], *, max_length: int = 128, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Mean residual stream after each block in ``layers``: ``{lang: float64 [len(layers), H]}``
    over every real token of the language's texts except special tokens (BOS carries no language
    and, in several families, a residual of huge norm that would dominate the mean)."""
    from .arch import body_of, locate_unembedding
    from .lm import input_device

    blocks = locate_unembedding(model).layers
    body = body_of(model)  # the blocks without the LM head: no logits are needed
    for layer in layers:
        require(0 <= layer < len(blocks), f"--diffmean-layers {layer}: the model has blocks 0-{len(blocks) - 1}")
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(_m: Any, _i: Any, out: Any, layer: int = layer) -> None:
            store[layer] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        handles.append(blocks[layer].register_forward_hook(hook))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    out: dict[str, torch.Tensor] = {}
    try:
        for lang, texts in texts_by_lang.items():
            sums: torch.Tensor | None = None
            count = 0
            encs = []
            for t in texts:
                enc = tokenizer(t, truncation=True, max_length=max_length, return_special_tokens_mask=True)
                keep = [not s for s in enc["special_tokens_mask"]]
                if any(keep):
                    encs.append((list(enc["input_ids"]), keep))
            require(bool(encs), f"the mean residual of {lang} needs at least one text with a token")
            for b0 in range(0, len(encs), batch_size):
                batch = encs[b0:b0 + batch_size]
                width = max(len(ids) for ids, _ in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                att = torch.zeros((len(batch), width), dtype=torch.long)
                use = torch.zeros((len(batch), width), dtype=torch.bool)
                for i, (row, keep) in enumerate(batch):  # right padding: real tokens keep their positions
                    ids[i, :len(row)] = torch.tensor(row)
                    att[i, :len(row)] = 1
                    use[i, :len(row)] = torch.tensor(keep)
                body(input_ids=ids.to(device), attention_mask=att.to(device))
                stacked = torch.stack([store[layer][use.to(store[layer].device)].double().sum(0).cpu()
                                       for layer in layers])
                sums = stacked if sums is None else sums + stacked
                count += int(use.sum())
                store.clear()
            out[lang] = sums / count  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return out


def diffmean_vectors(means: Mapping[str, torch.Tensor], layers: Sequence[int], src: str, tgt: str,
                     strength: float) -> dict[int, torch.Tensor]:
    """{layer: strength * (mean residual of tgt - of src)} for `intervene.add_to_residual`."""
    diff = (means[tgt] - means[src]) * float(strength)
    return {int(layer): diff[i].float() for i, layer in enumerate(layers)}


# --------------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------------
def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (sacrebleu's defaults: character 6-grams, beta 2), on a 0-1 scale."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise LangNeuronsError("steering fidelity needs sacrebleu: pip install 'langneurons[steer]' "
                               "(sacrebleu==2.6.0)") from None
    return float(CHRF().sentence_score(hypothesis, [reference]).score) / 100.0


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0 (CLaS-Bench combines forcing success and fidelity so)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


@torch.no_grad()
def output_nll(model: torch.nn.Module, tokenizer: Any, gens: Sequence[Any], batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of NLL, number of tokens) of every generation's new tokens under ``model`` given its
    prompt ids: the log-probability of the true next token.

    One forward per batch, left padded with position ids from the attention mask (as
    `lm.generate` decodes), so every row's new tokens end at the last column and only the last
    ``max new tokens + 1`` positions need logits (``logits_to_keep``): on a large vocabulary the
    head over the prompt would cost more than the rest."""
    import inspect

    from .lm import input_device, pad_id

    pad = pad_id(tokenizer)
    device = input_device(model)
    params = inspect.signature(model.forward).parameters
    out: list[tuple[float, int]] = [(0.0, 0)] * len(gens)
    todo = [i for i, g in enumerate(gens) if g.token_ids]
    for b0 in range(0, len(todo), batch_size):
        idx = todo[b0:b0 + batch_size]
        seqs = [list(gens[i].prompt_ids) + list(gens[i].token_ids) for i in idx]
        width = max(len(s) for s in seqs)
        keep = max(len(gens[i].token_ids) for i in idx) + 1
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s)
            att[r, width - len(s):] = 1
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device)}
        if "position_ids" in params:
            kwargs["position_ids"] = ((att.cumsum(-1) - 1).clamp(min=0)).to(device)
        if "logits_to_keep" in params and keep < width:
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits.float()
        offset = width - logits.shape[1]  # column of logits[:, 0]
        logp = torch.log_softmax(logits, -1)
        for r, i in enumerate(idx):
            n = len(gens[i].token_ids)
            targets = ids[r, width - n:].to(logp.device)
            lp = logp[r, width - n - 1 - offset:width - 1 - offset].gather(1, targets[:, None]).sum()
            out[i] = (float(-lp), n)
    return out


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One generation call: prompts of several sources under one intervention."""

    method: str
    layers: str
    strength: float
    seed: int | None
    tgt: str
    srcs: list[str]
    n_neurons: int
    context: Callable[[int], Any] | None  # batch_context of lm.generate
    row_vectors: list[torch.Tensor] | None = None  # diffmean: the residual vector of every prompt
    resid_layer: int = 0


def _restrict(mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    keep = torch.zeros(mask.shape[0], dtype=torch.bool)
    keep[list(layers)] = True
    return mask & keep.view(-1, 1)


def steer_grid(model: torch.nn.Module, tokenizer: Any, nmap: Any, means: torch.Tensor, languages: Sequence[str],
               prompts: Mapping[str, Sequence[dict[str, Any]]], cfg: SteerConfig, *, activity: torch.Tensor | None = None,
               resid_means: Mapping[str, torch.Tensor] | None = None, resid_layers: Sequence[int] = (),
               pairs: Sequence[tuple[str, str]],
               strengths: Mapping[str, Sequence[tuple[float, str]]], detect_langs: Sequence[str] | None = None,
               generations: list[dict[str, Any]] | None = None, echo: Callable[[str], None] = lambda _: None) -> Any:
    """The steering table (a pandas DataFrame with `COLUMNS`) for the ``pairs`` (src, tgt).

    ``means``: [K, L, N] mean activations of ``languages`` (`ActivationStats.means`);
    ``activity``: [L, N] for the matched random control; ``resid_means``: `residual_means` per
    language for diffmean, of the blocks ``resid_layers``; ``strengths``: per method a list of (strength, layers name) to run
    (layers name of `layer_ranges`, or the block index for diffmean)."""
    import pandas as pd

    from .arch import locate_activations
    from .evaluate import detect_language
    from .intervene import deactivate, matched_control, random_control
    from .lm import GenerateConfig, generate

    sites = locate_activations(model, cfg.model.act_path)
    L = sites.num_layers
    ranges = dict(layer_ranges(list(cfg.layers) + [n for m in ("neurons", "random", *EXPERT_METHODS)
                                                   for _, n in strengths.get(m, []) if n != "all"], L))
    pos = cfg.intervention_positions
    classes = tuple(cfg.classes.split(","))
    gcfg = GenerateConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, chat=cfg.chat).validate()

    def neuron_mask(src: str, tgt: str) -> torch.Tensor:
        mask = nmap.language_mask(tgt, classes)
        if cfg.neurons == "pair":
            mask = mask | nmap.language_mask(src, classes)
        return mask

    def neuron_context(mask: torch.Tensor, src: str, tgt: str, strength: float) -> Callable[[int], Any]:
        mode, factor, values = neuron_values(cfg.mode, strength, means, languages, src, tgt)
        return lambda width: _checked(deactivate(model, mask, mode=mode, factor=factor, values=values,  # type: ignore[arg-type]
                                                 positions=pos, prompt_length=width, sites=sites))

    emap = None
    if any(m in strengths for m in EXPERT_METHODS):
        from .moe import experts_map

        emap = experts_map(nmap)

    def experts_context(force: torch.Tensor, remove: torch.Tensor | None, strength: float) -> Callable[[int], Any]:
        from .moe import route_experts

        return lambda width: _checked(route_experts(model, force=force, remove=remove, strength=strength,
                                                    positions=pos, prompt_length=width))

    depends_on_src = cfg.mode == "add" or cfg.neurons == "pair"
    targets = list(dict.fromkeys(t for _, t in pairs))
    jobs: list[_Job] = []
    for tgt in targets:
        srcs = [s for s, t in pairs if t == tgt]
        groups = [[s] for s in srcs] if depends_on_src else [srcs]
        for method in ("neurons", "random"):
            for strength, lname in strengths.get(method, []):
                layers = ranges[lname]
                seeds: list[int | None] = [None] if method == "neurons" else list(cfg.control_seeds)
                for seed in seeds:
                    for group in groups:
                        mask = _restrict(neuron_mask(group[0], tgt), layers)
                        if method == "random":
                            if activity is None:
                                raise LangNeuronsError("the random control needs the run's stats (activity)")
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                mask = matched_control(mask, activity, _seed(seed, group[0], tgt),
                                                       exclude=mask | nmap.selected.to(torch.bool),
                                                       bins=cfg.control_bins)
                        jobs.append(_Job(method, lname, strength, seed, tgt, group, int(mask.sum()),
                                         neuron_context(mask, group[0], tgt, strength) if mask.any() else None))
        for method in EXPERT_METHODS:
            for strength, lname in strengths.get(method, []):
                layers = ranges[lname]
                seeds = [None] if method == "experts" else list(cfg.control_seeds)
                for seed in seeds:
                    for group in groups:
                        force = _restrict(emap.language_mask(tgt, classes), layers)  # type: ignore[union-attr]
                        remove = (_restrict(emap.language_mask(group[0], classes), layers)  # type: ignore[union-attr]
                                  if cfg.neurons == "pair" else None)
                        if method == "random-experts":
                            taken = emap.selected.to(torch.bool)  # type: ignore[union-attr]
                            force = random_control(force, _seed(seed, group[0], tgt), exclude=force | taken,
                                                   strict=False)
                            if remove is not None:
                                remove = random_control(remove, _seed(seed, tgt, group[0]),
                                                        exclude=remove | taken | force, strict=False)
                        jobs.append(_Job(method, lname, strength, seed, tgt, group, int(force.sum()),
                                         experts_context(force, remove, strength) if force.any() else None))
        for strength, lname in strengths.get("diffmean", []):
            if resid_means is None:
                raise LangNeuronsError("diffmean needs the mean residuals (residual_means)")
            layer = int(lname)
            require(layer in list(resid_layers), f"diffmean layer {layer} has no mean residuals")
            row = list(resid_layers).index(layer)
            # one call per target: every source's prompts in one batch, each row with its own vector
            by_src = {src: diffmean_vectors({k: v[row:row + 1] for k, v in resid_means.items()}, [layer], src, tgt,
                                            strength)[layer] for src in srcs}
            jobs.append(_Job("diffmean", lname, strength, None, tgt, list(srcs), 0, None,
                             row_vectors=[by_src[s] for s in srcs for _ in prompts[s]], resid_layer=layer))
    # the unsteered outputs, once per source
    sources = list(dict.fromkeys(s for s, _ in pairs))
    echo(f"[steer] {len(jobs)} steered generation calls + {len(sources)} unsteered, "
         f"{sum(len(prompts[s]) for j in jobs for s in j.srcs)} steered prompts x {cfg.max_new_tokens} tokens")
    base: dict[str, list[Any]] = {}
    for src in sources:
        texts = [p["prompt"] for p in prompts[src]]
        base[src] = generate(model, tokenizer, texts, gcfg)
    base_nll = {src: output_nll(model, tokenizer, gens, cfg.batch_size) for src, gens in base.items()}

    rows: list[dict[str, Any]] = []

    def score(method: str, lname: str, strength: float, seed: int | None, src: str, tgt: str, n_neurons: int,
              gens: Sequence[Any], nlls: Sequence[tuple[float, int]]) -> None:
        refs = {p["doc"]: p["continuation"] for p in prompts[tgt]}
        ok, fid, texts = [], [], []
        for p, g in zip(prompts[src], gens):
            detected = detect_language(g.text, detect_langs)
            ref = refs.get(p["doc"])
            ok.append(detected == tgt)
            fid.append(chrf(g.text, ref) if ref is not None else math.nan)
            texts.append(len(g.text))
            if generations is not None:
                generations.append({"method": method, "mode": cfg.mode if method in ("neurons", "random") else None,
                                    "layers": lname, "strength": strength, "seed": seed, "src": src, "tgt": tgt,
                                    "doc": p["doc"], "prompt": p["prompt"], "output": g.text, "detected": detected,
                                    "reference": ref, "chrf": fid[-1], "stop": g.stop})
        tot = sum(x for x, _ in nlls)
        n = sum(k for _, k in nlls)
        btot = sum(x for x, _ in base_nll[src])
        bn = sum(k for _, k in base_nll[src])
        nll = tot / n if n else math.nan
        bnll = btot / bn if bn else math.nan
        success = sum(ok) / len(ok) if ok else math.nan
        valid = [f for f in fid if math.isfinite(f)]
        fidelity = sum(valid) / len(valid) if valid else math.nan
        patched = method in ("neurons", "random", *EXPERT_METHODS)
        rows.append({"method": method, "mode": cfg.mode if method in ("neurons", "random") else "force"
                     if method in EXPERT_METHODS else "residual-add" if method == "diffmean" else "none",
                     "classes": cfg.classes if patched else "", "neurons": cfg.neurons if patched else "",
                     "positions": cfg.positions if method != "none" else "", "layers": lname,
                     "strength": float(strength), "seed": seed, "src": src, "tgt": tgt, "n_prompts": len(ok),
                     "n_neurons": n_neurons, "success": success, "chrf": fidelity,
                     "harmonic": harmonic_mean(success, fidelity), "nll": nll,
                     "ppl": math.exp(nll) if math.isfinite(nll) else math.nan, "base_nll": bnll,
                     "fluency_cost": nll - bnll, "n_tokens": n,
                     "mean_chars": sum(texts) / len(texts) if texts else math.nan})

    for src, tgt in pairs:
        score("none", "", 0.0, None, src, tgt, 0, base[src], base_nll[src])
    for j, job in enumerate(jobs):
        texts = [p["prompt"] for s in job.srcs for p in prompts[s]]
        if job.row_vectors is not None:
            gens = _generate_per_row(model, tokenizer, texts, gcfg, job.resid_layer, job.row_vectors, pos)
        else:
            gens = generate(model, tokenizer, texts, gcfg, batch_context=job.context)
        nlls = output_nll(model, tokenizer, gens, cfg.batch_size)
        at = 0
        for src in job.srcs:
            k = len(prompts[src])
            score(job.method, job.layers, job.strength, job.seed, src, job.tgt, job.n_neurons, gens[at:at + k],
                  nlls[at:at + k])
            at += k
        if (j + 1) % 10 == 0:
            echo(f"[steer] {j + 1}/{len(jobs)} generation calls done")
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "setting"])
    df["seed"] = df["seed"].astype("Int64")
    return df


def _generate_per_row(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], gcfg: Any, layer: int,
                      vectors: Sequence[torch.Tensor], positions: str) -> list[Any]:
    """`lm.generate` with a residual vector of its own for every prompt (batched: ``on_batch``
    says which prompts a batch's rows are, and the batch's context adds a [rows, H] tensor)."""
    from .intervene import add_to_residual
    from .lm import generate

    rows: list[int] = []

    def on_batch(which: list[int]) -> None:
        rows[:] = which

    def context(width: int) -> Any:
        per_row = torch.stack([vectors[i] for i in rows])
        return _checked(add_to_residual(model, {layer: per_row}, positions=positions, prompt_length=width))

    return generate(model, tokenizer, texts, gcfg, on_batch=on_batch, batch_context=context)


def _seed(seed: int | None, src: str, tgt: str) -> int:
    from .lm import derive_seed

    return derive_seed("steer-control", int(seed or 0), src, tgt)


class _checked:
    """A context manager wrapper that fails loudly when the intervention's hooks never ran."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.iv: Any = None

    def __enter__(self) -> Any:
        self.iv = self.ctx.__enter__()
        return self.iv

    def __exit__(self, *exc: Any) -> Any:
        out = self.ctx.__exit__(*exc)
        if exc[0] is None:
            self.iv.check_fired()
        return out


def best_settings(df: Any, method: str, **match: Any) -> tuple[float, str] | None:
    """The (strength, layers) of ``method`` with the highest harmonic mean of success and
    fidelity averaged over its (src, tgt) pairs (and control seeds), among rows matching
    ``match`` (e.g. mode="set"); None when there is no row."""
    if df is None or not len(df):
        return None
    g = df[df["method"] == method]
    for k, v in match.items():
        if k in g.columns and v is not None:
            g = g[g[k] == v]
    if not len(g):
        return None
    score = g.groupby(["strength", "layers"])["harmonic"].mean().sort_index()
    strength, layers = score.idxmax()
    return float(strength), str(layers)


def merge_steer_rows(old: Any, new: Any) -> Any:
    """Old rows of the same setting not replaced by a new row with the same `ROW_KEY`."""
    import pandas as pd

    if old is None or not len(old):
        return new.reset_index(drop=True)
    setting = str(new["setting"].iloc[0]) if len(new) else None
    keep = old[old["setting"].astype(str) == setting] if "setting" in old.columns else old.iloc[0:0]

    def keys(df: Any) -> list[str]:
        return ["\x1f".join(map(str, t)) for t in df[list(ROW_KEY)].itertuples(index=False)]

    replaced = set(keys(new))
    keep = keep[[k not in replaced for k in keys(keep)]] if len(keep) else keep
    if not len(keep):
        return new.reset_index(drop=True)
    out = pd.concat([keep, new], ignore_index=True)
    out["seed"] = out["seed"].astype("Int64")
    return out


def summary_table(df: Any) -> Any:
    """Per method, layers and strength: mean success, chrF, harmonic, fluency cost over the pairs."""
    agg = (df.groupby(["method", "mode", "layers", "strength"], dropna=False)
           .agg(success=("success", "mean"), chrf=("chrf", "mean"), harmonic=("harmonic", "mean"),
                fluency_cost=("fluency_cost", "mean"), pairs=("tgt", "size"), prompts=("n_prompts", "sum"))
           .reset_index())
    order = {m: i for i, m in enumerate(("none", *STEER_METHODS))}
    return agg.sort_values(["method", "layers", "strength"], key=lambda s: s.map(order) if s.name == "method" else s)


def iter_pairs(sources: Sequence[str], targets: Sequence[str], diagonal: bool) -> Iterator[tuple[str, str]]:
    for s in sources:
        for t in targets:
            if diagonal or s != t:
                yield s, t


def config_json(cfg: SteerConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("force", None)
    return json.loads(json.dumps(d, default=str))


def read_steer(run_dir: str | Path) -> Any:
    import pandas as pd

    path = Path(run_dir) / STEER_FILE
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise LangNeuronsError(f"{path} cannot be read ({type(exc).__name__}); delete it to recompute") from None
