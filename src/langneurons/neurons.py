"""NeuronMap: which neurons were selected, their class and their languages.

Classes (int8 codes in ``classes`` [L, N]):

* ``specific``   selected and active (p > τ) in exactly one language;
* ``related``    selected and active in 2..K-1 languages;
* ``general``    active in all K languages (selected or not);
* ``unassigned`` selected but active in no language (reported, never ablated);
* ``none``       everything else.

``active`` [K, L, N] holds the language set of every selected or general neuron (False
elsewhere). Masks for interventions come from `NeuronMap.masks`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import NeuronMapError
from .io import atomic_write, torch_load_tensors

CLASS_NAMES = ("none", "specific", "related", "general", "unassigned")
CLASS_CODE = {name: code for code, name in enumerate(CLASS_NAMES)}
NONE, SPECIFIC, RELATED, GENERAL, UNASSIGNED = range(5)
#: the classes that are counted and reported (every class but "none")
COUNTED_CLASSES = ("specific", "related", "general", "unassigned")
#: the classes that have languages (what masks and ablations are built from)
LANGUAGE_CLASSES = ("specific", "related", "general")
#: the neuron sets an ablation deactivates by default (comma lists of LANGUAGE_CLASSES)
from .config import DEFAULT_SETS  # noqa: E402,F401 - defined with the configs (no torch needed there)

#: one language's mask: for each layer, the sorted neuron indices
LayerMask = list[torch.Tensor]


def class_codes(selected: torch.Tensor, n_active: torch.Tensor, num_languages: int) -> torch.Tensor:
    """int8 [L, N] class codes from the selection and the number of active languages: the class
    rule of the module docstring (`identify.classify` is this function)."""
    classes = torch.zeros(selected.shape, dtype=torch.int8)
    classes[selected & (n_active == 1)] = SPECIFIC
    classes[selected & (n_active >= 2) & (n_active <= num_languages - 1)] = RELATED
    classes[selected & (n_active == 0)] = UNASSIGNED
    classes[n_active == num_languages] = GENERAL  # any neuron, selected or not
    return classes


def parse_classes(spec: str | Sequence[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in LANGUAGE_CLASSES]
    if bad or not names:
        raise NeuronMapError(f"unknown neuron class(es) {bad or spec!r}; use a comma list of specific,related,general")
    return tuple(names)


@dataclass
class NeuronMap:
    languages: list[str]
    classes: torch.Tensor  # int8 [L, N]
    active: torch.Tensor  # bool [K, L, N]
    selected: torch.Tensor  # bool [L, N]
    scores: torch.Tensor | None = None  # float32 [L, N]: the selection score (lower = more language-specific)
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. stability frequencies

    @property
    def num_layers(self) -> int:
        return int(self.classes.shape[0])

    @property
    def num_neurons(self) -> int:
        return int(self.classes.shape[1])

    @property
    def K(self) -> int:
        return len(self.languages)

    def class_mask(self, classes: Iterable[str]) -> torch.Tensor:
        """bool [L, N]: neurons of any of the given classes."""
        out = torch.zeros_like(self.selected)
        for c in classes:
            out |= self.classes == CLASS_CODE[c]
        return out

    def language_mask(self, lang: str, classes: Iterable[str] = ("specific", "related")) -> torch.Tensor:
        """bool [L, N]: neurons of the given classes that belong to ``lang``."""
        if lang not in self.languages:
            raise NeuronMapError(f"language {lang!r} is not in the neuron map ({','.join(self.languages)})")
        return self.class_mask(classes) & self.active[self.languages.index(lang)]

    def masks(self, classes: Iterable[str] = ("specific", "related")) -> dict[str, LayerMask]:
        """``{lang: [layer -> sorted LongTensor of neuron indices]}`` for every language
        (a language with no neurons keeps its slot, with empty tensors)."""
        classes = tuple(classes)
        return {lang: mask_to_indices(self.language_mask(lang, classes)) for lang in self.languages}

    def class_counts(self) -> torch.Tensor:
        """int64 [5]: number of neurons per class code (one pass over ``classes``)."""
        return torch.bincount(self.classes.reshape(-1).to(torch.int64), minlength=len(CLASS_NAMES))[:len(CLASS_NAMES)]

    def counts_per_layer(self) -> dict[str, list[int]]:
        L = self.num_layers
        codes = self.classes.to(torch.int64) + len(CLASS_NAMES) * torch.arange(L).view(L, 1)
        per = torch.bincount(codes.reshape(-1), minlength=L * len(CLASS_NAMES)).view(L, len(CLASS_NAMES))
        return {name: per[:, CLASS_CODE[name]].tolist() for name in COUNTED_CLASSES}

    def class_counts_per_language(self) -> torch.Tensor:
        """int64 [K, 5]: per language, its neurons (``active[k]``) per class code ("none" is
        counted only for neurons that are selected; other unclassified neurons are skipped).

        Only the classified or selected neurons are visited (a few percent of L·N), instead of
        3·K full-size tensor ops."""
        K, C = self.K, len(CLASS_NAMES)
        keep = torch.nonzero((self.classes != NONE).reshape(-1) | self.selected.reshape(-1)).flatten()
        lang, pos = self.active.reshape(K, -1)[:, keep].nonzero(as_tuple=True)
        codes = self.classes.reshape(-1)[keep].to(torch.int64)[pos]
        return torch.bincount(lang * C + codes, minlength=K * C).view(K, C)

    def counts_per_language(self) -> dict[str, dict[str, int]]:
        table = self.class_counts_per_language().tolist()
        return {lang: {name: int(table[k][CLASS_CODE[name]]) for name in LANGUAGE_CLASSES}
                for k, lang in enumerate(self.languages)}

    def appear(self) -> list[int]:
        """appear[c] = number of selected neurons active in exactly c languages, c = 0..K."""
        idx = torch.nonzero(self.selected.reshape(-1)).flatten()
        n_act = self.active.reshape(self.K, -1)[:, idx].sum(0)
        return torch.bincount(n_act, minlength=self.K + 1).tolist()

    def summary(self) -> dict[str, Any]:
        totals = self.class_counts().tolist()
        return {"selected": int(self.selected.sum()), "appear": self.appear(),
                "totals": {n: int(totals[CLASS_CODE[n]]) for n in COUNTED_CLASSES},
                "per_language": self.counts_per_language()}

    def check_fits(self, num_layers: int, num_neurons: int, what: str = "the model") -> None:
        if (num_layers, num_neurons) != (self.num_layers, self.num_neurons):
            raise NeuronMapError(f"the neuron map is {self.num_layers} layers x {self.num_neurons} neurons but "
                                 f"{what} has {num_layers} x {num_neurons}; it was made for another model")

    def fingerprint(self) -> str:
        """sha256 of what an intervention uses (languages, classes, active, selected): the same
        for a map saved again with other metadata or stability extras, so results computed
        with it stay current."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.languages, ensure_ascii=False).encode("utf-8"))
        for t in (self.classes.to(torch.int8), self.active.to(torch.bool), self.selected.to(torch.bool)):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        tensors = {"classes": self.classes.to(torch.int8).contiguous(),
                   "active": self.active.to(torch.bool).contiguous(),
                   "selected": self.selected.to(torch.bool).contiguous()}
        if self.scores is not None:
            tensors["scores"] = self.scores.to(torch.float32).contiguous()
        for k, v in self.extras.items():
            tensors[f"extra.{k}"] = v.contiguous()
        meta = dict(self.meta, languages=self.languages)
        blob = {"langneurons": json.dumps(meta, ensure_ascii=False, default=str)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=blob))

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "NeuronMap":
        """Read a map (a file, a run directory or a `langneurons package` folder). With ``model``
        (an nn.Module or a `models.LoadedModel`) a map made for another model shape is refused
        with one line, before any intervention could use it."""
        if model is not None:
            out = cls.load(path)
            from .arch import locate_activations

            is_loaded = hasattr(model, "tokenizer") and hasattr(model, "fingerprint")  # a models.LoadedModel
            sites = locate_activations(model.model if is_loaded else model)
            made_for = out.meta.get("model") or "another model"
            out.check_fits(sites.num_layers, sites.num_neurons,
                           what=f"this model (the map was made for {made_for})")
            return out
        path = Path(path)
        if path.is_dir():
            path = path / "neurons.safetensors"
        if not path.is_file():
            raise NeuronMapError(f"neuron map {path} does not exist; run `langneurons identify` first")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("langneurons", "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise NeuronMapError(f"neuron map {path} is unreadable or truncated ({exc}); run identify again") from None
        for key in ("classes", "active", "selected"):
            if key not in tensors:
                raise NeuronMapError(f"{path} is not a langneurons neuron map (no '{key}' tensor)")
        languages = list(meta.pop("languages", []))
        if len(languages) != tensors["active"].shape[0]:
            raise NeuronMapError(f"{path}: metadata lists {len(languages)} languages but masks have "
                                 f"{tensors['active'].shape[0]}")
        extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        out = cls(languages, tensors["classes"], tensors["active"], tensors["selected"], tensors.get("scores"),
                  meta, extras)
        problem = out.invariant_violation()
        if problem:
            raise NeuronMapError(f"neuron map {path} is damaged or was edited: {problem}; run `langneurons identify` "
                                 "again")
        return out

    def invariant_violation(self) -> str | None:
        """What is wrong with this map, or None: shapes and dtypes agree ([L, N], [K, L, N]),
        class codes are known, every class follows from ``selected`` and the number of active
        languages (the rule of the module docstring), ``active`` is set only for selected or
        general neurons, and scores are never NaN or -inf (+inf: LAPE's excluded neurons, never
        selected). A byte flip or a hand edit breaks one of these; a consistent map cannot."""
        classes, active, selected, scores = self.classes, self.active, self.selected, self.scores
        if classes.dim() != 2 or classes.dtype.is_floating_point or classes.dtype == torch.bool:
            return f"'classes' must be an integer [layers, neurons] tensor, got {classes.dtype} {tuple(classes.shape)}"
        shape = tuple(classes.shape)
        if selected.dtype != torch.bool or tuple(selected.shape) != shape:
            return f"'selected' has shape {tuple(selected.shape)} ({selected.dtype}), expected {shape} (bool)"
        if active.dtype != torch.bool or tuple(active.shape) != (self.K, *shape):
            return f"'active' has shape {tuple(active.shape)} ({active.dtype}), expected {(self.K, *shape)} (bool)"
        if len(set(self.languages)) != self.K or self.K < 1:
            return f"languages {self.languages} are empty or repeated"
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= len(CLASS_NAMES)):
            return f"class codes outside 0..{len(CLASS_NAMES) - 1} ({int(classes.min())}..{int(classes.max())})"
        n_active = active.sum(0)
        expected = class_codes(selected, n_active, self.K)
        wrong = classes.to(torch.int8) != expected
        if bool(wrong.any()):
            layer, neuron = (int(x) for x in wrong.nonzero()[0])
            return (f"{int(wrong.sum())} neuron(s) have a class that disagrees with 'selected' and 'active' (first: "
                    f"layer {layer}, neuron {neuron}: stored {CLASS_NAMES[int(classes[layer, neuron])]}, the rule gives "
                    f"{CLASS_NAMES[int(expected[layer, neuron])]})")
        stray = active.any(0) & ~(selected | (n_active == self.K))
        if bool(stray.any()):
            return f"{int(stray.sum())} neuron(s) are neither selected nor general but have languages in 'active'"
        if scores is not None:
            if tuple(scores.shape) != shape or not scores.dtype.is_floating_point:
                return f"'scores' has shape {tuple(scores.shape)} ({scores.dtype}), expected {shape} (float)"
            if bool(torch.isnan(scores).any()) or bool((scores == -math.inf).any()):
                return "'scores' contain NaN or -inf"
            if bool((selected & (scores == math.inf)).any()):
                return "'scores' are +inf for selected neurons"
        return None


