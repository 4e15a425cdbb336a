"""The stage layer: one way to run a step of an analysis and to know whether its output is current.

A *stage* (record, identify, anatomy, ablation, report, an alignment step ...) is

* a validated config (a dataclass with ``validate()``),
* the *inputs* that decide its output: the config fields that matter plus the checksums or
  fingerprints of the artifacts it reads (so a changed upstream artifact makes it stale),
* ``compute()`` and ``write()``, which put its outputs into the run directory atomically.

One rule decides freshness for every stage (DVC's ``dvc.lock`` idea): the manifest holds one
`StageRecord` per stage with the sha256 *key* of its inputs and the sha256 of each output; a
stage is fresh iff the record's key equals the key of the inputs it would use now AND every
output file still has the recorded checksum (so a hand-edited or corrupted artifact is never
taken as current). Keys are data (`input_key`), computed in one place, never re-implemented by
callers.

The manifest is written under a file lock, and each writer replaces its own stage section
whole, so two commands working on one run directory lose no section and leave no stale keys
of another writer behind.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, TypeVar

from .errors import LangNeuronsError
from .io import sha256_file

T = TypeVar("T")


def canonical_json(obj: Any) -> str:
    """The one serialisation keys are computed from (sorted keys, tuples as lists, paths as text)."""
    return json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False, separators=(",", ":"))


def input_key(inputs: Any) -> str:
    """sha256 of the canonical JSON of a stage's inputs: equal inputs <=> equal keys."""
    import hashlib

    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()


def versions() -> dict[str, str]:
    """Versions of what can change a stage's numbers."""
    import platform

    from . import __version__

    import sys
    from importlib import metadata

    out = {"langneurons": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)  # the imported one (its version string, e.g. "2.13.0+cpu")
        try:  # otherwise the installed distribution's: importing transformers costs a second
            out[name] = module.__version__ if module is not None else metadata.version(name)
        except Exception:  # noqa: BLE001 - a missing optional library is simply not listed
            pass
    return out


@dataclass
class StageRecord:
    """What the manifest keeps of one stage: enough to decide freshness and to audit a result."""

    key: str
    inputs: dict[str, Any]
    outputs: dict[str, str]  # path relative to the run directory -> sha256
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    by: str = ""  # the command (or API caller) that ran it: run, identify, ablate ...
    finished: str = ""  # UTC ISO time
    result: dict[str, Any] = field(default_factory=dict)  # the stage's typed section, as JSON

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "StageRecord | None":
        if not isinstance(d, dict) or not isinstance(d.get("key"), str):
            return None
        names = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError:
            return None


class ChecksumError(LangNeuronsError, ValueError):
    """An artifact differs from the checksum its stage recorded (edited or corrupted)."""


class Stage(ABC, Generic[T]):
    """Base class of every stage. Subclasses set ``name`` and implement `inputs`, `compute`,
    `write` and `load` (to return the current result without recomputing it)."""

    name: ClassVar[str]
    #: stages whose outputs this one reads: their recorded checksums are verified before it runs
    upstream: ClassVar[tuple[str, ...]] = ()

    def __init__(self, run: Any, *, by: str = "", accept_edited: bool = False):
        from .runs import RunDir

        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.by = by or self.name
        self.accept_edited = accept_edited

    # -- what a subclass provides ----------------------------------------------------------
    @abstractmethod
    def inputs(self) -> dict[str, Any]:
        """Everything that decides the output (config values, upstream checksums)."""

    @abstractmethod
    def compute(self) -> T:
        """Produce the result (no writes)."""

    @abstractmethod
    def write(self, result: T) -> tuple[list[Path], dict[str, Any]]:
        """Write the result into the run directory atomically; return (output files, section)."""

    def load(self) -> T | None:
        """The current result read back from the run directory (None: this stage cannot)."""
        return None

    # -- the one freshness rule ------------------------------------------------------------
    def key(self) -> str:
        return input_key(self.inputs())

    def record(self) -> StageRecord | None:
        return self.run.stage_record(self.name)

    def fresh(self) -> bool:
        return is_fresh(self.run, self.name, self.inputs())

    def run_stage(self, *, force: bool = False, echo: Callable[[str], None] | None = None) -> T:
        """Compute and write unless fresh (then load); record the stage in the manifest. The
        upstream artifacts are verified first: an edited or corrupted input is refused."""
        verify_inputs(self.run, *self.upstream, accept_edited=self.accept_edited)
        if not force and self.fresh():
            loaded = self.load()
            if loaded is not None:
                if echo:
                    echo(f"[{self.name}] up to date, skipped")
                return loaded
        t0 = time.perf_counter()
        if echo:
            echo(f"[{self.name}] ...")
        result = self.compute()
        outputs, section = self.write(result)
        seconds = time.perf_counter() - t0
        self.commit(outputs, section, seconds)
        if echo:
            echo(f"[{self.name}] done in {seconds:.1f} s")
        return result

    def commit(self, outputs: list[Path], section: dict[str, Any], seconds: float) -> StageRecord:
        """Record this stage (key, inputs, output checksums, timing, versions, its section)."""
        return commit_stage(self.run, self.name, self.inputs(), outputs, section, seconds, by=self.by)


def commit_stage(run: Any, name: str, inputs: dict[str, Any], outputs: list[Path], section: dict[str, Any],
                 seconds: float, *, by: str, stage_versions: dict[str, str] | None = None) -> StageRecord:
    """Write one stage's record into the run's manifest: the key of ``inputs``, the checksum of
    every output, timing, versions and the stage's own section. Every stage -- a `Stage`
    subclass, the per-language recorder, the ablation table, an alignment step -- records itself
    through this one function, so `is_fresh` can judge all of them by one rule."""
    inputs = json.loads(canonical_json(inputs))
    rec = StageRecord(key=input_key(inputs), inputs=inputs, outputs=run.checksums_of(outputs),
                      seconds=round(seconds, 3), versions=stage_versions or versions(), by=by,
                      finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      result=json.loads(canonical_json(section)))
    run.write_stage_record(name, rec)
    return rec


def is_fresh(run: Any, name: str, inputs: dict[str, Any]) -> bool:
    """The one freshness rule: the stage's record has the key of ``inputs`` and every output it
    recorded still has its checksum."""
    rec = run.stage_record(name)
    return rec is not None and rec.key == input_key(inputs) and run.outputs_intact(rec)


def verify_inputs(run: Any, *stage_names: str, accept_edited: bool = False) -> None:
    """Refuse to go on when an artifact of the named stages differs from its recorded checksum.

    A byte flip in neurons.safetensors or a hand-edited ablation.parquet must not be analysed
    and reported as if a stage had made it. ``accept_edited`` (the CLI's ``--accept-edited``)
    is for deliberately edited files: they are then taken as they are."""
    if accept_edited:
        return
    for name in stage_names:
        rec = run.stage_record(name)
        if rec is None:
            continue
        for rel, want in rec.outputs.items():
            path = run.path / rel
            if path.is_file() and sha256_file(path) != want:
                raise ChecksumError(f"{path} differs from the checksum the {name} stage recorded (edited or "
                                    f"corrupted); run that stage again, or pass --accept-edited to use it as it is")
