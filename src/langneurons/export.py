"""Neuron sets in the formats other tools read.

* ``lape`` -- LAPE's ``List[K][L]`` of sorted index tensors (`neurons.save_lape`).
* ``njunlp`` -- the arXiv:2505.21505 authors' mask file: the same ``List[K][L]`` layout, holding
  every *selected* neuron in each language where it is active (their ``identify.py`` output,
  ``activation_masks/<dataset>/<rate>-<lambda>/mask.<Model>``), plus ``<out>.languages.json``
  since their file does not name its languages (they come from the code's language table).
* ``pruned-model`` -- a copy of the model whose down-projection *columns* of the neuron set are
  zero.  The down projection is linear, ``y = W a (+ b)``, so a zero column removes exactly the
  neuron's contribution, as zeroing the activation does: every tool that loads a Hugging Face
  model (vLLM, lm-eval, TGI) then evaluates the ablated model without langneurons' hooks.
* ``lm-eval-steer`` -- lm-eval's ``steered`` model file (``--model steered --model_args
  steer_path=FILE.pt``): ``{hookpoint: {"action", "steering_vector", "steering_coefficient",
  "bias", "head_index"}}``, hookpoints named relative to ``model.base_model``.  Its two actions
  are ``add`` (a vector added at every position) and ``clamp`` (ONE direction per hookpoint set
  to a value), so it can express adding a value to a neuron set, but not zeroing or scaling
  several neurons of one layer: use ``pruned-model`` or ``lm_eval --model langneurons`` for that.
* ``parquet`` -- one row per classified or selected neuron: layer, neuron, class, languages,
  selected, score (and the map's per-neuron extras such as stability frequencies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import LangNeuronsError, NeuronMapError
from .io import atomic_write, atomic_write_text

FORMATS = ("lape", "njunlp", "pruned-model", "lm-eval-steer", "parquet")
#: the module that reads the MLP activation, per family (relative to a layer), and whether its
#: weight is [out, in] (nn.Linear: zero a column) or [in, out] (GPT-2's Conv1D: zero a row)
DOWN_PROJECTIONS: dict[str, tuple[str, bool]] = {
    "gpt2": ("mlp.c_proj", False), "gpt_neox": ("mlp.dense_4h_to_h", True), "bloom": ("mlp.dense_4h_to_h", True),
    "opt": ("fc2", True),
}
_DEFAULT_DOWN = ("mlp.down_proj", True)  # Llama, Mistral, Qwen, Gemma, Phi-3, unregistered Llama-style


def default_classes(fmt: str) -> str:
    return "selected" if fmt == "njunlp" else "specific,related"


def neuron_set(nmap: Any, classes: str, langs: Sequence[str] | None = None) -> torch.Tensor:
    """bool [L, N]: the union over ``langs`` (default: all of the map's) of their neurons of ``classes``."""
    from .neurons import SELECTED, parse_classes

    names = [c.strip() for c in classes.split(",") if c.strip()]
    langs = list(langs or nmap.languages)
    out = torch.zeros_like(nmap.selected)
    for lang in langs:
        if lang not in nmap.languages:
            raise NeuronMapError(f"language {lang!r} is not in the neuron map ({','.join(nmap.languages)})")
        k = nmap.languages.index(lang)
        if SELECTED in names:
            out |= nmap.selected & nmap.active[k]
        rest = [n for n in names if n != SELECTED]
        if rest:
            out |= nmap.language_mask(lang, parse_classes(rest))
    return out


# -- tables ----------------------------------------------------------------------------------------
def neuron_table(nmap: Any) -> Any:
    """pandas DataFrame of every classified or selected neuron (the parquet export)."""
    import pandas as pd

    from .neurons import CLASS_NAMES, NONE

    keep = (nmap.classes != NONE) | nmap.selected
    layer, neuron = keep.nonzero(as_tuple=True)
    active = nmap.active[:, layer, neuron]  # [K, M]
    langs = [[nmap.languages[k] for k in col.nonzero().flatten().tolist()] for col in active.T]
    data: dict[str, Any] = {
        "layer": layer.to(torch.int32).numpy(), "neuron": neuron.to(torch.int32).numpy(),
        "class": [CLASS_NAMES[c] for c in nmap.classes[layer, neuron].tolist()],
        "languages": langs, "selected": nmap.selected[layer, neuron].numpy(),
        "score": (nmap.scores[layer, neuron].to(torch.float32).numpy() if nmap.scores is not None
                  else [None] * len(langs)),
    }
    for name, t in sorted(nmap.extras.items()):
        if tuple(t.shape) == tuple(nmap.classes.shape):
            data[name] = t[layer, neuron].to(torch.float32).numpy()
    return pd.DataFrame(data)


def save_parquet(nmap: Any, out: Path) -> Path:
    table = neuron_table(nmap)
    return atomic_write(out, lambda p: table.to_parquet(p, index=False))


def save_njunlp(nmap: Any, classes: str, out: Path) -> Path:
    from .neurons import mask_to_indices

    base = neuron_set(nmap, classes) if classes != "selected" else nmap.selected
    obj = [mask_to_indices(base & nmap.active[k]) for k in range(nmap.K)]
    atomic_write(out, lambda p: torch.save(obj, p))
    atomic_write_text(Path(str(out) + ".languages.json"), json.dumps(nmap.languages) + "\n")
    return out


# -- model-based exports -----------------------------------------------------------------------------
def _layer_template(hook_point: str) -> str:
    head, sep, _ = hook_point.partition("{i}")
    if not sep:
        raise LangNeuronsError(f"hook point {hook_point!r} has no {{i}}")
    return head + "{i}"


def down_projection(model: Any, sites: Any, layer: int) -> tuple[torch.nn.Module, bool]:
    """The module that reads layer ``layer``'s activation, and whether its weight is [out, in]."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    path, linear = DOWN_PROJECTIONS.get(model_type, _DEFAULT_DOWN)
    module = model.get_submodule(_layer_template(sites.hook_point).format(i=layer) + "." + path)
    width = module.weight.shape[1 if linear else 0]
    if width != sites.num_neurons:
        raise LangNeuronsError(f"{path} of layer {layer} reads {width} inputs, not the {sites.num_neurons} neurons; "
                               "the pruned-model export does not know this family's down projection")
    return module, linear


def prune_down_projections(model: Any, mask: torch.Tensor, act_path: str | None = None) -> int:
    """Zero the down-projection inputs of ``mask`` (bool [L, N]) in place; returns how many."""
    from .arch import locate_activations

    sites = locate_activations(model, act_path)
    sites.check_mask_shape(*mask.shape, what="the neuron set")
    with torch.no_grad():
        for layer in mask.any(dim=1).nonzero().flatten().tolist():
            module, linear = down_projection(model, sites, layer)
            idx = mask[layer].nonzero().flatten().to(module.weight.device)
            if linear:
                module.weight[:, idx] = 0
            else:
                module.weight[idx, :] = 0
    return int(mask.sum())


def save_pruned_model(loaded: Any, mask: torch.Tensor, out: Path, provenance: dict[str, Any],
                      act_path: str | None = None) -> Path:
    """Write a pruned copy of ``loaded`` (a `models.LoadedModel`) to the directory ``out``."""
    import shutil
    import tempfile

    count = prune_down_projections(loaded.model, mask, act_path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        info = dict(provenance, pruned_neurons=count, per_layer=mask.sum(dim=1).tolist(),
                    method="down-projection inputs zeroed (= activation zeroed at every position)")
        (staging / "langneurons-pruned.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def steer_config(hook_point: str, mask: torch.Tensor, value: float) -> dict[str, dict[str, Any]]:
    """lm-eval's steered-model dict: add ``value`` to every neuron of ``mask`` at every position."""
    # lm-eval resolves hookpoints in model.base_model.named_modules(): drop the wrapper's prefix
    relative = hook_point.split(".", 1)[1] if hook_point.split(".", 1)[0] in ("model", "transformer", "gpt_neox") \
        else hook_point
    out: dict[str, dict[str, Any]] = {}
    for layer in mask.any(dim=1).nonzero().flatten().tolist():
        vector = torch.zeros(mask.shape[1], dtype=torch.float32)
        vector[mask[layer]] = float(value)
        out[relative.format(i=layer)] = {"action": "add", "steering_vector": vector, "steering_coefficient": 1.0,
                                         "bias": None, "head_index": None}
    return out


def save_steer(hook_point: str, mask: torch.Tensor, value: float, out: Path) -> Path:
    if Path(out).suffix not in (".pt", ".pth"):
        raise LangNeuronsError(f"lm-eval's steered model reads .pt/.pth files; name the output *.pt, not {out}")
    cfg = steer_config(hook_point, mask, value)
    return atomic_write(out, lambda p: torch.save(cfg, p))


# -- the one entry point of `langneurons export` -----------------------------------------------------
def export(neurons: Path, fmt: str, out: Path, *, classes: str | None = None, langs: Sequence[str] | None = None,
           value: float = 1.0, model: Any = None) -> str:
    """Export the neuron map at ``neurons`` (file or run dir); returns a one-line summary.
    ``model`` is a `config.ModelConfig` (pruned-model: default the run's model)."""
    from .neurons import NeuronMap, save_lape

    if fmt not in FORMATS:
        raise LangNeuronsError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    nmap = NeuronMap.load(neurons)
    classes = classes or default_classes(fmt)
    if fmt == "lape":
        save_lape(nmap, classes, out)
        counts = ", ".join(f"{lang}:{int(c)}" for lang, c in
                           zip(nmap.languages, (neuron_set(nmap, classes, [x]).sum() for x in nmap.languages)))
        return f"wrote {out} ({classes}; {counts})"
    if fmt == "njunlp":
        save_njunlp(nmap, classes, out)
        return f"wrote {out} and {out}.languages.json (the authors' mask layout, {classes})"
    if fmt == "parquet":
        save_parquet(nmap, out)
        return f"wrote {out} ({len(neuron_table(nmap))} neurons)"
    mask = neuron_set(nmap, classes, langs)
    what = f"{int(mask.sum())} neurons ({classes} of {','.join(langs or nmap.languages)})"
    if fmt == "lm-eval-steer":
        hook = nmap.meta.get("hook_point") or _run_hook_point(neurons)
        save_steer(hook, mask, value, out)
        return f"wrote {out}: add {value:g} to {what}; use lm_eval --model steered --model_args steer_path={out}"
    from .config import ModelConfig

    cfg = (model or ModelConfig()).validate()
    loaded = cfg.load(_run_manifest(neurons))
    nmap.check_fits(*_shape(loaded.model, cfg.act_path))
    save_pruned_model(loaded, mask, out, {"source_model": loaded.source, "revision": loaded.revision,
                                          "neuron_map": nmap.fingerprint(), "classes": classes,
                                          "languages": list(langs or nmap.languages)}, cfg.act_path)
    return f"wrote {out}: {loaded.source} with {what} pruned (down-projection inputs zeroed)"


def _shape(model: Any, act_path: str | None) -> tuple[int, int]:
    from .arch import locate_activations

    sites = locate_activations(model, act_path)
    return sites.num_layers, sites.num_neurons


def _run_dir(neurons: Path) -> Path:
    neurons = Path(neurons)
    return neurons if neurons.is_dir() else neurons.parent


def _run_manifest(neurons: Path) -> dict[str, Any]:
    path = _run_dir(neurons) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _run_hook_point(neurons: Path) -> str:
    hook = (_run_manifest(neurons).get("model") or {}).get("hook_point")
    if not hook:
        raise LangNeuronsError(f"the neuron map {neurons} does not say where its neurons live (no hook_point in its "
                               "metadata or its run's manifest); export it from the run directory")
    return hook