def mask_to_indices(mask: torch.Tensor) -> LayerMask:
    """bool [L, N] -> per-layer sorted int64 index tensors."""
    return [row.nonzero().flatten().to(torch.int64) for row in mask]


def indices_to_mask(indices: Sequence[torch.Tensor], num_neurons: int) -> torch.Tensor:
    mask = torch.zeros(len(indices), num_neurons, dtype=torch.bool)
    for layer, idx in enumerate(indices):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_neurons):
            raise NeuronMapError(f"layer {layer}: neuron index out of range [0, {num_neurons})")
        mask[layer, idx] = True
    return mask


# -- interop with the published LAPE list format ---------------------------------------------
#: pseudo-class for `to_lape`: every selected neuron in each language where it is active --
#: exactly the mask files the published codes write (LAPE also lists selected neurons that are
#: active in all K languages; those are "general" here).
SELECTED = "selected"

#: the published mask format: for each language (in order), for each layer, sorted neuron indices
LapeMask = list[list[torch.Tensor]]


def _lape_base_mask(nmap: NeuronMap, classes: str | Sequence[str]) -> torch.Tensor:
    names = [s.strip() for s in (classes.split(",") if isinstance(classes, str) else classes) if s.strip()]
    base = torch.zeros_like(nmap.selected)
    if SELECTED in names:
        base |= nmap.selected
        names = [n for n in names if n != SELECTED]
        if not names:
            return base
    try:
        return base | nmap.class_mask(parse_classes(names))
    except NeuronMapError:
        raise NeuronMapError(f"unknown neuron class(es) in {classes!r}; use a comma list of "
                             "specific,related,general or 'selected' (the published mask)") from None


