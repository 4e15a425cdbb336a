"""The run directory: every artifact of one analysis, so it can be resumed, merged,
compared and reported later.

Layout::

    RUN_DIR/manifest.json            languages, model, versions, checksums, one record per stage
                                     (manifest["stages"][name]: key, inputs, outputs, seconds ...)
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

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .errors import StatsError
from .io import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from .stage import StageRecord
    from .stats import LanguageStats

#: manifest keys whose values are maps that several writers add entries to (merged, not replaced)
_MERGED_KEYS = ("checksums",)


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
    def eval_corpus_path(self) -> Path:
        return self.path / "eval_corpus.jsonl"

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

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's manifest lock (two commands on one run never interleave a
        read-modify-write of manifest.json)."""
        from filelock import FileLock

        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path / ".manifest.lock"), timeout=120):
            yield

    def update_manifest(self, updates: dict[str, Any]) -> dict[str, Any]:
        """Write ``updates`` into manifest.json under the lock. A top-level key is replaced whole
        (a writer owns its section; nothing of another writer's version of it survives), except
        the file-checksum map, which every writer adds to."""
        with self.locked():
            manifest = self.read_manifest()
            for key, value in updates.items():
                if key in _MERGED_KEYS and isinstance(value, dict) and isinstance(manifest.get(key), dict):
                    manifest[key] = {**manifest[key], **value}
                else:
                    manifest[key] = value
            atomic_write_json(self.manifest_path, manifest)
        return manifest

    # stage records -------------------------------------------------------------------------
    def stage_record(self, name: str) -> "StageRecord | None":
        from .stage import StageRecord

        stages = self.read_manifest().get("stages")
        return StageRecord.from_json(stages.get(name)) if isinstance(stages, dict) else None

    def stage_result(self, name: str) -> dict[str, Any]:
        """The typed section of a stage as JSON ({} when the stage never ran)."""
        rec = self.stage_record(name)
        return rec.result if rec is not None else {}

    def write_stage_record(self, name: str, rec: "StageRecord") -> None:
        """Replace the stage's record (and add its outputs' checksums) in one locked write."""
        with self.locked():
            manifest = self.read_manifest()
            stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
            manifest["stages"] = {**stages, name: rec.to_json()}
            manifest["checksums"] = {**(manifest.get("checksums") or {}), **rec.outputs}
            atomic_write_json(self.manifest_path, manifest)

    def refresh_outputs(self, name: str, paths: Sequence[Path]) -> None:
        """A later stage annotated an output of stage ``name`` without changing what that stage
        decided (e.g. stability extras in the neuron map): record the new checksums, so the
        stage stays current and no one takes the annotated file for a corrupted one."""
        with self.locked():
            manifest = self.read_manifest()
            rec = (manifest.get("stages") or {}).get(name)
            sums = self.checksums_of(paths)
            if isinstance(rec, dict):
                rec["outputs"] = {**(rec.get("outputs") or {}), **sums}
            manifest["checksums"] = {**(manifest.get("checksums") or {}), **sums}
            atomic_write_json(self.manifest_path, manifest)

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.path.resolve()))

    def checksums_of(self, paths: Sequence[Path]) -> dict[str, str]:
        return {self.relative(p): sha256_file(p) for p in paths}

    def outputs_intact(self, rec: "StageRecord") -> bool:
        """Every output of the record exists with its recorded checksum."""
        for rel, want in rec.outputs.items():
            path = self.path / rel
            if not path.is_file() or sha256_file(path) != want:
                return False
        return True

    def record_checksum(self, path: Path) -> None:
        self.update_manifest({"checksums": {self.relative(path): sha256_file(path)}})

    def verify_checksum(self, path: Path) -> None:
        rel = self.relative(path)
        expected = self.read_manifest().get("checksums", {}).get(rel)
        if expected is not None and sha256_file(path) != expected:
            raise StatsError(f"{path} is corrupt (its checksum differs from manifest.json); delete it and redo that stage")

    def write_language_stats(self, part: "LanguageStats") -> Path:
        path = part.save(self.stats_path(part.lang))
        self.record_checksum(path)
        return path
