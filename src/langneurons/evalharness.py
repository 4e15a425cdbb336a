"""`langneurons eval`: lm-evaluation-harness tasks under a grid of neuron interventions.

One loaded model (the run's, at its recorded commit) serves the whole grid: the empty
intervention (exactly lm-eval's ``hf`` numbers) and, for every language in ``deactivate`` and
every class set, that language's neurons zeroed (or scaled, or set to another language's mean).
Each cell is one `lm_eval.simple_evaluate` call with per-sample logging, so the aggregate
metrics (accuracy of MGSM, Belebele, ... as lm-eval computes them) and every sample's
responses land in the run directory:

    RUN/eval/results.json                 config, grid, {intervention: {task: {metric: value}}}
    RUN/eval/samples/<intervention>/<task>.jsonl   lm-eval's per-sample records

The stage is current while the tasks, grid, settings, neuron map, model and lm-eval version
are unchanged (the stage layer's one rule); the report shows the aggregate table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig, require
from .errors import LangNeuronsError
from .io import atomic_write_text
from .runs import RunDir
from .stage import Stage

RESULTS = "eval/results.json"


@dataclass
class EvalConfig:
    """Which lm-eval tasks, and which interventions (a grid) to run them under."""

    tasks: tuple[str, ...] = ()
    deactivate: tuple[str, ...] = ()  # languages; each gives one intervention per class set
    classes: tuple[str, ...] = ("specific",)  # class sets, each a comma list (or "selected")
    mode: str = "zero"
    factor: float = 0.0
    set_lang: str | None = None
    baseline: bool = True  # also run the empty intervention (lm-eval's hf numbers)
    include_path: Path | None = None  # a folder of task YAMLs (local tasks)
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    apply_chat_template: bool = False
    gen_kwargs: str | None = None
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> "EvalConfig":
        self.tasks = tuple(self.tasks)
        require(bool(self.tasks), "--tasks names no task; give e.g. mgsm_direct_de,belebele_deu_Latn")
        self.deactivate, self.classes = tuple(self.deactivate), tuple(self.classes) or ("specific",)
        require(self.mode in ("zero", "scale", "set"), f"--mode must be zero, scale or set, got {self.mode!r}")
        require(self.mode != "set" or bool(self.set_lang), "--mode set needs --set-lang (whose mean activation)")
        require(self.baseline or bool(self.deactivate), "nothing to run: no --deactivate and --no-baseline")
        require(self.limit is None or self.limit > 0, f"--limit must be > 0, got {self.limit}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.include_path is None or Path(self.include_path).is_dir(),
                f"--include-path {self.include_path} is not a folder of task YAML files")
        self.model.validate()
        return self

    def grid(self) -> list[tuple[str | None, str | None]]:
        """(language, class set) per cell; (None, None) is the empty intervention."""
        cells: list[tuple[str | None, str | None]] = [(None, None)] if self.baseline else []
        return cells + [(lang, cls) for lang in self.deactivate for cls in self.classes]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise LangNeuronsError("langneurons eval needs lm-evaluation-harness: pip install 'langneurons[eval]'") from None


class EvalStage(Stage[dict]):
    """The lm-eval grid of a run (see the module docstring)."""

    name = "eval"

    def __init__(self, run: RunDir | str | Path, config: EvalConfig, *, by: str = ""):
        super().__init__(run, by=by)
        self.config = config.validate()

    def inputs(self) -> dict[str, Any]:
        from .neurons import NeuronMap

        cfg = self.config
        info = self.run.read_manifest().get("model") or {}
        nmap = NeuronMap.load(self.run.neurons_path).fingerprint() if cfg.deactivate else None
        include = sorted(str(p.relative_to(cfg.include_path)) + ":" + p.read_text(encoding="utf-8")
                         for p in Path(cfg.include_path).rglob("*.yaml")) if cfg.include_path else None
        return {"tasks": list(cfg.tasks), "grid": cfg.grid(), "mode": cfg.mode, "factor": cfg.factor,
                "set_lang": cfg.set_lang, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
                "batch_size": cfg.batch_size, "chat": cfg.apply_chat_template, "gen_kwargs": cfg.gen_kwargs,
                "seed": cfg.seed, "include": include, "neurons": nmap, "lm_eval": _lm_eval_version(),
                "model": cfg.model.model or info.get("model"), "revision": cfg.model.revision or info.get("revision"),
                "dtype": cfg.model.dtype or info.get("dtype")}

    def load(self) -> dict | None:
        path = self.run.path / RESULTS
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def compute(self) -> dict:
        import lm_eval

        from .lm_eval_model import Intervention, LangNeuronsLM, build_intervention

        cfg = self.config
        loaded = cfg.model.load(self.run.read_manifest())
        lm = LangNeuronsLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=cfg.batch_size,
                           mlp_act_path=cfg.model.act_path)
        tm = _task_manager(cfg)
        results: dict[str, Any] = {}
        samples: dict[str, dict[str, list]] = {}
        cells = []
        for lang, cls in cfg.grid():
            iv = Intervention() if lang is None else build_intervention(
                self.run.path, lang, cls, cfg.mode, cfg.factor, cfg.set_lang)
            label = "none" if lang is None else iv.label
            lm.set_intervention(iv)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                log_samples=True, apply_chat_template=cfg.apply_chat_template, gen_kwargs=cfg.gen_kwargs,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed, bootstrap_iters=1000)
            results[label] = {task: {k: v for k, v in vals.items() if k not in ("name", "alias")}
                              for task, vals in (out or {}).get("results", {}).items()}
            samples[label] = (out or {}).get("samples", {})
            cells.append({"label": label, "language": lang, "classes": cls, "mode": cfg.mode if lang else None,
                          "neurons": 0 if iv.mask is None else int(iv.mask.sum())})
        return {"model": loaded.source, "revision": loaded.revision, "tasks": list(cfg.tasks), "cells": cells,
                "results": results, "samples": samples}

    def write(self, result: dict) -> tuple[list[Path], dict[str, Any]]:
        outputs = []
        for label, by_task in result.pop("samples", {}).items():
            for task, rows in by_task.items():
                path = self.run.path / "eval" / "samples" / _safe(label) / f"{_safe(task)}.jsonl"
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
                outputs.append(path)
        path = self.run.path / RESULTS
        atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
        section = {"path": RESULTS, "tasks": result["tasks"], "cells": [c["label"] for c in result["cells"]]}
        return [path] + outputs, section


def _task_manager(cfg: EvalConfig) -> Any:
    """lm-eval's task index; only the local folder when it holds every task (indexing lm-eval's
    thousands of built-in task files takes ~10-30 s)."""
    from lm_eval.tasks import TaskManager

    if cfg.include_path:
        local = TaskManager(include_path=str(cfg.include_path), include_defaults=False)
        if all(task in local.all_tasks for task in cfg.tasks):
            return local
    return TaskManager(include_path=str(cfg.include_path) if cfg.include_path else None)


def results_table(result: dict) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): one row per intervention, one column per task metric (stderr omitted)."""
    columns: list[tuple[str, str]] = []
    for by_task in result.get("results", {}).values():
        for task, metrics in by_task.items():
            for metric, value in metrics.items():
                if "stderr" not in metric and isinstance(value, (int, float)) and (task, metric) not in columns:
                    columns.append((task, metric))
    header = ["intervention", "neurons"] + [f"{t} {m.split(',')[0]}" for t, m in columns]
    neurons = {c["label"]: c["neurons"] for c in result.get("cells", [])}
    rows = [[label, neurons.get(label, "")] + [by_task.get(t, {}).get(m, "") for t, m in columns]
            for label, by_task in result.get("results", {}).items()]
    return header, rows
