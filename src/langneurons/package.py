"""`langneurons package RUN OUT`: a neuron set others can use, with its full provenance.

OUT holds
* ``neurons.safetensors`` -- the neuron map, its metadata extended with the provenance;
* ``neurons.parquet`` -- the same, one row per neuron (`export.neuron_table`);
* ``provenance.json`` -- model id, revision (hub commit), fingerprint, hook point, shape, dtype,
  corpus (source and per-language checksums of the identification text), tokens per language,
  method and parameters, τ, λ, and the versions of everything that made it;
* ``README.md`` -- a model card whose front matter names ``base_model`` (the hub id), so the hub
  links the neuron set to its model.

``NeuronMap.load(OUT, model=...)`` refuses the map for a model of another shape. ``--push-to-hub
REPO`` uploads OUT with huggingface_hub (optional; needs a token).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import LangNeuronsError
from .io import atomic_write_text
from .runs import RunDir

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def provenance(run: RunDir, nmap: Any) -> dict[str, Any]:
    """Everything needed to know what a neuron map is and to make it again."""
    from .stage import versions

    manifest = run.read_manifest()
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    record = run.stage_result("record")
    split = run.stage_result("split")
    ident = run.stage_result("identify")
    meta = nmap.meta
    return {
        "model": {k: model.get(k) for k in ("model", "revision", "model_fingerprint", "architecture", "family",
                                             "hook_point", "num_layers", "num_neurons", "dtype")},
        "shape": [nmap.num_layers, nmap.num_neurons],
        "languages": list(nmap.languages),
        "corpus": {"source": split.get("source") or record.get("corpus"),
                   "identification_checksums": split.get("identification_corpus"),
                   "holdout": split.get("holdout"), "rule": split.get("rule")},
        "tokens_per_language": record.get("tokens"),
        "scope": meta.get("scope") or record.get("scope"),
        "method": meta.get("method"), "parameters": meta.get("params"),
        "tau": meta.get("tau"), "lambda": meta.get("lambda"), "lambda_saturated": meta.get("lambda_saturated"),
        "stats_fingerprint": meta.get("stats_fingerprint") or ident.get("stats_fingerprint"),
        "neuron_map_fingerprint": nmap.fingerprint(),
        "summary": nmap.summary(),
        "versions": {"recorded_with": manifest.get("versions"), "packaged_with": versions()},
    }


def model_card(prov: dict[str, Any]) -> str:
    """README.md with hub front matter (``base_model`` links the set to its model)."""
    from .langcodes import to_iso639_1

    model = prov["model"].get("model") or "unknown"
    hub = "/" in model and not Path(model).expanduser().exists()
    langs = [c for c in (to_iso639_1(x) for x in prov["languages"]) if c]
    front = ["---", "library_name: langneurons", "tags:", "- language-neurons", "- interpretability"]
    if hub:
        front += [f"base_model: {model}"]
    if langs:
        front += ["language:"] + [f"- {x}" for x in dict.fromkeys(langs)]
    front += ["---", ""]
    s = prov["summary"]
    lines = [
        f"# Language neurons of {model}",
        "",
        f"A neuron map made with [langneurons](https://pypi.org/project/langneurons/): which MLP neurons of "
        f"`{model}` (revision `{prov['model'].get('revision') or 'local files'}`, hook point "
        f"`{prov['model'].get('hook_point')}`, {prov['shape'][0]} layers x {prov['shape'][1]} neurons) are "
        f"language-specific, language-related or general, for {', '.join(prov['languages'])}.",
        "",
        f"- method: {prov['method']} {json.dumps(prov['parameters'])}; tau = {prov['tau']}, lambda = {prov['lambda']}",
        f"- selected: {s['selected']}; per class: {json.dumps(s['totals'])}",
        f"- tokens per language: {json.dumps(prov['tokens_per_language'])}",
        f"- corpus: {prov['corpus'].get('source')} (checksums in provenance.json)",
        "",
        "```python",
        "from langneurons import NeuronMap, load_model",
        f"model = load_model({model!r}" + (f", revision={prov['model']['revision']!r}" if hub and
                                             prov['model'].get('revision') else "") + ")",
        "nmap = NeuronMap.load('neurons.safetensors', model=model)  # refuses a model of another shape",
        "```",
        "",
        "`provenance.json` holds the full provenance; `neurons.parquet` one row per neuron.",
        "",
    ]
    return "\n".join(front + lines)


def package(run_dir: str | Path, out: str | Path, *, push_to_hub: str | None = None,
            private: bool = True) -> Path:
    """Write the package folder (and upload it when ``push_to_hub`` names a repo)."""
    from .export import save_parquet
    from .neurons import NeuronMap

    if push_to_hub is not None and not _REPO_ID.match(push_to_hub):
        raise LangNeuronsError(f"--push-to-hub {push_to_hub!r} is not a hub repo id (user/name)")
    run = RunDir(run_dir)
    if not run.neurons_path.is_file():
        raise LangNeuronsError(f"{run.neurons_path} does not exist; run `langneurons identify {run.path}` first")
    out = Path(out)
    if out.resolve() == run.path.resolve():
        raise LangNeuronsError("OUT must be a new folder, not the run directory")
    nmap = NeuronMap.load(run.neurons_path)
    prov = provenance(run, nmap)
    out.mkdir(parents=True, exist_ok=True)
    nmap.meta = dict(nmap.meta, provenance=prov)
    nmap.save(out / "neurons.safetensors")
    save_parquet(nmap, out / "neurons.parquet")
    atomic_write_text(out / "provenance.json", json.dumps(prov, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(out / "README.md", model_card(prov))
    if run.report_path.is_file():
        shutil.copyfile(run.report_path, out / "report.html")
    if push_to_hub is not None:
        upload(out, push_to_hub, private=private)
    return out


def upload(folder: Path, repo_id: str, *, private: bool = True) -> None:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise LangNeuronsError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="langneurons package")
