"""Interventions: deactivate, scale or set MLP neurons of a loaded Hugging Face model.

The neuron (l, n) is coordinate n of the activation module found by
`langneurons.arch.locate_activations` (``act_fn(gate_proj(x))`` or ``act(fc1(x))``). A forward
hook on that module returns a modified copy of the activation, so the change flows into the
down projection exactly as if the neuron had produced another value::

    with deactivate(model, nmap.language_mask("de", ("specific",))):
        logits = model(**batch).logits          # German-specific neurons zeroed

Modes (``mode=``):

* ``"zero"``  activation := 0 (deactivation: the neuron contributes nothing to ``down_proj``);
* ``"scale"`` activation := factor * activation;
* ``"set"``   activation := values[l, n], e.g. the neuron's mean activation in another language
  (``ActivationStats.means()[k]``);
* ``"add"``   activation := activation + values[l, n], e.g. a multiple of the difference of two
  languages' means (steering, `langneurons.steer`).

Positions (``positions=``):

* ``"all"``       every position of every forward pass;
* ``"generated"`` only positions after the prompt. Detection: a forward pre-hook on the model
  reads the KV cache that ``generate`` passes (``cache=`` in transformers 5,
  ``past_key_values=`` before). A forward whose cache is empty or absent is a *prefill* (it reads
  the prompt): nothing is patched in it unless ``prompt_length`` is given, in which case the
  positions ``>= prompt_length`` are patched (this also covers generation without a KV cache,
  where every step re-reads the whole sequence). Every forward with a non-empty cache reads only
  new tokens, so all of its positions are patched. With left padding (what `evaluate.generate`
  uses) the prompt length is the padded width, the same for every row. Consequence worth knowing:
  the *first* new token is predicted from the last prompt position, which is not patched, so it
  equals the unpatched model's first token; the intervention acts from the second token on.
  Chunked prefill (a prompt fed in several cached chunks) would be mistaken for generation.
* ``"prompt"``    only the prompt's positions: every position of a prefill (or the positions
  ``< prompt_length`` when it is given), nothing in a forward with a non-empty cache. The new
  tokens then read keys and values that the patched prompt left in the cache.

`add_to_residual` adds a vector to the residual stream after chosen blocks (a difference-of-means
steering vector), with the same positions.

Guarantees (all tested): hooks are removed on exit even when the body raises; contexts nest (both
apply, inner after outer); an empty mask registers no hook, so logits are bit-identical to the
unpatched model; a mask or value tensor that does not fit the model raises `NeuronMapError`
instead of silently doing nothing; the returned `Intervention` counts how often each layer was
patched, and `Intervention.check_fired()` fails loudly when a hooked layer never ran (fused
kernels or ``torch.compile`` can bypass Python hooks).

Index tensors are moved lazily to the device of each layer's activation, once, so a model spread
over several devices (``device_map="auto"``) works without host round trips.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from .arch import ActivationSites, locate_activations
from .errors import LangNeuronsError, NeuronMapError

Mode = Literal["zero", "scale", "set", "add"]
Positions = Literal["all", "generated", "prompt"]
MODES = ("zero", "scale", "set", "add")
POSITIONS = ("all", "generated", "prompt")
#: a mask: bool [L, N], or one index tensor per layer
MaskLike = torch.Tensor | Sequence[torch.Tensor]

__all__ = ["deactivate", "add_to_residual", "Intervention", "MODES", "POSITIONS", "random_control", "matched_control", "activity_from_probs",
           "activity_strata", "as_indices", "mask_size", "mask_key"]


def as_indices(mask: MaskLike, num_layers: int, num_neurons: int) -> list[torch.Tensor]:
    """Normalise a mask (bool [L, N] or per-layer index tensors) to per-layer sorted, unique
    int64 CPU index tensors, checking that it fits an L x N model."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise NeuronMapError(f"a mask tensor must be bool [layers, neurons], got dtype {mask.dtype}; "
                                 "pass a per-layer list of index tensors for indices")
        if mask.dim() != 2 or tuple(mask.shape) != (num_layers, num_neurons):
            raise NeuronMapError(f"the mask is {list(mask.shape)} but the model has {num_layers} layers x "
                                 f"{num_neurons} neurons; it was made for another model")
        return [row.nonzero().flatten().to(torch.int64).cpu() for row in mask]
    layers = list(mask)
    if len(layers) != num_layers:
        raise NeuronMapError(f"the mask has {len(layers)} layers but the model has {num_layers}; "
                             "it was made for another model")
    out = []
    for layer, idx in enumerate(layers):
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            raise NeuronMapError(f"layer {layer}: got a bool tensor inside a per-layer list; pass index tensors "
                                 "or one bool [layers, neurons] tensor")
        if idx.is_floating_point():
            raise NeuronMapError(f"layer {layer}: neuron indices must be integers, got {idx.dtype}")
        idx = idx.flatten().to(torch.int64).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_neurons):
            raise NeuronMapError(f"layer {layer}: neuron index out of range [0, {num_neurons}) "
                                 "(the mask was made for another model)")
        out.append(torch.unique(idx))  # sorted, no duplicates
    return out


