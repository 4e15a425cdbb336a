"""Mixtures of experts: recording, identification and interventions for expert neurons.

A MoE layer's MLP neurons live inside experts, and a token reaches only the experts its router
picks (top-k), so the dense recipe (p = positives / all tokens) would call a neuron of a rarely
chosen expert "silent". Here (docs/moe.md has the full story):

* **Neuron index** (layer, expert, neuron), flattened per layer expert-major: column
  ``n = e·I + i`` for routed expert e, then the shared expert's S neurons at ``E·I + j``
  (Qwen2-MoE); `arch.ExpertSites` describes a model. Stats, neuron maps and masks keep the
  dense [L, N] shapes with N = E·I + S, so merge, anatomy and the ablation plumbing work as is.
* **Recording** (`record_moe`, dispatched to by `record.record`): per language, for every expert
  neuron the positive activations among the tokens routed to its expert, and per layer and
  expert ``moe_routed`` (how many counted tokens chose the expert among their top-k) and
  ``moe_mass`` (the summed router probability, softmax over all experts). p = positive /
  routed (the shared expert sees every token: its denominator is ``tokens``). All counts are
  saved as extra tensors of the stats file (`stats.LanguageStats.extra`), so merging is
  addition and the data-parallel all_reduce is one SUM, exact like the dense counts.
* **How experts are run**: while recording or patching neurons, each MoE layer's experts run
  langneurons' eager loop (`_ExpertHub`: per hit expert, ``act_fn(x W_gate) * (x W_up)``, then
  down projection and router weight -- the formula of the installed transformers' eager
  experts), which calls the callbacks with the expert index, the routed token rows and the
  activation. The default fused/grouped kernels never expose per-expert activations.
* **Identification** (`identify_moe`): an expert neuron is *observed* in language k iff its
  expert received at least ``min_routed`` of k's counted tokens; below that its p is not
  estimated (never taken as 0). Only neurons observed in all K languages are scored and
  classified (the entropy / λ selectors of `identify`, on those neurons, τ from all observed
  probabilities); the others get class ``none`` and their observed languages in the map's
  ``observed`` extra. Language-specific *experts* come from the routing shares r[k, l, e] =
  routed / tokens with the same selector machinery over [L, E] (`identify_experts`).
* **Interventions**: `deactivate_neurons` (the shape of `intervene.deactivate`; called by it for
  MoE models) zeroes / scales / sets expert neurons; `mask_experts` removes whole experts by
  setting their router logit to -inf, so the router picks the next best experts.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .arch import ExpertSites, is_moe, locate_experts
from .errors import LangNeuronsError, NeuronMapError, StatsError
from .intervene import Intervention, MaskLike, as_indices
from .neurons import UNASSIGNED, NeuronMap, class_codes
from .stats import ActivationStats, LanguageStats

log = logging.getLogger(__name__)

__all__ = ["is_moe", "is_moe_stats", "record_moe", "count_moe", "check_moe_stats", "neuron_denominators",
           "neuron_probs", "routing_shares", "MoeIdentifyConfig", "identify_moe", "identify_experts",
           "experts_map", "deactivate_neurons", "mask_experts", "expert_neuron_mask", "moe_summary", "ROUTED", "MASS",
           "DEFAULT_MIN_ROUTED"]

#: names of the extra tensors in a MoE stats file (`LanguageStats.extra`)
ROUTED, MASS = "moe_routed", "moe_mass"
#: below this many routed tokens a language does not observe an expert's neurons (p resolution 5%)
DEFAULT_MIN_ROUTED = 20


# -- running the experts ourselves -------------------------------------------------------------
class _ExpertHub:
    """Replaces one layer's fused experts forward by the eager per-expert loop while any
    callback is attached, and restores the module's own forward when the last one leaves.

    Callbacks are objects with ``start(layer, rows)`` (once per forward, ``rows`` = tokens of
    the flattened batch) and ``expert(layer, e, token_idx, act) -> act or None``; a returned
    tensor replaces the activation (interventions), in attachment order."""

    def __init__(self, experts: nn.Module, layer: int):
        self.experts, self.layer = experts, layer
        self.callbacks: list[Any] = []
        self.saved = experts.__dict__.get("forward")

    def attach(self, cb: Any) -> None:
        if not self.callbacks:
            self.experts.forward = self.forward  # instance attribute: nn.Module.__call__ uses it
        self.callbacks.append(cb)

    def detach(self, cb: Any) -> None:
        self.callbacks.remove(cb)
        if not self.callbacks:
            if self.saved is None:
                self.experts.__dict__.pop("forward", None)
            else:
                self.experts.forward = self.saved

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *_: Any, **__: Any) -> torch.Tensor:
        ex = self.experts
        for cb in self.callbacks:
            cb.start(self.layer, int(hidden_states.shape[0]))
        out = torch.zeros_like(hidden_states)
        num_experts = int(ex.gate_up_proj.shape[0])
        hit = torch.unique(top_k_index).tolist()  # ascending, as the eager loop of transformers
        for e in hit:
            if e >= num_experts:  # expert-parallel sentinel: not on this device
                continue
            top_k_pos, token_idx = torch.where((top_k_index == e).T)  # the eager order: top-k slot major
            x = hidden_states[token_idx]
            gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
            act = ex.act_fn(gate)
            for cb in self.callbacks:
                new = cb.expert(self.layer, e, token_idx, act)
                if new is not None:
                    act = new
            h = F.linear(act * up, ex.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


_HUBS: "weakref.WeakKeyDictionary[nn.Module, _ExpertHub]" = weakref.WeakKeyDictionary()


@contextmanager
def _attached(sites: ExpertSites, cb: Any, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Run the experts of ``layers`` (default all) through the eager loop with ``cb`` attached."""
    chosen = range(sites.num_layers) if layers is None else layers
    hubs = []
    try:
        for layer in chosen:
            mod = sites.modules[layer]
            hub = _HUBS.get(mod)
            if hub is None:
                hub = _HUBS[mod] = _ExpertHub(mod, layer)
            hub.attach(cb)
            hubs.append(hub)
        yield
    finally:
        for hub in hubs:
            hub.detach(cb)


def _probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The router's softmax over all experts, in float32 (as every supported router computes it)."""
    return torch.softmax(logits.float(), dim=-1)