def to_lape(nmap: NeuronMap, classes: str | Sequence[str] = ("specific", "related")) -> LapeMask:
    """``List[K][L]`` of sorted int64 index tensors in ``nmap.languages`` order.

    ``classes``: any of specific, related, general, or ``selected`` (every selected neuron in
    its active languages, the published files' content). A language without neurons keeps its
    slot (L empty tensors) -- the published LAPE code drops trailing empty languages.
    """
    base = _lape_base_mask(nmap, classes)
    return [mask_to_indices(base & nmap.active[k]) for k in range(nmap.K)]


def save_lape(nmap: NeuronMap, classes: str | Sequence[str], path: str | Path) -> Path:
    """Write `to_lape` with ``torch.save`` (atomic); loadable with ``torch.load(weights_only=True)``."""
    obj = to_lape(nmap, classes)
    return atomic_write(path, lambda p: torch.save(obj, p))


def from_lape(obj: Any, languages: Sequence[str], num_neurons: int,
              meta: dict[str, Any] | None = None) -> NeuronMap:
    """Build a NeuronMap from the published list format ``List[K][L]`` of index tensors.

    A neuron's class comes from how many languages list it: 1 -> specific, 2..K-1 -> related,
    K -> general; selected = listed anywhere.

    langneurons has ONE meaning of *general*: active (p > τ) in all K languages, among ALL
    neurons (docs/identify.md). A list file carries no τ and no unselected neurons, so the
    general class of an imported map is incomplete: the map's meta says
    ``general_available: False``, and anatomy, compare and the report show general counts as
    not available instead of a misleading 0. `complete_general` fills it from the run's stats.
    """
    languages = list(languages)
    num_languages = len(languages)
    if num_languages < 1:
        raise NeuronMapError("give the languages of the mask file in order (e.g. --langs en,zh,fr)")
    if len(set(languages)) != num_languages:
        raise NeuronMapError(f"duplicate languages: {languages}")
    if not isinstance(obj, (list, tuple)) or not obj or not all(isinstance(x, (list, tuple)) for x in obj):
        raise NeuronMapError("not a LAPE neuron file: expected a list (one per language) of lists "
                             "(one per layer) of index tensors")
    if len(obj) > num_languages:
        raise NeuronMapError(f"the file has {len(obj)} language slots but {num_languages} languages were given "
                             f"({','.join(languages)}); give all languages in the file's order")
    num_layers = len(obj[0])
    if num_layers == 0 or any(len(x) != num_layers for x in obj):
        raise NeuronMapError(f"the language slots list different numbers of layers ({[len(x) for x in obj]}); "
                             "the file is not in the LAPE format")
    if int(num_neurons) < 1:
        raise NeuronMapError(f"--num-neurons must be >= 1, got {num_neurons}")
    if len(obj) < num_languages:
        dropped = languages[len(obj):]
        warnings.warn(f"the file has {len(obj)} language slots for {num_languages} languages; LAPE's published "
                      f"code drops trailing languages that got no neurons, so {','.join(dropped)} are taken as empty",
                      stacklevel=2)
    masks = []
    for slot in obj:
        layers = []
        for idx in slot:
            try:
                t = torch.as_tensor(idx)
            except (TypeError, ValueError, RuntimeError):
                raise NeuronMapError("not a LAPE neuron file: a layer entry is not a tensor of indices") from None
            if t.numel() and (t.dtype.is_floating_point and bool((t != t.round()).any())):
                raise NeuronMapError("not a LAPE neuron file: neuron indices must be integers")
            layers.append(t.reshape(-1).to(torch.int64))
        masks.append(indices_to_mask(layers, int(num_neurons)))
    while len(masks) < num_languages:
        masks.append(torch.zeros(num_layers, int(num_neurons), dtype=torch.bool))
    active = torch.stack(masks)
    count = active.sum(0)
    classes = torch.zeros(num_layers, int(num_neurons), dtype=torch.int8)
    classes[count == 1] = SPECIFIC
    classes[(count >= 2) & (count <= num_languages - 1)] = RELATED
    classes[count == num_languages] = GENERAL
    selected = count > 0
    appear = torch.bincount(count[selected].flatten(), minlength=num_languages + 1).tolist()
    info: dict[str, Any] = {
        "method": "imported-lape", "params": {}, "tau": None, "lambda": None, "lambda_trace": [],
        "lambda_saturated": False, "appear": appear, "num_selected": int(selected.sum()),
        "num_unassigned": 0,
        "general_available": False,
        "note": "imported from a LAPE-format list: general neurons among the unselected ones are unknown "
                "(give --stats RUN to compute them)",
    }
    info.update(meta or {})
    return NeuronMap(languages, classes, active, selected, None, info)