def mask_size(mask: MaskLike) -> int:
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return int(mask.sum())
    return sum(int(torch.as_tensor(i).numel()) for i in mask)


def mask_key(mask: torch.Tensor) -> bytes:
    """A hashable key of a bool [L, N] mask (to reuse results of identical masks)."""
    packed = mask.to(torch.bool).contiguous().cpu()
    return bytes(str(tuple(packed.shape)), "ascii") + packed.numpy().tobytes()


@dataclass
class Intervention:
    """What a `deactivate` context did (returned by ``with deactivate(...) as iv``)."""

    mode: str
    positions: str
    indices: list[torch.Tensor]  # per layer, CPU
    calls: list[int] = field(default_factory=list)  # per layer: forwards in which the hook ran
    patched_positions: int = 0  # (batch x seq) positions patched, counted at the first hooked layer

    @property
    def layers(self) -> list[int]:
        return [layer for layer, idx in enumerate(self.indices) if idx.numel()]

    @property
    def num_neurons(self) -> int:
        return sum(int(i.numel()) for i in self.indices)

    def check_fired(self) -> None:
        """Fail loudly if a hooked layer never ran since the context was entered (a fused kernel,
        torch.compile or a forward that bypassed the model would make the intervention a no-op)."""
        silent = [layer for layer in self.layers if self.calls[layer] == 0]
        if silent:
            raise LangNeuronsError(
                f"the intervention hooks of layers {silent[:5]} never ran: the forward bypassed the activation "
                "modules (torch.compile, a fused kernel, or a model other than the one patched); disable "
                "compilation or pass --mlp-act-path")


def _cache_is_empty(args: tuple, kwargs: dict) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return True
    get_len = getattr(cache, "get_seq_length", None)
    if callable(get_len):
        return int(get_len()) == 0
    try:  # legacy tuple-of-tuples cache: [layer][key/value] -> [B, H, T, D]
        return int(cache[0][0].shape[-2]) == 0
    except (IndexError, TypeError, AttributeError):
        return False


