"""langneurons: find, classify and test the language neurons of Hugging Face causal LMs.

The pipeline is record -> identify -> anatomy -> intervene/evaluate -> compare -> report;
each stage is a module of the same name and writes its artifacts into one run directory.

The main public names are importable from the package itself (``from langneurons import
load_model, EntropyLambda``); they are loaded lazily, on first use, so ``import langneurons``
stays light (no torch, no transformers). The functions named like their modules are reached
through the module: ``from langneurons.record import record``,
``from langneurons.identify import identify``, ``from langneurons.lm import generate`` (a package
attribute ``record`` is the submodule once it is imported, so it cannot also be the function).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "LangNeuronsError": "errors",
    "load_model": "models", "LoadedModel": "models",
    "load_corpus": "corpus", "Corpus": "corpus", "Example": "corpus",
    "RecordConfig": "record", "Recorder": "record",
    "ActivationStats": "stats", "LanguageStats": "stats",
    "EntropyLambda": "identify", "Lape": "identify", "Selector": "identify", "register_method": "identify",
    "NeuronMap": "neurons",
    "analyze": "anatomy", "analyze_run": "anatomy",
    "deactivate": "intervene",
    "perplexity": "evaluate", "ablation_matrix": "evaluate", "accuracy_matrix": "evaluate",
    "GenerateConfig": "lm",
    "read_task": "tasks",
    "compare_runs": "compare",
    "run_pipeline": "pipeline", "RunConfig": "pipeline",
    "register_architecture": "arch",
    "Stage": "stage", "StageRecord": "stage", "is_fresh": "stage",
    "IdentifyConfig": "config", "AblationConfig": "config", "ModelConfig": "config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'langneurons' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
