"""Where the MLP activation of each architecture lives.

The neuron (l, n) is coordinate n of the MLP's intermediate activation in layer l:
``act_fn(gate_proj(x))[n]`` for gated MLPs and ``act(fc1(x))[n]`` for plain ones. In every
supported family the activation function is its own ``nn.Module`` per layer, so one forward
hook on that module sees exactly the activation (recording) and can replace it
(interventions): zeroing it zeroes the neuron's contribution to the down projection.
Phi-3's fused ``gate_up_proj`` needs no special case: its ``activation_fn`` is applied to the
gate half only, so hooking it yields the gate activation.

Adding a family is a table entry (`register_architecture`), or a one-off path template
(``act_path="model.layers.{i}.mlp.act_fn"``, CLI ``--mlp-act-path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ArchitectureError


@dataclass(frozen=True)
class MlpArchitecture:
    """Where one family keeps its layers and, inside a layer, its MLP activation."""

    family: str
    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...]  # candidates, relative to the top-level model
    act_path: str  # relative to a layer
    size_path: str  # relative to a layer; an int attribute giving N
    activation: str  # documentation: which nonlinearity (all are > 0 iff input > 0)
    # the final norm applied to the last residual before the unembedding (logit lens); candidates
    # relative to the top-level model; () = the family has none
    final_norm_paths: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()  # attention + MLP projections for LoRA (empty: PEFT "all-linear")


_REGISTRY: dict[str, MlpArchitecture] = {}


def register_architecture(arch: MlpArchitecture) -> None:
    """Teach langneurons a new family (model_type -> where the activation lives)."""
    for mt in arch.model_types:
        _REGISTRY[mt] = arch


_GATED_LAYERS = ("model.layers", "model.language_model.layers", "language_model.model.layers")
_GATED_NORMS = ("model.norm", "model.language_model.norm", "language_model.model.norm")
_GATED_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEOX_LORA = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
for _fam, _types, _act in [
    ("llama", ("llama",), "silu"),
    ("mistral", ("mistral",), "silu"),
    ("qwen2", ("qwen2",), "silu"),
    ("qwen3", ("qwen3",), "silu"),
    ("gemma", ("gemma",), "gelu"),
    ("gemma2", ("gemma2",), "gelu-tanh"),
    ("gemma3", ("gemma3", "gemma3_text"), "gelu-tanh"),
]:
    register_architecture(MlpArchitecture(_fam, _types, _GATED_LAYERS, "mlp.act_fn", "mlp.gate_proj.out_features", _act,
                                          _GATED_NORMS, _GATED_LORA))
register_architecture(MlpArchitecture("phi3", ("phi3",), ("model.layers",), "mlp.activation_fn",
                                      "mlp.down_proj.in_features", "silu (gate half of gate_up_proj)", ("model.norm",),
                                      ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")))
register_architecture(MlpArchitecture("gpt2", ("gpt2",), ("transformer.h",), "mlp.act", "mlp.c_fc.nf", "gelu_new",
                                      ("transformer.ln_f",), ("c_attn", "c_proj", "c_fc")))
register_architecture(MlpArchitecture("gpt_neox", ("gpt_neox",), ("gpt_neox.layers",), "mlp.act",
                                      "mlp.dense_h_to_4h.out_features", "gelu", ("gpt_neox.final_layer_norm",),
                                      _NEOX_LORA))
register_architecture(MlpArchitecture("bloom", ("bloom",), ("transformer.h",), "mlp.gelu_impl",
                                      "mlp.dense_h_to_4h.out_features", "gelu (tanh approx.)", ("transformer.ln_f",),
                                      _NEOX_LORA))
register_architecture(MlpArchitecture("opt", ("opt",), ("model.decoder.layers",), "activation_fn",
                                      "fc1.out_features", "relu", ("model.decoder.final_layer_norm",),
                                      ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")))


def lora_targets(model: nn.Module) -> list[str] | None:
    """The family's attention + MLP projection names for LoRA, or None (unknown family or no
    entry: use PEFT's "all-linear", every linear layer but the LM head)."""
    arch = _REGISTRY.get(_model_type(model))
    return list(arch.lora_targets) if arch is not None and arch.lora_targets else None