def complete_general(nmap: NeuronMap, stats: Any, bar: float = 0.95) -> NeuronMap:
    """Make an imported map's general class mean what it means everywhere else: every neuron
    (selected or not) active in all K languages of ``stats``, with τ from ``bar`` as `identify`
    computes it. Specific/related classes of the listed neurons are kept."""
    from .identify import activation_probs, activation_threshold

    if list(stats.languages) != list(nmap.languages):
        stats = stats.subset(nmap.languages)
    if (stats.num_layers, stats.num_neurons) != (nmap.num_layers, nmap.num_neurons):
        raise NeuronMapError(f"the stats are {stats.num_layers} x {stats.num_neurons} but the map is "
                             f"{nmap.num_layers} x {nmap.num_neurons}; they are of different models")
    from .moe import is_moe_stats, neuron_probs

    if is_moe_stats(stats):  # p over the tokens routed to the neuron's expert; τ from observed values
        probs, observed = neuron_probs(stats)
        tau = activation_threshold(probs[observed], bar)
        all_active = ((probs > tau) & observed).all(0)
    else:
        probs = activation_probs(stats)
        tau = activation_threshold(probs, bar)
        all_active = (probs > tau).all(0)
    classes = nmap.classes.clone()
    classes[(classes == GENERAL) & ~all_active] = RELATED  # listed for every language, not active in all
    classes[all_active & ~((classes == SPECIFIC) | (classes == RELATED))] = GENERAL
    meta = dict(nmap.meta, general_available=True, tau=float(tau), params={**(nmap.meta.get("params") or {}), "bar": bar},
                note="imported from a LAPE-format list; general = active in all languages among all neurons "
                     "(from the run's stats)")
    return NeuronMap(nmap.languages, classes, nmap.active, nmap.selected, nmap.scores, meta, dict(nmap.extras))


def load_lape(path: str | Path, languages: Sequence[str], num_neurons: int,
              meta: dict[str, Any] | None = None) -> NeuronMap:
    """Read a published neuron file (``torch.load(weights_only=True)`` only) into a NeuronMap."""
    path = Path(path)
    if not path.is_file():
        raise NeuronMapError(f"mask file {path} does not exist")
    obj = torch_load_tensors(path, NeuronMapError)  # arbitrary pickles are refused on purpose
    return from_lape(obj, languages, num_neurons, {"source_file": str(path), **(meta or {})})
