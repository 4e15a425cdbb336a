"""Report section of a mixture-of-experts run: expert specialisation by language.

Shown when the run's neuron map was made by `langneurons.moe.identify_moe` (it carries the
routing shares). One heatmap per language, layer x expert: the language's share of the
expert's language-normalised traffic, q[k, l, e] = r[k, l, e] / Σ_j r[j, l, e] with r the
share of language k's tokens routed to e (1/K everywhere = no specialisation; 1 = only this
language reaches the expert); the language-specific experts found by `identify_experts` are
outlined. Beside it: the neuron classes per layer (as for dense models) and the neurons each
language does not observe (its tokens rarely reach their expert).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .figures import DPI, save_figure
from .sections import esc, figure_html, note_html, register_section, table_html


def specialisation(shares: torch.Tensor) -> torch.Tensor:
    """q [K, L, E] = r / Σ_k r (uniform 1/K where no language reaches the expert)."""
    total = shares.sum(0, keepdim=True)
    K = shares.shape[0]
    return torch.where(total > 0, shares / total.clamp(min=1e-30), torch.full_like(shares, 1.0 / K))


def plot_expert_heatmap(nmap: Any, title: str = "") -> Any:
    """K panels (one per language) of q[k] over layer (rows) x expert (columns)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    q = specialisation(nmap.extras["routing_share"].to(torch.float32))
    K, L, E = q.shape
    specific = nmap.extras.get("expert_active")
    classes = nmap.extras.get("expert_classes")
    cols = min(K, 4)
    rows = (K + cols - 1) // cols
    width = min(3.0 + 0.18 * E, 6.0)
    height = min(2.0 + 0.16 * L, 6.0)
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for k, lang in enumerate(nmap.languages):
        ax = axes[k // cols][k % cols]
        image = ax.imshow(q[k].numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        if specific is not None and classes is not None:
            for layer, e in ((specific[k] & (classes == 1)).nonzero().tolist()):
                ax.add_patch(Rectangle((e - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#D55E00", lw=1.5))
        ax.set_title(lang, fontsize=10)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for k in range(K, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    if image is not None:
        cbar = fig.colorbar(image, ax=axes, shrink=0.8)
        cbar.set_label("share of traffic", fontsize=8)
    fig.suptitle(title or "Expert specialisation by language", fontsize=11)
    return fig


def render_section(run_dir: str | Path) -> str | None:
    from ..moe import moe_summary
    from ..neurons import NeuronMap

    run_dir = Path(run_dir)
    path = run_dir / "neurons.safetensors"
    if not path.is_file():
        return None
    nmap = NeuronMap.load(path)
    if "routing_share" not in nmap.extras:
        return None
    s = moe_summary(nmap)
    info = s.get("moe") or {}
    L = nmap.num_layers
    parts = [
        "<p>A mixture of experts: a neuron's firing rate is counted over the tokens routed to its expert. A "
        f"language <i>observes</i> an expert's neurons when it sent at least {esc(info.get('min_routed'))} tokens to "
        f"it; neurons unobserved in some language are not classified. {esc(info.get('observed_everywhere'))} of "
        f"{esc(nmap.num_layers * nmap.num_neurons)} neurons are observed in every language "
        f"({esc(info.get('num_experts'))} experts x {esc(info.get('expert_size'))} neurons"
        + (f" + a shared expert of {esc(info.get('shared_size'))}" if info.get("shared_size") else "")
        + " per layer).</p>"]
    per = s["neurons_per_layer"]
    unobs = s.get("unobserved_per_layer", {})
    header = ["layer", "specific", "related", "general"] + [f"unobserved {lang}" for lang in nmap.languages]
    rows = [[layer, per["specific"][layer], per["related"][layer], per["general"][layer]]
            + [unobs[lang][layer] for lang in nmap.languages] for layer in range(L)]
    parts.append(table_html(header, rows))
    if "specific_experts" in s:
        ex_rows = [[lang, len(v), ", ".join(f"L{a}/E{b}" for a, b in v[:12]) + (" …" if len(v) > 12 else "")]
                   for lang, v in s["specific_experts"].items()]
        parts.append("<h3>Language-specific experts</h3>")
        parts.append(table_html(["language", "experts", "layer/expert"], ex_rows))
    else:
        err = (nmap.meta.get("experts") or {}).get("error")
        parts.append(note_html(f"no expert-level identification: {err or 'not stored'}", "warn"))
    try:
        png, _ = save_figure(plot_expert_heatmap(nmap), run_dir / "figures", "moe_experts")
        parts.append(figure_html(png, "expert specialisation by language",
                                 "Per language, layer x expert: the language's share of the expert's traffic "
                                 "(routing shares normalised over languages; 1/K = even). Outlined: the experts "
                                 "identified as specific to that language."))
    except Exception as exc:  # noqa: BLE001 - the tables are still useful
        parts.append(note_html(f"the expert heatmap could not be drawn: {exc}", "warn"))
    return "\n".join(parts)


register_section("moe", "Mixture of experts", render_section, order=42)