def supported_families() -> list[str]:
    return sorted({a.family for a in _REGISTRY.values()} | {a.family for a in _MOE_REGISTRY.values()})


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        if part == "":
            continue
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _try_get(root: Any, path: str) -> Any:
    try:
        return _get(root, path)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


@dataclass
class ActivationSites:
    """The per-layer modules whose output is the MLP activation [..., N]."""

    modules: list[nn.Module]
    num_neurons: int
    hook_point: str  # canonical description, e.g. "model.layers.{i}.mlp.act_fn"
    family: str

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    def check_mask_shape(self, num_layers: int, num_neurons: int, what: str = "neuron map") -> None:
        if (num_layers, num_neurons) != (self.num_layers, self.num_neurons):
            raise ArchitectureError(
                f"{what} is for {num_layers} layers x {num_neurons} neurons, but the model has "
                f"{self.num_layers} x {self.num_neurons}; it was made for another model")

    def add_hooks(self, fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> list[Any]:
        """Register ``fn(layer, activation) -> replacement or None`` on every layer."""
        handles = []
        for layer, module in enumerate(self.modules):
            def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor, layer: int = layer) -> Any:
                return fn(layer, out)
            handles.append(module.register_forward_hook(hook))
        return handles


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", type(model).__name__))


def locate_activations(model: nn.Module, act_path: str | None = None) -> ActivationSites:
    """Find the MLP activation module of every layer, or fail with one clear line."""
    if act_path is not None:
        return _locate_from_template(model, act_path)
    mt = _model_type(model)
    if mt in _MOE_REGISTRY:  # experts: `ExpertSites`, patched by langneurons.moe (never by plain hooks)
        return locate_experts(model)
    arch = _REGISTRY.get(mt)
    if arch is None:
        sites = _locate_unregistered(model, mt)
        if sites is not None:
            return sites
        raise ArchitectureError(
            f"unsupported architecture {mt!r}: supported families are {', '.join(supported_families())}; "
            "pass --mlp-act-path 'model.layers.{i}.mlp.act_fn' (path of the per-layer activation module) "
            "or call langneurons.arch.register_architecture(...)")
    for lp in arch.layers_paths:
        layers = _try_get(model, lp)
        if layers is not None and isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
            break
    else:
        raise ArchitectureError(f"{mt}: none of the layer paths {arch.layers_paths} exists in this model; "
                                "pass --mlp-act-path to say where the MLP activation lives")
    modules = []
    for i, layer in enumerate(layers):
        mod = _try_get(layer, arch.act_path)
        if not isinstance(mod, nn.Module):
            raise ArchitectureError(f"{mt}: layer {i} has no module at '{arch.act_path}' (MoE or modified "
                                    "model?); pass --mlp-act-path")
        modules.append(mod)
    sizes = {int(_get(layer, arch.size_path)) for layer in layers}
    if len(sizes) != 1:
        raise ArchitectureError(f"{mt}: layers have different MLP sizes {sorted(sizes)}; not supported")
    _check_distinct(modules, mt)
    return ActivationSites(modules, sizes.pop(), f"{lp}.{{i}}.{arch.act_path}", arch.family)


#: the Llama-style layout most new families keep (OLMo-2, Granite, ...): tried for a model_type
#: that is not in the table, with a warning, instead of refusing it
FALLBACK_ACT_PATH = "model.layers.{i}.mlp.act_fn"
#: activations that are > 0 exactly where their input is (what counting p > 0 relies on)
_SIGN_PRESERVING = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python", "relu",
                    "quick_gelu", "gelu_accurate")


_WARNED: set[str] = set()


def _locate_unregistered_quiet(model: nn.Module) -> bool:
    layers = _try_get(model, "model.layers")
    return (isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0
            and all(isinstance(_try_get(layer, "mlp.act_fn"), nn.Module) for layer in layers))