class _Patcher:
    """The per-layer hook function plus the position state shared with the model pre-hook."""

    def __init__(self, iv: Intervention, mode: str, factor: float, values: torch.Tensor | None,
                 positions: str, prompt_length: int | None):
        self.iv = iv
        self.mode = mode
        self.factor = float(factor)
        self.values = values
        self.positions = positions
        self.prompt_length = prompt_length
        # Start index (in the hook's sequence dim) of the patched positions for the current forward;
        # None = not inside a forward of the patched model (only matters for "generated").
        self.start: int | None = None
        self.stop: int | None = None  # end (exclusive) of the patched positions; None: to the end
        self.batch: int | None = None  # batch size of the current forward (OPT flattens [B*T, N])
        self.first_layer = iv.layers[0] if iv.layers else -1
        self._idx_on: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._vals_on: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    # model-level hooks (only for positions="generated")
    def pre_forward(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.batch = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
        prefill = _cache_is_empty(args, kwargs)
        if self.positions == "prompt":
            # A prefill reads the prompt: patch it (up to the given prompt length); cached decoding
            # reads only new tokens: patch nothing.
            self.start = 0 if prefill else 1 << 62
            self.stop = (self.prompt_length if self.prompt_length is not None else None) if prefill else None
        elif prefill:
            # A prefill reads the prompt: patch nothing, or from the given prompt length on.
            self.start = self.prompt_length if self.prompt_length is not None else 1 << 62
        else:
            self.start = 0  # cached decoding: every position of this forward is a new token

    def post_forward(self, *_: Any) -> None:
        self.start = None
        self.stop = None

    def _index(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        idx = self._idx_on.get(key)
        if idx is None:
            idx = self._idx_on[key] = self.iv.indices[layer].to(device)
        return idx

    def _values(self, layer: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (layer, device, dtype)
        vals = self._vals_on.get(key)
        if vals is None:
            assert self.values is not None
            vals = self._vals_on[key] = self.values[layer].index_select(0, self.iv.indices[layer]).to(device, dtype)
        return vals

    def __call__(self, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        idx = self.iv.indices[layer]
        if idx.numel() == 0:  # never registered for empty layers; kept for safety
            return None
        self.iv.calls[layer] += 1
        start, stop = 0, None
        if self.positions in ("generated", "prompt"):
            if self.start is None:
                raise LangNeuronsError(f"positions={self.positions!r} needs the forward to go through the model "
                                       "passed to the intervention (it reads the KV cache to tell prompt from new "
                                       "tokens)")
            flat_shape = None
            if out.dim() == 2 and self.batch and out.shape[0] % self.batch == 0:
                flat_shape = out.shape  # OPT: [B*T, N] -> [B, T, N] for the position logic, back below
                out = out.view(self.batch, -1, out.shape[-1])
            if out.dim() != 3:
                raise LangNeuronsError(f"positions={self.positions!r} needs a [batch, seq, neurons] activation, got "
                                       f"shape {list(out.shape)}")
            start = min(self.start, out.shape[1])
            stop = None if self.stop is None or self.stop >= out.shape[1] else self.stop
            if start >= (out.shape[1] if stop is None else stop):
                return None  # no position of this forward is in scope
            if flat_shape is not None:
                patched = self._patch(layer, out, start, stop)
                return patched.reshape(flat_shape)
        return self._patch(layer, out, start, stop)

    def _patch(self, layer: int, out: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        whole = start == 0 and stop is None
        if layer == self.first_layer:
            self.iv.patched_positions += int(out[..., 0].numel() if whole else out[:, start:stop, 0].numel())
        # Out-of-place (never modify `out`): autograd may need it (ReLU's backward reads its output),
        # and untouched coordinates stay bit-identical.
        region = out if whole else out[:, start:stop]
        new_region = self._apply(layer, region)
        if whole:
            return new_region
        new = out.clone()
        new[:, start:stop] = new_region
        return new

    def _apply(self, layer: int, region: torch.Tensor) -> torch.Tensor:
        dev = region.device
        index = self._index(layer, dev)
        if self.mode == "zero":
            return region.index_fill(-1, index, 0.0)
        if self.mode == "scale":
            return region.index_copy(-1, index, region.index_select(-1, index) * self.factor)
        vals = self._values(layer, dev, region.dtype)
        if self.mode == "add":
            return region.index_add(-1, index, vals.expand(*region.shape[:-1], vals.numel()).contiguous())
        return region.index_copy(-1, index, vals.expand(*region.shape[:-1], vals.numel()).contiguous())


@contextmanager
def deactivate(model: nn.Module, mask: MaskLike, *, mode: Mode = "zero", factor: float = 0.0,
               values: torch.Tensor | None = None, positions: Positions = "all",
               prompt_length: int | None = None, act_path: str | None = None,
               sites: ActivationSites | None = None) -> Iterator[Intervention]:
    """Patch the neurons in ``mask`` while the block runs; always unpatch on exit.

    mask: bool [L, N] or one index tensor per layer (a NeuronMap gives either:
    ``nmap.language_mask(lang, classes)`` / ``nmap.masks(classes)[lang]``).
    mode: "zero" | "scale" (times ``factor``) | "set" (to ``values[l, n]``, a [L, N] tensor) |
    "add" (plus ``values[l, n]``).
    positions: "all" | "generated" | "prompt" (see the module docstring for how new tokens are
    detected; ``prompt_length`` makes a prefill patch the positions >= prompt_length, or, for
    "prompt", the positions < prompt_length).
    """
    if mode not in MODES:
        raise LangNeuronsError(f"unknown intervention mode {mode!r}; use zero, scale, set or add")
    if positions not in POSITIONS:
        raise LangNeuronsError(f"unknown positions {positions!r}; use all, generated or prompt")
    sites = sites or locate_activations(model, act_path)
    if getattr(sites, "is_moe", False):  # mixture of experts: neurons inside experts (langneurons.moe)
        from .moe import deactivate_neurons

        with deactivate_neurons(model, mask, mode=mode, factor=factor, values=values, positions=positions,
                                prompt_length=prompt_length, sites=sites) as moe_iv:  # type: ignore[arg-type]
            yield moe_iv
        return
    L, N = sites.num_layers, sites.num_neurons
    indices = as_indices(mask, L, N)
    if mode in ("set", "add"):
        if values is None:
            raise LangNeuronsError(f"mode={mode!r} needs values=[layers, neurons] (e.g. stats.means()[k])")
        values = torch.as_tensor(values)
        if tuple(values.shape) != (L, N):
            raise NeuronMapError(f"values are {list(values.shape)} but the model has {L} layers x {N} neurons")
        values = values.detach().cpu()
    elif values is not None:
        raise LangNeuronsError(f"values= is only used with mode='set' or 'add' (mode is {mode!r})")
    if prompt_length is not None and prompt_length < 0:
        raise LangNeuronsError(f"prompt_length must be >= 0, got {prompt_length}")
    iv = Intervention(mode, positions, indices, calls=[0] * L)
    patcher = _Patcher(iv, mode, factor, values, positions, prompt_length)
    handles: list[Any] = []
    try:
        if iv.layers:  # an empty mask registers nothing: bit-identical to the unpatched model
            if positions in ("generated", "prompt"):
                handles.append(model.register_forward_pre_hook(patcher.pre_forward, with_kwargs=True))
                handles.append(model.register_forward_hook(patcher.post_forward))
            for layer in iv.layers:
                def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor, layer: int = layer) -> Any:
                    return patcher(layer, out)
                handles.append(sites.modules[layer].register_forward_hook(hook))
        yield iv
    finally:
        for h in handles:
            h.remove()
    if positions == "generated" and iv.layers and any(iv.calls) and iv.patched_positions == 0:
        warnings.warn("positions='generated': the model ran but no position after the prompt was patched "
                      "(generation without a KV cache? pass prompt_length=)", stacklevel=3)


class _ResidualAdder(_Patcher):
    """Adds ``vectors[layer]`` [H] to a block's output hidden states (same position rules)."""

    def __init__(self, iv: Intervention, vectors: dict[int, torch.Tensor], positions: str,
                 prompt_length: int | None):
        super().__init__(iv, "add", 0.0, None, positions, prompt_length)
        self.vectors = vectors
        self._vec_on: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _apply(self, layer: int, region: torch.Tensor) -> torch.Tensor:
        key = (layer, region.device, region.dtype)
        vec = self._vec_on.get(key)
        if vec is None:
            vec = self._vec_on[key] = self.vectors[layer].to(region.device, region.dtype)
        if vec.dim() == 2:  # one vector per batch row
            if vec.shape[0] != region.shape[0]:
                raise LangNeuronsError(f"add_to_residual: {vec.shape[0]} per-row vectors for a batch of "
                                       f"{region.shape[0]} rows")
            return region + vec[:, None, :]
        return region + vec

    def block_hook(self, layer: int, out: Any) -> Any:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        new = self(layer, hidden)
        if new is None:
            return None
        if isinstance(out, tuple):
            return (new, *out[1:])
        if isinstance(out, list):
            return [new, *out[1:]]
        return new


@contextmanager
def add_to_residual(model: nn.Module, vectors: dict[int, torch.Tensor], *, positions: Positions = "all",
                    prompt_length: int | None = None) -> Iterator[Intervention]:
    """Add ``vectors[l]`` (a [hidden] tensor, or [batch, hidden]: one vector per row) to the
    residual stream after block ``l`` (the block's output hidden states, what
    ``output_hidden_states`` reports at index l + 1) while the block runs: a difference-of-means
    steering vector. ``positions`` as in `deactivate`.

    The returned `Intervention` has one entry per block in ``indices`` (an index tensor [0] for
    every steered block) so that ``calls`` and ``check_fired()`` work as for neurons."""
    from .arch import locate_unembedding

    if positions not in POSITIONS:
        raise LangNeuronsError(f"unknown positions {positions!r}; use all, generated or prompt")
    blocks = locate_unembedding(model).layers
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    vecs: dict[int, torch.Tensor] = {}
    for layer, vec in vectors.items():
        if not 0 <= int(layer) < len(blocks):
            raise NeuronMapError(f"residual layer {layer} is out of range: the model has {len(blocks)} blocks")
        v = torch.as_tensor(vec).detach()
        v = v.flatten() if v.dim() != 2 else v
        if hidden and v.shape[-1] != hidden:
            raise NeuronMapError(f"the steering vector of layer {layer} has {v.shape[-1]} entries but the model's "
                                 f"hidden size is {hidden}")
        if not torch.isfinite(v).all():
            raise LangNeuronsError(f"the steering vector of layer {layer} has NaN or infinite entries")
        vecs[int(layer)] = v.cpu()
    if prompt_length is not None and prompt_length < 0:
        raise LangNeuronsError(f"prompt_length must be >= 0, got {prompt_length}")
    indices = [torch.zeros(1, dtype=torch.int64) if i in vecs else torch.empty(0, dtype=torch.int64)
               for i in range(len(blocks))]
    iv = Intervention("residual-add", positions, indices, calls=[0] * len(blocks))
    adder = _ResidualAdder(iv, vecs, positions, prompt_length)
    handles: list[Any] = []
    try:
        if vecs:
            if positions in ("generated", "prompt"):
                handles.append(model.register_forward_pre_hook(adder.pre_forward, with_kwargs=True))
                handles.append(model.register_forward_hook(adder.post_forward))
            for layer in sorted(vecs):
                def hook(_mod: nn.Module, _inp: Any, out: Any, layer: int = layer) -> Any:
                    return adder.block_hook(layer, out)
                handles.append(blocks[layer].register_forward_hook(hook))
        yield iv
    finally:
        for h in handles:
            h.remove()


def random_control(mask: MaskLike, seed: int, *, exclude: MaskLike | None = None,
                   num_neurons: int | None = None, strict: bool = True) -> Any:
    """Random neurons with exactly the same number per layer as ``mask`` (a chance baseline).

    Returns the same kind as ``mask``: bool [L, N] for a bool mask, per-layer sorted index tensors
    for an index list (then ``num_neurons`` is required). Neurons in ``exclude`` (e.g. the real set)
    are never drawn; where a layer has too few other neurons (a set covering more than half a
    layer) ``strict=True`` raises and ``strict=False`` tops the draw up with excluded neurons, so
    the per-layer counts always match. Reproducible: a `torch.Generator` seeded with ``seed``
    draws layer by layer.
    """
    is_bool = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    if is_bool:
        L, N = int(mask.shape[0]), int(mask.shape[1])  # type: ignore[union-attr]
    else:
        if num_neurons is None:
            raise LangNeuronsError("random_control on per-layer index tensors needs num_neurons=")
        L, N = len(mask), int(num_neurons)  # type: ignore[arg-type]
    indices = as_indices(mask, L, N)
    excluded = as_indices(exclude, L, N) if exclude is not None else [torch.empty(0, dtype=torch.int64)] * L
    gen = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor] = []
    for layer in range(L):
        count = int(indices[layer].numel())
        allowed = torch.ones(N, dtype=torch.bool)
        allowed[excluded[layer]] = False
        pool = allowed.nonzero().flatten()
        # One permutation per layer, in layer order: the same (counts, exclude, seed) always gives
        # the same set, whatever the device or the caller.
        perm = torch.randperm(pool.numel(), generator=gen)
        chosen = pool[perm[:count]]
        if count > pool.numel():
            if strict:
                raise NeuronMapError(f"layer {layer}: cannot draw {count} random neurons from the {pool.numel()} "
                                     "not excluded; exclude fewer neurons (or strict=False)")
            rest = (~allowed).nonzero().flatten()
            extra = rest[torch.randperm(rest.numel(), generator=gen)[:count - pool.numel()]]
            chosen = torch.cat([chosen, extra])
        out.append(torch.sort(chosen).values)
    if is_bool:
        result = torch.zeros(L, N, dtype=torch.bool)
        for layer, idx in enumerate(out):
            result[layer, idx] = True
        return result
    return out



# --------------------------------------------------------------------------------------------
# the activity-matched control
# --------------------------------------------------------------------------------------------
ACTIVITY = ("max", "mean")


def activity_from_probs(probs: torch.Tensor, how: str = "max") -> torch.Tensor:
    """The [L, N] activity of every neuron from the run's firing probabilities p[k, l, n]
    (``ActivationStats.probs()``), used to stratify the matched control.

    ``"max"`` (default): the neuron's firing rate in its busiest language. Neurons are selected
    because p > τ in *some* language, so this is the quantity the selection is biased on; a
    control matched on it is as busy, in its busiest language, as the real set. ``"mean"``: the
    mean rate over languages (a language-specific neuron then looks quiet)."""
    probs = torch.as_tensor(probs)
    if probs.dim() != 3:
        raise LangNeuronsError(f"activity needs probabilities [languages, layers, neurons], got shape "
                               f"{list(probs.shape)}")
    if how not in ACTIVITY:
        raise LangNeuronsError(f"unknown activity {how!r}; use max or mean")
    p = probs.float()
    return (p.amax(0) if how == "max" else p.mean(0)).cpu()


def activity_strata(activity: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Stratum id (int64 [L, N]) of every neuron: quantile bins of ``activity`` WITHIN its layer.

    Edges are the layer's quantiles at 1/bins, 2/bins, ...; a neuron's stratum is the number of
    edges strictly below its activity, so equal activities share a stratum and tied quantiles
    (e.g. many neurons that never fire) merge bins instead of splitting equal neurons apart.
    Quantile bins adapt to each layer's distribution: layers differ a lot in how often their
    neurons fire, so fixed thresholds would put whole layers into one bin."""
    act = torch.as_tensor(activity).double()
    if act.dim() != 2:
        raise LangNeuronsError(f"activity must be [layers, neurons], got shape {list(act.shape)}")
    if not torch.isfinite(act).all():
        raise LangNeuronsError("activity has NaN or infinite values; pass firing probabilities in [0, 1]")
    if bins < 1:
        raise LangNeuronsError(f"control bins must be >= 1, got {bins}")
    qs = torch.arange(1, bins, dtype=torch.float64) / bins
    out = torch.empty(act.shape, dtype=torch.int64)
    for layer in range(act.shape[0]):
        edges = torch.unique(torch.quantile(act[layer], qs)) if bins > 1 else act.new_empty(0)
        # number of edges strictly below the value (right=False: value == edge stays below it)
        out[layer] = torch.bucketize(act[layer], edges, right=False)
    return out


def matched_control(mask: MaskLike, activity: torch.Tensor, seed: int, *, exclude: MaskLike | None = None,
                    bins: int = 20, strict: bool = False, info: dict[str, Any] | None = None) -> Any:
    """Random neurons matched to ``mask`` on layer AND activity: for every layer and activity
    stratum (`activity_strata`), as many neurons as the real set has there, drawn uniformly from
    the stratum's neurons outside ``exclude`` (pass the real set).

    Why: the selected neurons fire far more often than a random neuron of their layer (p > τ by
    construction), and a neuron that fires a lot often matters for every language. A control
    matched only on per-layer counts then makes "busy" look like "language"; this one asks
    whether the real set hurts more than equally busy neurons of the same layers.

    A stratum with fewer candidates than needed is never filled silently: ``strict=True`` raises
    `NeuronMapError` naming the layer, stratum and numbers; otherwise the missing neurons are the
    not-excluded neurons of the same layer with the nearest activity (ties broken at random), a
    `UserWarning` gives the numbers, and ``info["shortfall"]`` lists them. ``info`` (optional
    dict) also receives the mean activity of the real set and of the control, so the quality of
    the match is on record. Returns the same kind as ``mask`` (like `random_control`).
    Reproducible: one seeded `torch.Generator`, layers and strata in order.
    """
    is_bool = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    act = torch.as_tensor(activity).detach().cpu().double()
    if act.dim() != 2:
        raise LangNeuronsError(f"activity must be [layers, neurons], got shape {list(act.shape)}")
    L, N = int(act.shape[0]), int(act.shape[1])
    if is_bool and tuple(mask.shape) != (L, N):  # type: ignore[union-attr]
        raise NeuronMapError(f"the mask is {list(mask.shape)} but the activity is {[L, N]}; "  # type: ignore[union-attr]
                             "they were made for different models")
    indices = as_indices(mask, L, N)
    excluded = as_indices(exclude, L, N) if exclude is not None else [torch.empty(0, dtype=torch.int64)] * L
    strata = activity_strata(act, bins)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor] = []
    shortfall: list[dict[str, Any]] = []
    for layer in range(L):
        idx = indices[layer]
        allowed = torch.ones(N, dtype=torch.bool)
        allowed[excluded[layer]] = False
        chosen: list[torch.Tensor] = []
        need_extra = 0
        if idx.numel():
            s_real = strata[layer, idx]
            for s in torch.unique(s_real).tolist():
                count = int((s_real == s).sum())
                pool = (allowed & (strata[layer] == s)).nonzero().flatten()
                take = pool[torch.randperm(pool.numel(), generator=gen)[:count]]
                allowed[take] = False
                chosen.append(take)
                if count > pool.numel():
                    lo = float(act[layer, strata[layer] == s].min())
                    hi = float(act[layer, strata[layer] == s].max())
                    shortfall.append({"layer": layer, "stratum": int(s), "needed": count, "available": int(pool.numel()),
                                      "activity_range": [round(lo, 4), round(hi, 4)]})
                    need_extra += count - int(pool.numel())
        if need_extra:
            if strict:
                sf = [x for x in shortfall if x["layer"] == layer]
                raise NeuronMapError(
                    f"layer {layer}: activity stratum {sf[0]['stratum']} (activity {sf[0]['activity_range'][0]:.3g}-"
                    f"{sf[0]['activity_range'][1]:.3g}) needs {sf[0]['needed']} control neurons but has only "
                    f"{sf[0]['available']} outside the real set; use fewer control bins or strict=False")
            pool = allowed.nonzero().flatten()
            if pool.numel() < need_extra:
                raise NeuronMapError(f"layer {layer}: cannot draw {idx.numel()} matched control neurons, only "
                                     f"{int(idx.numel()) - need_extra + pool.numel()} are outside the real set; "
                                     "use control='layer' with strict=False for sets covering most of a layer")
            # nearest activity to the real neurons left unmatched (their mean), random tie order
            target = float(act[layer, idx].mean())
            jitter = torch.rand(pool.numel(), generator=gen, dtype=torch.float64) * 1e-12
            dist = (act[layer, pool] - target).abs() + jitter
            chosen.append(pool[torch.argsort(dist)[:need_extra]])
        picked = torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.int64)
        out.append(picked)
    if shortfall:
        total = sum(x["needed"] - x["available"] for x in shortfall)
        first = shortfall[0]
        warnings.warn(f"matched control: {len(shortfall)} activity stratum/strata had too few neurons outside the "
                      f"real set ({total} neuron(s) short; e.g. layer {first['layer']} needs {first['needed']}, has "
                      f"{first['available']}); the missing ones are the nearest-activity neurons of the same layer",
                      stacklevel=2)
    if info is not None:
        real_act = torch.cat([act[layer, i] for layer, i in enumerate(indices)])
        ctrl_act = torch.cat([act[layer, i] for layer, i in enumerate(out)])
        info.update(bins=bins, shortfall=shortfall,
                    activity_real=float(real_act.mean()) if real_act.numel() else float("nan"),
                    activity_control=float(ctrl_act.mean()) if ctrl_act.numel() else float("nan"))
    if is_bool:
        result = torch.zeros(L, N, dtype=torch.bool)
        for layer, idx in enumerate(out):
            result[layer, idx] = True
        return result
    return out
