"""The run directory: every artifact of one analysis, so it can be resumed, merged,
compared and reported later.

Layout::

    RUN_DIR/manifest.json            languages, model, scope, versions, checksums, stage records
    RUN_DIR/stats/<lang>.safetensors counts per language (stats.py)
    RUN_DIR/neurons.safetensors      NeuronMap (neurons.py)
    RUN_DIR/anatomy.json             layer anatomy and phases (anatomy.py)
    RUN_DIR/ablation.parquet         intervention matrix (evaluate.py)
    RUN_DIR/generations.jsonl        generations under interventions
    RUN_DIR/eval_corpus.jsonl        held-out documents used by `run` for the ablation
    RUN_DIR/stability*.parquet       bootstrap / split-half stability (confidence.py)
    RUN_DIR/null.parquet             permutation null of the class counts
    RUN_DIR/figures/                 PNG + SVG figures
    RUN_DIR/report.html              self-contained report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StatsError
from .io import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from .stats import LanguageStats


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def stats_dir(self) -> Path:
        return self.path / "stats"

    def stats_path(self, lang: str) -> Path:
        return self.stats_dir / f"{lang}.safetensors"

    @property
    def neurons_path(self) -> Path:
        return self.path / "neurons.safetensors"

    @property
    def anatomy_path(self) -> Path:
        return self.path / "anatomy.json"

    @property
    def ablation_path(self) -> Path:
        return self.path / "ablation.parquet"

    @property
    def generations_path(self) -> Path:
        return self.path / "generations.jsonl"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    # manifest ----------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise StatsError(f"{self.manifest_path} is not valid JSON ({exc}); restore or delete it") from None
        if not isinstance(manifest, dict):
            raise StatsError(f"{self.manifest_path} is not a JSON object; restore or delete it")
        return manifest

    def update_manifest(self, updates: dict[str, Any]) -> dict[str, Any]:
        """Merge ``updates`` into manifest.json (top-level keys; dicts are merged one level)."""
        manifest = self.read_manifest()
        for key, value in updates.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def record_checksum(self, path: Path) -> None:
        rel = str(Path(path).resolve().relative_to(self.path.resolve()))
        self.update_manifest({"checksums": {rel: sha256_file(path)}})

    def verify_checksum(self, path: Path) -> None:
        rel = str(Path(path).resolve().relative_to(self.path.resolve()))
        expected = self.read_manifest().get("checksums", {}).get(rel)
        if expected is not None and sha256_file(path) != expected:
            raise StatsError(f"{path} is corrupt (its checksum differs from manifest.json); delete it and redo that stage")

    def write_language_stats(self, part: "LanguageStats") -> Path:
        path = part.save(self.stats_path(part.lang))
        self.record_checksum(path)
        return path