def _locate_unregistered(model: nn.Module, model_type: str) -> ActivationSites | None:
    """An unknown family with a gated Llama-style MLP at ``model.layers.{i}.mlp.act_fn``: used,
    with a warning naming what was assumed (None when the layout is not there)."""
    import warnings

    if not _locate_unregistered_quiet(model):
        return None
    cfg = getattr(model, "config", None)
    act = str(getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "unknown")
    sign_note = "" if act in _SIGN_PRESERVING else (
        f"; its activation {act!r} is not known to be > 0 exactly where its input is, so 'active' may not mean "
        "what it means for the supported families")
    if model_type not in _WARNED:  # once per family and process, not once per hooked forward pass
        _WARNED.add(model_type)
        warnings.warn(f"architecture {model_type!r} is not in langneurons' table; using {FALLBACK_ACT_PATH} "
                      f"(hidden_act {act}){sign_note}; register it with langneurons.arch.register_architecture to "
                      "silence this", stacklevel=3)
    sites = _locate_from_template(model, FALLBACK_ACT_PATH)
    sites.family = f"{model_type} (unregistered)"
    return sites


def _check_distinct(modules: Sequence[nn.Module], what: str) -> None:
    # A module shared by several layers would fire several times per forward and mix layers.
    if len({id(m) for m in modules}) != len(modules):
        raise ArchitectureError(f"{what}: the activation module is shared between layers, so a hook "
                                "cannot tell layers apart; not supported")


def _locate_from_template(model: nn.Module, template: str) -> ActivationSites:
    if "{i}" not in template:
        raise ArchitectureError(f"--mlp-act-path {template!r} must contain '{{i}}' for the layer index")
    modules = []
    while (mod := _try_get(model, template.format(i=len(modules)))) is not None:
        if not isinstance(mod, nn.Module):
            raise ArchitectureError(f"{template.format(i=len(modules))} is not a module")
        modules.append(mod)
    if not modules:
        raise ArchitectureError(f"--mlp-act-path {template!r}: no module at {template.format(i=0)}")
    _check_distinct(modules, template)
    num_neurons = _probe_width(model, modules[0])
    return ActivationSites(modules, num_neurons, template, "custom")


def _probe_width(model: nn.Module, module: nn.Module) -> int:
    """Run one token through the model to learn the activation width."""
    seen: list[int] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(int(out.shape[-1])))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        handle.remove()
    if not seen:
        raise ArchitectureError("the --mlp-act-path module did not run in a forward pass")
    return seen[0]


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head: counting needs no logits, and on
    large-vocabulary models the head is the most expensive matmul of the forward."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    return model


@dataclass
class Unembedding:
    """What turns a residual-stream vector into next-token logits (the logit lens):
    ``logits = softcap(head(post(norm(h))))``, exactly as the model's own forward does."""

    layers: list[nn.Module]  # the transformer blocks; the lens reads each block's output
    norm: nn.Module | None  # final norm (None: the family has none, e.g. OPT-350m)
    post: list[nn.Module]  # modules between the norm and the head (OPT's project_out)
    head: nn.Module  # the unembedding (tied or not: whatever get_output_embeddings() returns)
    softcap: float | None  # Gemma 2/3: logits = cap * tanh(logits / cap)
    family: str

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) if self.norm is not None else h
        for m in self.post:
            x = m(x)
        out = self.head(x)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def locate_unembedding(model: nn.Module) -> Unembedding:
    """The blocks, final norm, unembedding and logit soft-cap of a supported family."""
    mt = _model_type(model)
    arch: Any = _REGISTRY.get(mt) or _MOE_REGISTRY.get(mt)
    if arch is None and _try_get(model, "model.norm") is not None and _locate_unregistered_quiet(model):
        arch = MlpArchitecture(f"{mt} (unregistered)", (mt,), ("model.layers",), "mlp.act_fn", "", "", ("model.norm",))
    if arch is None:
        raise ArchitectureError(f"unsupported architecture {mt!r} for the logit lens: supported families are "
                                f"{', '.join(supported_families())}")
    layers = next((ls for lp in arch.layers_paths if isinstance(ls := _try_get(model, lp), (nn.ModuleList, list))
                   and len(ls) > 0), None)
    if layers is None:
        raise ArchitectureError(f"{mt}: none of the layer paths {arch.layers_paths} exists in this model")
    norm = next((m for p in arch.final_norm_paths if isinstance(m := _try_get(model, p), nn.Module)), None)
    if norm is None and arch.final_norm_paths and mt != "opt":
        raise ArchitectureError(f"{mt}: no final norm at {arch.final_norm_paths}; the logit lens cannot read it")
    post = [m for m in [_try_get(model, "model.decoder.project_out")] if isinstance(m, nn.Module)] if mt == "opt" else []
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise ArchitectureError(f"{mt}: the model has no output embedding (load it with AutoModelForCausalLM)")
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(text_cfg, "final_logit_softcapping", None)
    return Unembedding(list(layers), norm, post, head, float(cap) if cap else None, arch.family)