# -- recording ---------------------------------------------------------------------------------
class _MoeCounter:
    """Counts, for the counted rows of each batch: per expert neuron the positives among routed
    tokens, per expert the routed tokens and router mass, per shared neuron the positives."""

    def __init__(self, sites: ExpertSites, keep_sums: bool):
        self.sites, self.keep_sums = sites, keep_sums
        L = sites.num_layers
        self.pos: list[torch.Tensor | None] = [None] * L  # [E, I] per layer, on the layer's device
        self.sums: list[torch.Tensor | None] = [None] * L
        self.seen: list[torch.Tensor | None] = [None] * L  # [E]: counted rows the expert loop saw
        self.routed: list[torch.Tensor | None] = [None] * L  # [E]
        self.mass: list[torch.Tensor | None] = [None] * L  # [E] float64
        self.shared_pos: list[torch.Tensor | None] = [None] * L
        self.shared_sums: list[torch.Tensor | None] = [None] * L
        self.router_calls = [0] * L
        self.expert_calls = [0] * L
        self.shared_calls = [0] * L
        self.rows: torch.Tensor | None = None
        self.total_rows = 0
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_batch(self, rows: torch.Tensor, total_rows: int) -> None:
        self.rows, self.total_rows, self._on = rows, total_rows, {}
        L = self.sites.num_layers
        self.router_calls, self.expert_calls, self.shared_calls = [0] * L, [0] * L, [0] * L

    def _rows(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._on.get(dev)
        if got is None:
            assert self.rows is not None
            rows = self.rows.to(dev)
            mask = torch.zeros(self.total_rows, dtype=torch.bool, device=dev)
            mask[rows] = True
            got = self._on[dev] = (rows, mask)
        return got

    def _zeros(self, layer: int, dev: torch.device) -> None:
        s = self.sites
        E, I = s.num_experts, s.expert_size
        self.pos[layer] = torch.zeros(E, I, dtype=torch.int64, device=dev)
        self.seen[layer] = torch.zeros(E, dtype=torch.int64, device=dev)
        if self.keep_sums:
            self.sums[layer] = torch.zeros(E, I, dtype=torch.float64, device=dev)

    # router forward hook (output: logits, top-k weights, top-k indices)
    def route(self, layer: int, out: Any) -> None:
        logits, _, indices = out
        dev = logits.device
        rows, _ = self._rows(dev)
        E = self.sites.num_experts
        if self.routed[layer] is None:
            self.routed[layer] = torch.zeros(E, dtype=torch.int64, device=dev)
            self.mass[layer] = torch.zeros(E, dtype=torch.float64, device=dev)
        chosen = indices.reshape(-1, indices.shape[-1]).index_select(0, rows).reshape(-1)
        self.routed[layer] += torch.bincount(chosen, minlength=E)[:E]  # type: ignore[operator]
        probs = _probs_from_logits(logits.reshape(-1, E).index_select(0, rows))
        self.mass[layer] += probs.sum(0, dtype=torch.float64)  # type: ignore[operator]
        self.router_calls[layer] += 1

    def start(self, layer: int, rows: int) -> None:
        if rows != self.total_rows:
            raise LangNeuronsError(f"MoE layer {layer} ran on {rows} token rows, not the batch's {self.total_rows}; "
                                   "this model lays out the experts' input differently and cannot be counted safely")
        self.expert_calls[layer] += 1

    def expert(self, layer: int, e: int, token_idx: torch.Tensor, act: torch.Tensor) -> None:
        dev = act.device
        if self.pos[layer] is None:
            self._zeros(layer, dev)
        _, mask = self._rows(dev)
        a = act[mask[token_idx]]
        self.pos[layer][e] += (a > 0).sum(0)  # type: ignore[index]
        self.seen[layer][e] += a.shape[0]  # type: ignore[index]
        if self.keep_sums:
            self.sums[layer][e] += a.sum(0, dtype=torch.float64)  # type: ignore[index]
        return None

    def shared(self, layer: int, out: torch.Tensor) -> None:
        dev = out.device
        rows, _ = self._rows(dev)
        flat = out.reshape(-1, out.shape[-1])
        if flat.shape[0] != self.total_rows:
            raise LangNeuronsError(f"the shared expert of layer {layer} has {flat.shape[0]} rows, not the batch's "
                                   f"{self.total_rows}; cannot be counted safely")
        a = flat.index_select(0, rows)
        if self.shared_pos[layer] is None:
            self.shared_pos[layer] = torch.zeros(a.shape[-1], dtype=torch.int64, device=dev)
            if self.keep_sums:
                self.shared_sums[layer] = torch.zeros(a.shape[-1], dtype=torch.float64, device=dev)
        self.shared_pos[layer] += (a > 0).sum(0)  # type: ignore[operator]
        if self.keep_sums:
            self.shared_sums[layer] += a.sum(0, dtype=torch.float64)  # type: ignore[operator]
        self.shared_calls[layer] += 1
        return None

    def verify(self) -> None:
        """Every router, expert loop and shared expert ran exactly once in this forward."""
        for what, calls in (("router", self.router_calls), ("experts", self.expert_calls),
                            ("shared expert", self.shared_calls if self.sites.shared_acts else None)):
            if calls is None:
                continue
            bad = [layer for layer, c in enumerate(calls) if c != 1]
            if bad:
                raise LangNeuronsError(f"the MoE {what} hooks of layers {bad[:5]} ran {[calls[b] for b in bad[:5]]} "
                                       "times in one forward pass (expected once): torch.compile or a custom kernel "
                                       "bypasses them; disable compilation")

    def collect(self, lang: str, tokens: int) -> LanguageStats:
        s = self.sites
        L, E, I, S = s.num_layers, s.num_experts, s.expert_size, s.shared_size
        pos = torch.zeros(L, E * I + S, dtype=torch.int64)
        sums = torch.zeros(L, E * I + S, dtype=torch.float64) if self.keep_sums else None
        routed = torch.zeros(L, E, dtype=torch.int64)
        mass = torch.zeros(L, E, dtype=torch.float64)
        for layer in range(L):
            if self.routed[layer] is not None:
                routed[layer] = self.routed[layer].cpu()  # type: ignore[union-attr]
                mass[layer] = self.mass[layer].cpu()  # type: ignore[union-attr]
            seen = self.seen[layer].cpu() if self.seen[layer] is not None else torch.zeros(E, dtype=torch.int64)  # type: ignore[union-attr]
            if not torch.equal(seen, routed[layer]):
                raise LangNeuronsError(f"MoE layer {layer}: the experts saw {seen.tolist()} counted tokens but the router "
                                       f"sent {routed[layer].tolist()}; something between router and experts changed "
                                       "the routing (another hook?); the counts would be wrong")
            if self.pos[layer] is not None:
                pos[layer, :E * I] = self.pos[layer].reshape(-1).cpu()  # type: ignore[union-attr]
                if sums is not None:
                    sums[layer, :E * I] = self.sums[layer].reshape(-1).cpu()  # type: ignore[union-attr]
            if S and self.shared_pos[layer] is not None:
                pos[layer, E * I:] = self.shared_pos[layer].cpu()  # type: ignore[union-attr]
                if sums is not None:
                    sums[layer, E * I:] = self.shared_sums[layer].cpu()  # type: ignore[union-attr]
        return LanguageStats(lang, pos, int(tokens), sums, {}, extra={ROUTED: routed, MASS: mass})


@contextmanager
def _counting(sites: ExpertSites, counter: _MoeCounter) -> Iterator[None]:
    handles = []
    try:
        for layer, router in enumerate(sites.routers):
            handles.append(router.register_forward_hook(
                lambda _m, _i, out, layer=layer: counter.route(layer, out)))
        for layer, act in enumerate(sites.shared_acts or []):
            handles.append(act.register_forward_hook(lambda _m, _i, out, layer=layer: counter.shared(layer, out)))
        with _attached(sites, counter):
            yield
    finally:
        for h in handles:
            h.remove()


def _batch_tensors(batch: Sequence[Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and counted mask (as the dense recorder builds them)."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    counted = torch.zeros((len(batch), T), dtype=torch.bool)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        attn[b, :n] = 1
        counted[b, :n] = torch.tensor(e.counted)
    return ids, attn, counted


def count_moe(recorder: Any, examples: Sequence[Any], *, lang: str = "", progress: bool = False) -> LanguageStats:
    """Count one language's examples with a `record.Recorder` built on `ExpertSites` (its
    encoding, token roles, budget, shard and rank split are the dense recorder's). Under a
    process group the result is the SUM over ranks (identical on every rank)."""
    sites: ExpertSites = recorder.sites
    encoded = recorder.encode(examples, lang)
    batches = recorder.batches(encoded)
    counter = _MoeCounter(sites, recorder.config.keep_sums)
    tokens = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(sum(e.counted) for e in encoded), desc=f"record {lang} (MoE)", unit="tok",
               unit_scale=True, disable=not progress, leave=False)
    try:
        with _counting(sites, counter), torch.inference_mode():
            for batch in batches:
                ids, attn, counted = _batch_tensors(batch, recorder.pad_id)
                rows = counted.reshape(-1).nonzero().squeeze(1)
                counter.set_batch(rows.to(recorder.device), counted.numel())
                recorder.body(input_ids=ids.to(recorder.device), attention_mask=attn.to(recorder.device),
                              use_cache=False)
                counter.verify()
                n = int(counted.sum())
                tokens += n
                bar.update(n)
    finally:
        bar.close()
    return _all_reduce(counter.collect(lang, tokens))


def _all_reduce(part: LanguageStats) -> LanguageStats:
    """One SUM of the int64 counts and one of the float64 sums: exact for the counts."""
    rank, world = distributed.rank_world()
    if world == 1:
        return part
    routed, mass = part.extra[ROUTED], part.extra[MASS]
    ints = torch.cat([torch.tensor([part.tokens], dtype=torch.int64), part.positive.reshape(-1), routed.reshape(-1)])
    floats = torch.cat([mass.reshape(-1)] + ([part.sums.reshape(-1)] if part.sums is not None else []))
    ri, rf = distributed.all_reduce_sum([ints, floats])
    n_pos = part.positive.numel()
    pos = ri[1:1 + n_pos].reshape(part.positive.shape)
    out = LanguageStats(part.lang, pos, int(ri[0]), None, {})
    if part.sums is not None:
        out.sums = rf[mass.numel():].reshape(part.sums.shape)
    out.extra = {ROUTED: ri[1 + n_pos:].reshape(routed.shape), MASS: rf[:mass.numel()].reshape(mass.shape)}
    return out


def sites_meta(sites: ExpertSites) -> dict[str, Any]:
    """What a MoE stats file says about the neuron index (written to its metadata as ``moe``)."""
    return {"num_experts": sites.num_experts, "expert_size": sites.expert_size, "shared_size": sites.shared_size,
            "top_k": sites.top_k, "normalize_topk": sites.normalize_topk,
            "layout": "n = e*expert_size + i for routed expert e; shared expert at num_experts*expert_size + j"}


def record_moe(model: nn.Module, tokenizer: Any, corpus: Any, out: str | Path, config: Any = None, *,
               model_id: str = "", model_fingerprint: str | None = None, force: bool = False, progress: bool = True,
               redo_stale: bool = False, by: str = "record") -> ActivationStats:
    """`record.record` for a mixture of experts (it dispatches here): every language of ``corpus``
    into the run directory ``out``, finished languages skipped (resume is per language: no
    partial flushes inside a language), data parallel under torchrun like the dense recorder.
    Per-bucket counts are not kept (resampling would need per-expert denominators per bucket)."""
    from .record import RecordConfig, Recorder, model_meta, resume_key, versions
    from .runs import RunDir
    from .stage import commit_stage
    from .stats import read_manifest_checked

    config = replace(config or RecordConfig(), buckets=0).validate()
    if config.act_path is not None:
        raise LangNeuronsError("--mlp-act-path does not apply to a mixture of experts (its experts are found by "
                               "family); drop it")
    t_start = time.perf_counter()
    sites = locate_experts(model)
    recorder = Recorder(model, tokenizer, config, sites=sites)
    run = RunDir(out)
    rank, world = distributed.init_from_env(str(recorder.device))
    base_meta = {
        **model_meta(model, sites, model_id or getattr(model.config, "_name_or_path", ""), model_fingerprint),
        "scope": config.scope, "include_special": config.include_special,
        "record_config": config.fingerprint_fields(),
        "shard": None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}",
        "versions": versions(), "seed": config.seed, "buckets": 0, "moe": sites_meta(sites),
    }
    torch.manual_seed(config.seed)

    from .record import check_run_dir

    distributed.agree(lambda: check_run_dir(run, base_meta["model_fingerprint"], force))
    parts: list[LanguageStats] = []
    speed = [0, 0.0]
    for lang in corpus.languages:
        path = run.stats_path(lang)
        meta = dict(base_meta, corpus_fingerprint=corpus.fingerprint(lang), corpus=corpus.source)

        def finished(path: Path = path, meta: dict = meta) -> LanguageStats | None:
            if not path.exists() or force:
                return None
            checksums = read_manifest_checked(run).get("checksums", {})
            prev = LanguageStats.load(path, checksums.get(f"stats/{path.stem}.safetensors"))
            if resume_key(prev.meta) == resume_key(meta) and ROUTED in prev.extra:
                return prev
            if redo_stale:
                log.warning("%s: recorded with other settings; recording it again", path.stem)
                return None
            raise StatsError(f"{path} was recorded with other settings (model, scope, corpus or options); "
                             "use another --out, or --force to overwrite")

        prev = distributed.agree(finished)
        if prev is not None:
            parts.append(prev)
            continue
        t_lang = time.perf_counter()
        stats = count_moe(recorder, corpus.by_lang[lang], lang=lang, progress=progress and rank == 0)
        speed[0] += stats.tokens
        speed[1] += time.perf_counter() - t_lang
        stats.meta = meta
        check_moe_stats(stats)
        if rank == 0:
            try:
                run.write_language_stats(stats)
            except OSError as exc:
                raise StatsError(f"cannot write {path} ({exc.strerror or exc}); check free space and permissions, "
                                 "then run again to resume") from None
        distributed.barrier()
        parts.append(stats)
    result = ActivationStats.stack(parts)
    if rank == 0:
        run.update_manifest({
            "languages": list(corpus.languages),
            "model": {k: base_meta[k] for k in ("model", "model_fingerprint", "architecture", "family", "hook_point",
                                                "num_layers", "num_neurons", "dtype", "revision", "moe")},
            "versions": base_meta["versions"],
        })
        tps = speed[0] / speed[1] if speed[1] > 0 and speed[0] else None
        inputs = {"languages": {p.lang: resume_key(p.meta) for p in parts}}
        section = {"scope": config.scope, "include_special": config.include_special, "corpus": corpus.source,
                   "config": config.fingerprint_fields(), "tokens": {p.lang: p.tokens for p in parts},
                   "buckets": {p.lang: 0 for p in parts}, "shard": base_meta["shard"], "processes": world,
                   "moe": sites_meta(sites),
                   "tokens_per_second": round(tps, 1) if tps else run.stage_result("record").get("tokens_per_second")}
        commit_stage(run, "record", inputs, [run.stats_path(p.lang) for p in parts], section,
                     time.perf_counter() - t_start, by=by, stage_versions=base_meta["versions"])
    distributed.barrier()
    return result


# -- the numbers: denominators, probabilities, shares ------------------------------------------
def is_moe_stats(stats: Any) -> bool:
    """True for stats recorded from a mixture of experts (they carry routed-token counts)."""
    return ROUTED in getattr(stats, "extra", {})


def _layout(stats: Any) -> tuple[int, int, int]:
    """(E, I, S) of MoE stats, from the routed counts' shape and the metadata."""
    if not is_moe_stats(stats):
        raise StatsError("these stats carry no routed-token counts (moe_routed); they were not recorded from a "
                         "mixture of experts")
    E = int(stats.extra[ROUTED].shape[-1])
    info = stats.meta.get("moe") or {}
    N = int(stats.positive.shape[-1])
    I = int(info.get("expert_size", N // E))
    S = N - E * I
    if I < 1 or S < 0 or int(info.get("num_experts", E)) != E:
        raise StatsError(f"MoE stats metadata ({info}) does not fit {N} neurons and {E} experts; the stats are damaged")
    return E, I, S


def neuron_denominators(stats: ActivationStats | LanguageStats) -> torch.Tensor:
    """int64 [..., L, N]: the tokens each neuron could fire on -- its expert's routed tokens
    (repeated over the expert's I neurons), then ``tokens`` for the shared expert's S neurons."""
    E, I, S = _layout(stats)
    routed = stats.extra[ROUTED].to(torch.int64)
    per = routed.repeat_interleave(I, dim=-1)
    if not S:
        return per
    tokens = torch.as_tensor(stats.tokens, dtype=torch.int64).reshape(*routed.shape[:-2], 1, 1)
    shared = tokens.expand(*routed.shape[:-1], S)
    return torch.cat([per, shared], dim=-1)


def check_moe_stats(stats: ActivationStats | LanguageStats) -> None:
    """The invariants of MoE counts: a neuron fires at most on its expert's routed tokens, and
    every counted token chose exactly top_k experts per layer (sum_e routed = top_k · tokens)."""
    denom = neuron_denominators(stats)
    if bool((stats.positive.to(torch.int64) > denom).any()):
        raise StatsError("MoE stats: some expert neuron is positive on more tokens than its expert received; "
                         "the stats are inconsistent")
    top_k = (stats.meta.get("moe") or {}).get("top_k")
    if top_k:
        routed = stats.extra[ROUTED].to(torch.int64).sum(-1)
        tokens = torch.as_tensor(stats.tokens, dtype=torch.int64).reshape(*routed.shape[:-1], 1)
        if not torch.equal(routed, tokens.expand_as(routed) * int(top_k)):
            raise StatsError(f"MoE stats: the routed-token counts do not add up to top_k ({top_k}) x tokens per layer; "
                             "the stats are inconsistent")


def neuron_probs(stats: ActivationStats, min_routed: int = DEFAULT_MIN_ROUTED) -> tuple[torch.Tensor, torch.Tensor]:
    """(p float32 [K, L, N], observed bool [K, L, N]): p = positive / routed tokens of the
    neuron's expert (float32 arithmetic as `identify.activation_probs`), defined only where
    the language sent at least ``min_routed`` tokens to the expert; 0 where unobserved (read
    ``observed`` -- the 0 is a placeholder, never a measurement)."""
    if min_routed < 1:
        raise LangNeuronsError(f"min_routed must be >= 1, got {min_routed}")
    denom = neuron_denominators(stats)
    observed = denom >= int(min_routed)
    p = stats.positive.to(torch.float32) / denom.clamp(min=1).to(torch.float32)
    return p.masked_fill(~observed, 0.0), observed


def routing_shares(stats: ActivationStats, source: str = "routed") -> torch.Tensor:
    """float32 [K, L, E]: the share of language k's counted tokens that chose expert e among their
    top-k (``routed``; sums to top_k over experts) or the mean router probability of e
    (``mass``; sums to 1)."""
    if source not in ("routed", "mass"):
        raise LangNeuronsError(f"routing source must be 'routed' or 'mass', got {source!r}")
    _layout(stats)
    counts = stats.extra[ROUTED if source == "routed" else MASS].to(torch.float64)
    return (counts / stats.tokens.clamp(min=1).to(torch.float64).view(-1, 1, 1)).to(torch.float32)


# -- identification ----------------------------------------------------------------------------
@dataclass
class MoeIdentifyConfig:
    """The MoE-specific settings of identification (docs/moe.md). The neuron selector's own
    settings (method, top_rate, bar, λ) are `config.IdentifyConfig`'s."""

    min_routed: int = DEFAULT_MIN_ROUTED
    expert_method: str = "entropy-lambda"
    expert_top_rate: float = 0.05  # of L·E experts (at least one expert is selected)
    # τ of the routing shares: None = the share of uniform routing (top_k/E routed, 1/E mass), so an
    # expert is "active" in a language that routes to it more than evenly; a number = that quantile of
    # all K·L·E shares, as `bar` for neurons (with few experts the quantile often ties at the top)
    expert_bar: float | None = None
    expert_lam: str | float = 0.0  # entropy only by default; "auto" = the published λ search (docs/moe.md)
    expert_source: str = "routed"  # routed (top-k choices) | mass (router probability)

    def validate(self) -> "MoeIdentifyConfig":
        from .identify import METHODS

        if isinstance(self.min_routed, bool) or not isinstance(self.min_routed, int) or self.min_routed < 1:
            raise LangNeuronsError(f"--min-routed must be an integer >= 1, got {self.min_routed!r}")
        if self.expert_method not in METHODS:
            raise LangNeuronsError(f"unknown expert method {self.expert_method!r}; choose one of {', '.join(sorted(METHODS))}")
        for name in ("expert_top_rate", "expert_bar"):
            v = getattr(self, name)
            if v is None and name == "expert_bar":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise LangNeuronsError(f"--{name.replace('_', '-')} must be in (0, 1], got {v!r}")
        if self.expert_source not in ("routed", "mass"):
            raise LangNeuronsError(f"--expert-source must be 'routed' or 'mass', got {self.expert_source!r}")
        return self


def _selector(method: str, params: dict[str, Any]) -> Any:
    from .identify import METHODS, IdentifyError

    cls = METHODS.get(method)
    if cls is None:
        raise IdentifyError(f"unknown identification method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise IdentifyError(f"bad parameters for {method}: {exc}") from None


def _scores(method: str, probs: torch.Tensor, fit: Any) -> torch.Tensor | None:
    """float32 scores of the built-in selectors (lower = more language-specific)."""
    from .identify import harmonic_norm, lape_entropy, normalized_entropy

    if method == "entropy-lambda" and fit.lam is not None:
        K = probs.shape[0]
        return (normalized_entropy(probs) - probs.amax(0).to(torch.float64) * fit.lam / harmonic_norm(K)).to(torch.float32)
    if method == "lape":
        s = lape_entropy(probs).to(torch.float32)
        return s.masked_fill(fit.n_active == 0, math.inf)
    return None


def _fit_subset(method: str, params: dict[str, Any], probs: torch.Tensor, tau: torch.Tensor,
                keep: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run a selector on the columns ``keep`` (bool [L, X]) of probs [K, L, X], flattened in
    layer-major order (so the tie rule -- lower flat index first -- is the global one), and
    scatter the result back: (fit, selected, active, n_active, scores) over [L, X]."""
    K, L, X = probs.shape
    idx = keep.reshape(-1).nonzero().flatten()
    sub = probs.reshape(K, -1)[:, idx].reshape(K, 1, -1).contiguous()
    fit = _selector(method, params).fit_probs(sub, tau)
    selected = torch.zeros(L * X, dtype=torch.bool)
    selected[idx] = fit.selected.reshape(-1)
    active = torch.zeros(K, L * X, dtype=torch.bool)
    active[:, idx] = fit.active.reshape(K, -1)
    n_active = torch.zeros(L * X, dtype=torch.int64)
    n_active[idx] = fit.n_active.reshape(-1).to(torch.int64)
    sub_scores = _scores(method, sub, fit)
    scores = None
    if sub_scores is not None:
        scores = torch.full((L * X,), math.inf, dtype=torch.float32)
        scores[idx] = sub_scores.reshape(-1)
    return fit, selected.view(L, X), active.view(K, L, X), n_active.view(L, X), \
        None if scores is None else scores.view(L, X)


def _map(languages: list[str], fit: Any, selected: torch.Tensor, active: torch.Tensor, n_active: torch.Tensor,
         scores: torch.Tensor | None, meta: dict[str, Any]) -> NeuronMap:
    K = len(languages)
    classes = class_codes(selected, n_active, K)
    general = n_active == K
    keep = selected | general
    appear = torch.bincount(n_active[selected].flatten(), minlength=K + 1).tolist()
    meta = dict(meta, tau=float(fit.tau), appear=appear, num_selected=int(selected.sum()),
                num_unassigned=int((classes == UNASSIGNED).sum()), num_general=int(general.sum()),
                **{"lambda": fit.lam, "lambda_saturated": bool(fit.saturated)})
    return NeuronMap(list(languages), classes, active & keep.unsqueeze(0), selected, scores, meta)


def identify_experts(stats: ActivationStats, config: MoeIdentifyConfig | None = None) -> NeuronMap:
    """Language-specific experts: the neuron selector run on the routing shares r[k, l, e]
    (`routing_shares`) as if each expert were a neuron -- entropy of the per-language routing
    distribution, λ, τ (``expert_bar``) and classes as for neurons. A NeuronMap over [L, E]:
    ``language_mask(lang, ("specific",))`` is the [L, E] mask for `mask_experts`."""
    from .identify import TIE_RULE, activation_threshold, selection_size

    cfg = (config or MoeIdentifyConfig()).validate()
    shares = routing_shares(stats, cfg.expert_source)
    K, L, E = shares.shape
    k = max(1, selection_size(cfg.expert_top_rate, L * E))
    if cfg.expert_bar is None:
        top_k = int((stats.meta.get("moe") or {}).get("top_k") or 1) if cfg.expert_source == "routed" else 1
        tau = torch.tensor(top_k / E, dtype=torch.float32)
    else:
        tau = activation_threshold(shares, cfg.expert_bar)
    params: dict[str, Any] = {"top_rate": k / (L * E), "bar": float(cfg.expert_bar or 0.5)}  # (bar: unused, τ given)
    if cfg.expert_method == "entropy-lambda":
        params["lam"] = cfg.expert_lam
    fit, selected, active, n_active, scores = _fit_subset(cfg.expert_method, params, shares, tau,
                                                          torch.ones(L, E, dtype=torch.bool))
    params["bar"] = cfg.expert_bar
    meta = {"what": "experts", "method": cfg.expert_method,
            "params": {**params, "source": cfg.expert_source,
                       "tau_rule": "uniform share" if cfg.expert_bar is None else "quantile"},
            "k_select": k, "stats_fingerprint": stats.fingerprint(), "model": stats.meta.get("model"),
            "model_fingerprint": stats.meta.get("model_fingerprint"), "tie_rule": TIE_RULE}
    return _map(list(stats.languages), fit, selected, active, n_active, scores, meta)


_EXPERT_EXTRAS = ("expert_classes", "expert_active", "expert_selected", "expert_scores")


def identify_moe(stats: ActivationStats, method: str = "entropy-lambda", *, moe: MoeIdentifyConfig | None = None,
                 **params: Any) -> NeuronMap:
    """Language neurons of a mixture of experts (see the module docstring for the rule).

    τ = the kth smallest of the *observed* probabilities (k = round(bar · their number)); the
    selector runs on the neurons observed in all K languages (top_rate of their number); every
    other neuron gets class ``none``. The map's extras: ``observed`` bool [K, L, N], the routing
    shares ``routing_share`` [K, L, E] and the expert-level map (``expert_*``, see `experts_map`).
    """
    from .identify import TIE_RULE, IdentifyError, activation_threshold, selection_size

    cfg = (moe or MoeIdentifyConfig()).validate()
    if not isinstance(stats, ActivationStats) or len(stats.languages) < 2:
        raise IdentifyError("identification needs ActivationStats of at least 2 languages")
    stats.validate(buckets=False)
    check_moe_stats(stats)
    E, I, S = _layout(stats)
    probs, observed = neuron_probs(stats, cfg.min_routed)
    K, L, N = probs.shape
    everywhere = observed.all(0)
    n_obs = int(everywhere.sum())
    if n_obs == 0:
        raise IdentifyError(f"no expert neuron is observed in all {K} languages (each language must send at least "
                            f"min_routed={cfg.min_routed} tokens to its expert); record more text or lower --min-routed")
    bar = float(params.get("bar", 0.95))
    tau = activation_threshold(probs[observed], bar)
    fit, selected, active, n_active, scores = _fit_subset(method, params, probs, tau, everywhere)
    meta = {
        "method": method, "params": {**params, "min_routed": cfg.min_routed},
        "model": stats.meta.get("model"), "model_fingerprint": stats.meta.get("model_fingerprint"),
        "stats_fingerprint": stats.fingerprint(), "scope": stats.meta.get("scope"),
        "k_tau": selection_size(bar, int(observed.sum())),
        "k_select": selection_size(float(params.get("top_rate", 0.01)), n_obs),
        "prob_dtype": "float32", "tie_rule": TIE_RULE + " (over the neurons observed in every language)",
        "moe": {"num_experts": E, "expert_size": I, "shared_size": S, "min_routed": cfg.min_routed,
                "observed_everywhere": n_obs, "observed_somewhere": int(observed.any(0).sum()),
                "never_observed": int((~observed.any(0)).sum()),
                "unobserved": {lang: int((~observed[k]).sum()) for k, lang in enumerate(stats.languages)},
                "rule": "p = positive / tokens routed to the neuron's expert, only where that is >= min_routed; "
                        "neurons unobserved in some language are not classified (class none)"},
    }
    nmap = _map(list(stats.languages), fit, selected, active, n_active, scores, meta)
    nmap.extras["observed"] = observed
    nmap.extras["routing_share"] = routing_shares(stats, cfg.expert_source)
    try:
        emap = identify_experts(stats, cfg)
    except LangNeuronsError as exc:  # e.g. no λ passes for experts: the neuron map stands on its own
        nmap.meta["experts"] = {"error": str(exc)}
    else:
        nmap.extras.update(expert_classes=emap.classes, expert_active=emap.active, expert_selected=emap.selected)
        if emap.scores is not None:
            nmap.extras["expert_scores"] = emap.scores
        nmap.meta["experts"] = emap.meta
    return nmap


def experts_map(nmap: NeuronMap) -> NeuronMap:
    """The expert-level map ([L, E]) that `identify_moe` stored in a neuron map's extras."""
    if "expert_classes" not in nmap.extras:
        err = (nmap.meta.get("experts") or {}).get("error")
        raise NeuronMapError("this neuron map has no expert-level identification" + (f" ({err})" if err else
                             " (it was not made by identify_moe)"))
    ex = nmap.extras
    out = NeuronMap(list(nmap.languages), ex["expert_classes"], ex["expert_active"], ex["expert_selected"],
                    ex.get("expert_scores"), dict(nmap.meta.get("experts") or {}))
    problem = out.invariant_violation()
    if problem:
        raise NeuronMapError(f"the expert-level map is damaged: {problem}")
    return out


def moe_summary(nmap: NeuronMap) -> dict[str, Any]:
    """Per layer: neuron classes (as for dense models), unobserved neurons per language, and
    the language-specific experts per language (for anatomy and the report)."""
    out: dict[str, Any] = {"neurons_per_layer": nmap.counts_per_layer(), "moe": nmap.meta.get("moe")}
    if "observed" in nmap.extras:
        obs = nmap.extras["observed"]
        out["unobserved_per_layer"] = {lang: (~obs[k]).sum(-1).tolist() for k, lang in enumerate(nmap.languages)}
    try:
        emap = experts_map(nmap)
    except NeuronMapError:
        return out
    out["experts_per_layer"] = emap.counts_per_layer()
    out["specific_experts"] = {lang: [[int(layer), int(e)] for layer, e in
                                      emap.language_mask(lang, ("specific",)).nonzero().tolist()]
                               for lang in nmap.languages}
    return out


# -- interventions -----------------------------------------------------------------------------
class _Positions:
    """Which rows of the flattened [B*T] batch an intervention patches, by `intervene.deactivate`'s
    rule: a forward with an empty or absent KV cache is a prefill, a cached forward reads only new
    tokens. positions="generated": a prefill is patched from ``prompt_length`` on (nothing without
    it), a cached forward everywhere; "prompt": a prefill below ``prompt_length`` (all of it
    without), a cached forward nowhere."""

    def __init__(self, positions: str, prompt_length: int | None):
        self.positions, self.prompt_length = positions, prompt_length
        self.start: int | None = None
        self.seq: int | None = None

    def pre_forward(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.seq = int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        get_len = getattr(cache, "get_seq_length", None)
        empty = cache is None or (callable(get_len) and int(get_len()) == 0)
        self.start = (self.prompt_length if self.prompt_length is not None else 1 << 62) if empty else 0

    def post_forward(self, *_: Any) -> None:
        self.start = None

    def rows(self, token_idx: torch.Tensor) -> torch.Tensor | None:
        """bool mask over ``token_idx`` of the rows to patch (None: all)."""
        if self.positions == "all":
            return None
        if self.start is None or not self.seq:
            raise LangNeuronsError(f"positions={self.positions!r} needs the forward to go through the model passed to "
                                   "the intervention (it reads the KV cache to tell prompt from new tokens)")
        if self.positions == "prompt":
            return (token_idx % self.seq) < self.start
        return (token_idx % self.seq) >= self.start

    @contextmanager
    def installed(self, model: nn.Module) -> Iterator[None]:
        if self.positions == "all":
            yield
            return
        hs = [model.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
              model.register_forward_hook(self.post_forward)]
        try:
            yield
        finally:
            for h in hs:
                h.remove()


def _patch_columns(act: torch.Tensor, cols: torch.Tensor, mode: str, factor: float, vals: torch.Tensor | None,
                   rows: torch.Tensor | None) -> torch.Tensor:
    """``act`` [R, W] with columns ``cols`` zeroed / scaled / set, in the rows ``rows`` (None: all);
    out of place, untouched entries bit-identical."""
    if mode == "zero":
        new = act.index_fill(-1, cols, 0.0)
    elif mode == "scale":
        new = act.index_copy(-1, cols, act.index_select(-1, cols) * factor)
    else:
        assert vals is not None
        new = act.index_copy(-1, cols, vals.to(act.dtype).expand(act.shape[0], cols.numel()).contiguous())
    return new if rows is None else torch.where(rows.unsqueeze(-1), new, act)


class _NeuronPatcher:
    """Expert-loop callback (and shared-expert hook) of `deactivate_neurons`."""

    def __init__(self, sites: ExpertSites, iv: Intervention, mode: str, factor: float, values: torch.Tensor | None,
                 where: _Positions):
        self.iv, self.mode, self.factor, self.where = iv, mode, float(factor), where
        E, I = sites.num_experts, sites.expert_size
        self.per_expert: list[dict[int, tuple[torch.Tensor, torch.Tensor | None]]] = []
        self.shared: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        self.patched_rows = 0
        for layer, idx in enumerate(iv.indices):
            experts: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
            routed = idx[idx < E * I]
            for e in torch.unique(routed // I).tolist():
                cols = routed[(routed // I) == e]
                experts[int(e)] = (cols - e * I, None if values is None else values[layer, cols])
            self.per_expert.append(experts)
            sh = idx[idx >= E * I]
            self.shared.append((sh - E * I, None if values is None else values[layer, sh]) if sh.numel() else None)
        self._dev: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _on(self, layer: int, e: int, spec: tuple[torch.Tensor, torch.Tensor | None],
            dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (layer, e, dev)
        got = self._dev.get(key)
        if got is None:
            got = self._dev[key] = (spec[0].to(dev), None if spec[1] is None else spec[1].to(dev))
        return got

    def start(self, layer: int, rows: int) -> None:
        self.iv.calls[layer] += 1

    def expert(self, layer: int, e: int, token_idx: torch.Tensor, act: torch.Tensor) -> torch.Tensor | None:
        spec = self.per_expert[layer].get(e)
        if spec is None:
            return None
        cols, vals = self._on(layer, e, spec, act.device)
        rows = self.where.rows(token_idx)
        return _patch_columns(act, cols, self.mode, self.factor, vals, rows)

    def shared_hook(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        spec = self.shared[layer]
        assert spec is not None
        cols, vals = self._on(layer, -1, spec, out.device)
        flat = out.reshape(-1, out.shape[-1])
        rows = self.where.rows(torch.arange(flat.shape[0], device=out.device))
        if not self.per_expert[layer]:
            self.iv.calls[layer] += 1
        return _patch_columns(flat, cols, self.mode, self.factor, vals, rows).reshape(out.shape)


@contextmanager
def deactivate_neurons(model: nn.Module, mask: MaskLike, *, mode: str = "zero", factor: float = 0.0,
                       values: torch.Tensor | None = None, positions: str = "all", prompt_length: int | None = None,
                       act_path: str | None = None, sites: ExpertSites | None = None) -> Iterator[Intervention]:
    """`intervene.deactivate` for expert neurons (it delegates here for MoE models): the same
    arguments, modes (zero / scale / set), positions and returned `Intervention`. ``mask`` is
    bool [L, E·I + S] (a MoE NeuronMap's masks) or per-layer index tensors."""
    if act_path is not None:
        raise LangNeuronsError("--mlp-act-path does not apply to a mixture of experts; drop it")
    if mode not in ("zero", "scale", "set"):
        raise LangNeuronsError(f"unknown intervention mode {mode!r}; use zero, scale or set")
    if positions not in ("all", "generated", "prompt"):
        raise LangNeuronsError(f"unknown positions {positions!r}; use all, generated or prompt")
    sites = sites or locate_experts(model)
    L, N = sites.num_layers, sites.num_neurons
    indices = as_indices(mask, L, N)
    if mode == "set":
        if values is None:
            raise LangNeuronsError("mode='set' needs values=[layers, neurons]")
        values = torch.as_tensor(values).detach().cpu()
        if tuple(values.shape) != (L, N):
            raise NeuronMapError(f"values are {list(values.shape)} but the model has {L} layers x {N} neurons")
    elif values is not None:
        raise LangNeuronsError(f"values= is only used with mode='set' (mode is {mode!r})")
    iv = Intervention(mode, positions, indices, calls=[0] * L)
    where = _Positions(positions, prompt_length)
    patcher = _NeuronPatcher(sites, iv, mode, factor, values, where)
    expert_layers = [layer for layer in range(L) if patcher.per_expert[layer]]
    handles = []
    try:
        for layer in range(L):
            if patcher.shared[layer] is not None and sites.shared_acts:
                handles.append(sites.shared_acts[layer].register_forward_hook(
                    lambda _m, _i, out, layer=layer: patcher.shared_hook(layer, out)))
        with where.installed(model), _attached(sites, patcher, expert_layers):
            yield iv
    finally:
        for h in handles:
            h.remove()


class _RouterEdit:
    """Router forward hook: removed experts' logits := -inf; forced experts' logits := the row's
    best logit + log(strength) and they are picked before any other expert; then the family's
    routing again (softmax over all experts in float32, top-k, renormalise if the family does,
    the scores in the dtype the router returned them)."""

    def __init__(self, sites: ExpertSites, iv: Intervention, where: _Positions, removed: list[torch.Tensor],
                 forced: list[torch.Tensor], strength: float):
        self.sites, self.iv, self.where = sites, iv, where
        self.removed, self.forced, self.log_strength = removed, forced, math.log(strength)
        self._dev: dict[tuple[str, int, torch.device], torch.Tensor] = {}

    def _cols(self, which: str, layer: int, device: torch.device) -> torch.Tensor:
        key = (which, layer, device)
        if key not in self._dev:
            self._dev[key] = (self.removed if which == "removed" else self.forced)[layer].to(device)
        return self._dev[key]

    def __call__(self, layer: int, out: Any) -> Any:
        logits, scores, _ = out
        E = self.sites.num_experts
        self.iv.calls[layer] += 1
        flat = logits.reshape(-1, E)
        edited = flat
        removed, forced = self._cols("removed", layer, flat.device), self._cols("forced", layer, flat.device)
        if removed.numel():
            edited = edited.index_fill(-1, removed, -math.inf)
        picked = torch.zeros_like(flat, dtype=torch.bool)
        if forced.numel():
            best = flat.max(dim=-1, keepdim=True).values + self.log_strength
            edited = edited.index_copy(-1, forced, best.expand(-1, int(forced.numel())).to(edited.dtype))
            picked = picked.index_fill(-1, forced, True)
        rows = self.where.rows(torch.arange(flat.shape[0], device=flat.device))
        if rows is not None:
            edited = torch.where(rows.unsqueeze(-1), edited, flat)
            picked = picked & rows.unsqueeze(-1)
        probs = _probs_from_logits(edited)
        # forced experts first (probabilities are <= 1), then the router's own order
        top_i = torch.topk(probs + 2.0 * picked.to(probs.dtype), self.sites.top_k, dim=-1).indices
        top_v = probs.gather(-1, top_i)
        if self.sites.normalize_topk:
            top_v = top_v / top_v.sum(dim=-1, keepdim=True)
        return edited.reshape(logits.shape), top_v.to(scores.dtype), top_i


@contextmanager
def route_experts(model: nn.Module, *, remove: MaskLike | None = None, force: MaskLike | None = None,
                  strength: float = 1.0, positions: str = "all", prompt_length: int | None = None,
                  sites: ExpertSites | None = None) -> Iterator[Intervention]:
    """Change which experts the router picks while the block runs (only the router is hooked, so
    any experts kernel works). ``remove`` experts get router logit -inf: every token goes to its
    best *other* experts (`mask_experts`). ``force`` experts get the row's best logit + log
    ``strength`` (1: as likely as the router's favourite; 2: twice as likely) and are picked before
    every other expert, up to top_k of them per token (the most probable forced first); the
    routing weights are the softmax of the edited logits, renormalised over the picked experts
    where the family renormalises. Masks: bool [L, E] or per-layer expert indices. ``positions``:
    all | generated | prompt (`intervene.deactivate`'s rule). A removed expert is never forced."""
    if positions not in ("all", "generated", "prompt"):
        raise LangNeuronsError(f"unknown positions {positions!r}; use all, generated or prompt")
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
        raise LangNeuronsError(f"the forcing strength must be a number > 0, got {strength!r}")
    sites = sites or locate_experts(model)
    L, E = sites.num_layers, sites.num_experts
    empty = [torch.zeros(0, dtype=torch.int64) for _ in range(L)]
    try:
        removed = as_indices(remove, L, E) if remove is not None else empty
        forced = as_indices(force, L, E) if force is not None else empty
    except NeuronMapError as exc:
        raise NeuronMapError(f"expert mask: {exc} (an expert mask is [layers, experts] = [{L}, {E}])") from None
    forced = [f[~torch.isin(f, r)] for f, r in zip(forced, removed)]
    crowded = [layer for layer, idx in enumerate(removed) if E - int(idx.numel()) < sites.top_k]
    if crowded:
        raise NeuronMapError(f"the expert mask leaves fewer than top_k={sites.top_k} experts in layers {crowded[:5]}; "
                             "the router could not pick top_k experts")
    both = [torch.unique(torch.cat([r, f])) for r, f in zip(removed, forced)]
    kind = "mask-experts" if force is None else "force-experts" if remove is None else "route-experts"
    iv = Intervention(kind, positions, both, calls=[0] * L)
    where = _Positions(positions, prompt_length)
    hook = _RouterEdit(sites, iv, where, removed, forced, float(strength))
    handles = []
    try:
        for layer in iv.layers:
            handles.append(sites.routers[layer].register_forward_hook(
                lambda _m, _i, out, layer=layer: hook(layer, out)))
        with where.installed(model):
            yield iv
    finally:
        for h in handles:
            h.remove()


@contextmanager
def mask_experts(model: nn.Module, mask: MaskLike, *, positions: str = "all", prompt_length: int | None = None,
                 sites: ExpertSites | None = None) -> Iterator[Intervention]:
    """Remove whole experts while the block runs: their router logits are set to -inf, so every
    token is routed to its best *other* top-k experts (the MoE analogue of deactivating a
    neuron set). ``mask``: bool [L, E] (``experts_map(nmap).language_mask(lang, ...)``) or
    per-layer expert indices. At least top_k experts must stay in every layer. Works with any
    experts kernel (only the router is hooked)."""
    with route_experts(model, remove=mask, positions=positions, prompt_length=prompt_length, sites=sites) as iv:
        yield iv


def expert_neuron_mask(sites: ExpertSites | Any, expert_mask: torch.Tensor) -> torch.Tensor:
    """bool [L, E·I + S]: every neuron of the experts in ``expert_mask`` [L, E] (e.g. to compare
    zeroing an expert's neurons with masking its router logit)."""
    E, I, S = sites.num_experts, sites.expert_size, sites.shared_size
    if tuple(expert_mask.shape) != (sites.num_layers, E):
        raise NeuronMapError(f"the expert mask is {list(expert_mask.shape)}, the model has {sites.num_layers} layers x "
                             f"{E} experts")
    per = expert_mask.to(torch.bool).repeat_interleave(I, dim=-1)
    return torch.cat([per, torch.zeros(*per.shape[:-1], S, dtype=torch.bool)], dim=-1)