# -- mixtures of experts -----------------------------------------------------------------------
# A MoE layer's MLP neurons live inside experts, and a token reaches only the experts its router
# picks (top-k), so there is no single activation tensor per layer to hook: `langneurons.moe`
# records and patches the experts through `ExpertSites`. The neuron index is (layer, expert,
# neuron), flattened per layer expert-major -- column n = e·I + i for routed expert e (I neurons
# each), then the shared expert's S neurons (column E·I + j) where the family has one -- so the
# stats, neuron maps and masks keep their [L, N] shape with N = E·I + S.


@dataclass(frozen=True)
class MoeArchitecture:
    """Where a mixture-of-experts family keeps its router, experts and shared expert.

    The installed transformers (5.x) stores a layer's routed experts fused, as 3-D parameters
    ``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``experts.down_proj`` [E, H, I],
    with one ``experts.act_fn`` shared by all experts of the layer; the router (``gate``) returns
    ``(router_logits, top-k weights, top-k indices)`` and routes by softmax then top-k."""

    family: str
    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...]
    block_path: str  # the sparse MoE block, relative to a layer
    router_path: str  # relative to the block
    experts_path: str  # relative to the block
    shared_path: str | None  # the shared expert MLP (always used), relative to the block; None: none
    activation: str
    final_norm_paths: tuple[str, ...] = ()
    # whether the top-k weights are renormalised to sum to 1: an attribute of the router, or this default
    normalize_default: bool = True


_MOE_REGISTRY: dict[str, MoeArchitecture] = {}


def register_moe_architecture(arch: MoeArchitecture) -> None:
    """Teach langneurons a new mixture-of-experts family (model_type -> router / experts paths)."""
    for mt in arch.model_types:
        _MOE_REGISTRY[mt] = arch


for _fam, _shared in [("mixtral", None), ("qwen2_moe", "shared_expert"), ("qwen3_moe", None), ("olmoe", None)]:
    register_moe_architecture(MoeArchitecture(_fam, (_fam,), ("model.layers",), "mlp", "gate", "experts", _shared,
                                              "silu", ("model.norm",)))


def is_moe(model: nn.Module) -> bool:
    """True for a model of a registered mixture-of-experts family."""
    return _model_type(model) in _MOE_REGISTRY


@dataclass
class ExpertSites(ActivationSites):
    """The router, experts and shared expert of every MoE layer (`langneurons.moe` patches them).

    ``modules`` holds the experts module of each layer; ``num_neurons`` = E·I + S. Hooking
    ``modules`` like a dense activation would count nothing meaningful, so `add_hooks` refuses:
    use `langneurons.moe` (record, deactivate)."""

    routers: list[nn.Module] = None  # type: ignore[assignment]
    shared_acts: list[nn.Module] | None = None  # the shared expert's activation module per layer
    num_experts: int = 0  # E
    expert_size: int = 0  # I: neurons per routed expert
    shared_size: int = 0  # S: neurons of the shared expert (0: none)
    top_k: int = 0
    normalize_topk: bool = True
    is_moe: bool = True

    @property
    def routed_neurons(self) -> int:
        """E·I: the columns of routed experts (the shared expert's follow them)."""
        return self.num_experts * self.expert_size

    def expert_of(self, neuron: torch.Tensor) -> torch.Tensor:
        """The expert of each flat neuron index (E for a shared-expert neuron)."""
        neuron = torch.as_tensor(neuron)
        return torch.where(neuron < self.routed_neurons, neuron // max(self.expert_size, 1),
                           torch.full_like(neuron, self.num_experts))

    def add_hooks(self, fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> list[Any]:
        raise ArchitectureError(f"{self.family} is a mixture of experts: its neurons live inside experts and have no "
                                "single activation tensor per layer; use langneurons.moe (record, deactivate)")


def locate_experts(model: nn.Module) -> ExpertSites:
    """The MoE layers of a registered mixture-of-experts family, or one clear error line."""
    mt = _model_type(model)
    arch = _MOE_REGISTRY.get(mt)
    if arch is None:
        raise ArchitectureError(f"{mt!r} is not a registered mixture-of-experts family (registered: "
                                f"{', '.join(sorted({a.family for a in _MOE_REGISTRY.values()}))})")
    layers = next((ls for lp in arch.layers_paths if isinstance(ls := _try_get(model, lp), (nn.ModuleList, list))
                   and len(ls) > 0), None)
    if layers is None:
        raise ArchitectureError(f"{mt}: none of the layer paths {arch.layers_paths} exists in this model")
    routers, experts, shared = [], [], []
    dense = []
    for i, layer in enumerate(layers):
        block = _try_get(layer, arch.block_path)
        router = _try_get(block, arch.router_path) if block is not None else None
        ex = _try_get(block, arch.experts_path) if block is not None else None
        if router is None or ex is None:
            dense.append(i)
            continue
        for name in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(ex, name):
                raise ArchitectureError(f"{mt}: layer {i}'s experts have no '{name}' (expected fused expert weights "
                                        "gate_up_proj [E, 2I, H] / down_proj [E, H, I], transformers >= 5); this layout "
                                        "is not supported")
        if getattr(ex, "has_bias", False) or getattr(ex, "is_transposed", False) \
                or not getattr(ex, "is_concatenated", True) or not getattr(ex, "has_gate", True):
            raise ArchitectureError(f"{mt}: layer {i}'s experts use a weight layout (bias / transposed / interleaved / "
                                    "no gate) that langneurons.moe does not support")
        routers.append(router)
        experts.append(ex)
        if arch.shared_path is not None:
            sh = _try_get(block, arch.shared_path)
            act = _try_get(sh, "act_fn") if sh is not None else None
            if not isinstance(act, nn.Module):
                raise ArchitectureError(f"{mt}: layer {i} has no shared expert activation at "
                                        f"'{arch.block_path}.{arch.shared_path}.act_fn'")
            shared.append(act)
    if dense:
        raise ArchitectureError(f"{mt}: layers {dense[:5]} are dense MLPs (mlp_only_layers / decoder_sparse_step); "
                                "a stack mixing dense and MoE layers is not supported")
    shapes = {tuple(e.gate_up_proj.shape) for e in experts}
    if len(shapes) != 1:
        raise ArchitectureError(f"{mt}: layers have different expert shapes {sorted(shapes)}; not supported")
    E, two_i, _ = shapes.pop()
    shared_sizes = {int(_get(layer, f"{arch.block_path}.{arch.shared_path}.gate_proj.out_features"))
                    for layer in layers} if arch.shared_path else {0}
    if len(shared_sizes) != 1:
        raise ArchitectureError(f"{mt}: layers have different shared-expert sizes {sorted(shared_sizes)}")
    S = shared_sizes.pop()
    top_ks = {int(getattr(r, "top_k")) for r in routers}
    if len(top_ks) != 1:
        raise ArchitectureError(f"{mt}: layers route to different numbers of experts {sorted(top_ks)}")
    _check_distinct(experts, mt)
    norm = getattr(routers[0], "norm_topk_prob", arch.normalize_default)
    I = two_i // 2
    hook = f"{arch.layers_paths[0]}.{{i}}.{arch.block_path}.{arch.experts_path}[e].act_fn"
    return ExpertSites(experts, E * I + S, hook, arch.family, routers=routers, shared_acts=shared or None,
                       num_experts=int(E), expert_size=int(I), shared_size=int(S), top_k=top_ks.pop(),
                       normalize_topk=bool(norm))
