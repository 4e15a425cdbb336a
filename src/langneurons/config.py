"""Validated configs of the stages, and the parsers of their textual forms.

Every config validates itself (``cfg.validate()`` returns the config or raises a one-line
`LangNeuronsError`), so the Python API refuses bad values with exactly the messages the
command line prints: the CLI modules only parse options into a config and call a stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import LangNeuronsError

#: the neuron sets deactivated by default: language-specific, + related, + general
DEFAULT_SETS: tuple[str, ...] = ("specific", "specific,related", "specific,related,general")
#: perplexity-style metrics of the ablation matrix (accuracy is generated, not scored)
PPL_METRICS: tuple[str, ...] = ("nll", "ppl", "bpb")
#: task-accuracy metrics of generated answers (MGSM-style) and of multiple-choice questions (Belebele-style)
ACCURACY_METRICS: tuple[str, ...] = ("accuracy", "number_accuracy", "language_accuracy")
CHOICE_METRICS: tuple[str, ...] = ("choice_accuracy",)
#: perplexity styles: token-weighted NLL (default), or the paper's mean over documents of each
#: document's mean NLL (evaluate.py's docstring, docs/interventions.md)
PPL_STYLES: tuple[str, ...] = ("token", "paper")
#: random controls: activity-matched within each layer (default), per-layer counts only, none
CONTROLS: tuple[str, ...] = ("matched", "layer", "none")


def split_list(value: str | None, *, what: str = "the list") -> list[str] | None:
    """'en,zh, de' -> ['en', 'zh', 'de']; None/'' -> None. A value of only separators (',,')
    is an error, not "everything"."""
    if value is None or not value.strip():
        return None
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise LangNeuronsError(f"{what} {value!r} names nothing; give a comma list such as en,de "
                               "(or leave the option out for all)")
    return items


def require(ok: bool, message: str) -> None:
    if not ok:
        raise LangNeuronsError(message)


def parse_lambda(value: str | float) -> float | str:
    """'auto' or a finite, non-negative number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lam = float(value)
    else:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            lam = float(text)
        except ValueError:
            raise LangNeuronsError(f"--lambda must be 'auto' or a number, got {value!r}") from None
    require(math.isfinite(lam), f"--lambda must be finite, got {value!r}")
    require(lam >= 0, f"--lambda must be >= 0, got {value!r}")
    return lam


def parse_range(value: str | Sequence[float]) -> tuple[float, float]:
    """'0,0.2' -> (0.0, 0.2)."""
    parts = [x.strip() for x in value.split(",")] if isinstance(value, str) else list(value)
    try:
        lo, hi = (float(x) for x in parts)
    except (TypeError, ValueError):
        raise LangNeuronsError(f"--lambda-range must look like LO,HI (e.g. 0,0.2), got {value!r}") from None
    require(math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi,
            f"--lambda-range needs finite 0 <= LO < HI, got {value!r}")
    return lo, hi


def parse_class_sets(values: str | Sequence[str] | None) -> tuple[str, ...]:
    """Neuron sets: 'specific;specific,related' (and/or repeated) -> ('specific', 'specific,related')."""
    from .neurons import parse_classes

    if not values:
        return DEFAULT_SETS
    out: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        for spec in value.split(";"):
            if spec.strip():
                # "experts:specific": whole experts of a mixture of experts (router logits masked)
                prefix = "experts:" if spec.strip().startswith("experts:") else ""
                name = prefix + ",".join(parse_classes(spec.strip()[len(prefix):]))
                if name not in out:
                    out.append(name)
    require(bool(out), "--classes is empty; give e.g. specific or 'specific;specific,related'")
    return tuple(out)


def parse_seeds(value: str | Sequence[int]) -> tuple[int, ...]:
    try:
        seeds = [int(x) for x in (value.split(",") if isinstance(value, str) else value) if str(x).strip()]
    except ValueError:
        raise LangNeuronsError(f"--control-seeds must be a comma list of integers, got {value!r}") from None
    require(bool(seeds), "--control-seeds is empty; give e.g. 0,1,2")
    return tuple(seeds)


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise LangNeuronsError(f"--shard must look like i/n (e.g. 0/4), got {value!r}") from None
    require(0 <= i < n, f"--shard {value}: need 0 <= i < n")
    return i, n


_MEMORY = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


def parse_max_memory(value: str | dict | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> accelerate's max_memory dict ({0: '20GiB', ...})."""
    if not value:
        return None
    if isinstance(value, dict):
        return value
    out: dict = {}
    for item in value.split(","):
        key, _, mem = (x.strip() for x in item.partition("="))
        if not key or not mem or not _MEMORY.fullmatch(mem) or not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise LangNeuronsError(f"--max-memory items look like 0=20GiB (GPU 0), cpu=64GiB or disk=200GB, "
                                   f"got {item.strip()!r}")
        out[int(key) if key.isdigit() else key] = mem
    return out


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which model to load and where: the options every model-loading stage takes."""

    model: str | None = None  # None: the run's model (from its manifest)
    dtype: str | None = None  # None: the run's dtype, else float32
    device: str | None = None
    device_map: str | None = None
    max_memory: str | dict | None = None
    act_path: str | None = None  # override of the activation module path, with {i}
    revision: str | None = None  # hub branch/tag/commit (None: the run's recorded commit, else the default)
    trust_remote_code: bool = False  # run modelling code shipped with a hub model
    offline: bool | None = None  # never contact the hub (None: HF_HUB_OFFLINE decides)

    def validate(self) -> "ModelConfig":
        require(self.dtype is None or self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(not (self.device and self.device_map), "give either --device or --device-map, not both")
        self.max_memory = parse_max_memory(self.max_memory)
        require(self.act_path is None or "{i}" in self.act_path,
                f"--mlp-act-path must contain {{i}} (the layer index), got {self.act_path!r}")
        require(self.revision is None or (bool(self.revision.strip()) and " " not in self.revision),
                f"--revision must be a branch, tag or commit of the hub repo, got {self.revision!r}")
        return self

    def load(self, run_manifest: dict[str, Any] | None = None) -> Any:
        """Load the model (the run's model and dtype unless given)."""
        from .models import load_model

        info = (run_manifest or {}).get("model") if isinstance((run_manifest or {}).get("model"), dict) else {}
        name = self.model or info.get("model")
        require(bool(name), "the run's manifest names no model; pass --model")
        # The run's own model at the commit it was recorded with, unless another one is asked for.
        revision = self.revision or (info.get("revision") if not self.model or self.model == info.get("model") else None)
        kwargs: dict[str, Any] = {}
        if revision and "/" in str(name) and not Path(str(name)).expanduser().exists():
            kwargs["revision"] = revision
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if self.offline is not None:
            kwargs["offline"] = self.offline
        return load_model(name, dtype=self.dtype or info.get("dtype") or "float32", device=self.device,
                          device_map=self.device_map, max_memory=parse_max_memory(self.max_memory), **kwargs)


@dataclass
class IdentifyConfig:
    """How neurons are selected and classified (docs/identify.md)."""

    method: str = "entropy-lambda"
    top_rate: float = 0.01
    bar: float = 0.95
    lam: str | float = "auto"
    lam_range: tuple[float, float] = (0.0, 0.2)
    eps: float = 1e-3
    widen: bool = True
    langs: list[str] | None = None  # identify on this subset of the recorded languages

    def validate(self) -> "IdentifyConfig":
        from .identify import METHODS

        require(self.method in METHODS, f"unknown --method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        require(isinstance(self.top_rate, (int, float)) and 0 < self.top_rate <= 1,
                f"--top-rate must be in (0, 1], got {self.top_rate}")
        require(isinstance(self.bar, (int, float)) and 0 < self.bar <= 1, f"--bar must be in (0, 1], got {self.bar}")
        self.lam = parse_lambda(self.lam)
        self.lam_range = parse_range(self.lam_range)
        require(math.isfinite(self.eps) and self.eps > 0, f"--eps must be > 0, got {self.eps}")
        if self.method != "entropy-lambda":
            require(self.lam == "auto", f"--lambda applies to entropy-lambda only, not to --method {self.method}")
        require(self.langs is None or len(self.langs) >= 2, f"--langs needs at least 2 languages, got {self.langs}")
        return self

    def params(self) -> dict[str, Any]:
        """Keyword arguments of `identify.identify` for this method."""
        params: dict[str, Any] = {"top_rate": float(self.top_rate), "bar": float(self.bar)}
        if self.method == "entropy-lambda":
            params.update(lam=self.lam, lam_range=tuple(self.lam_range), eps=self.eps, widen=self.widen)
        return params


@dataclass
class AblationConfig:
    """The intervention matrix: which neuron sets, controls, metrics and evaluation texts."""

    sets: tuple[str, ...] = DEFAULT_SETS
    control: str = "matched"
    control_seeds: tuple[int, ...] = (0, 1, 2)
    control_bins: int = 20  # activity strata per layer of the matched control
    metrics: tuple[str, ...] = PPL_METRICS
    eval_corpus: Path | None = None  # held-out texts (default: the run's eval_corpus.jsonl)
    math_corpus: Path | None = None  # task problems for the accuracy metric
    choice_corpus: str | None = None  # multiple-choice questions (a path or hf:belebele) for choice_accuracy
    langs: list[str] | None = None  # rows and columns (default: the map's languages in the corpus)
    batch_size: int = 8
    scope: str = "auto"
    positions: str = "all"
    bootstrap: int = 0
    max_length: int | None = None
    max_examples: int | None = None
    max_new_tokens: int = 256
    chat: bool | None = None
    progress: bool = True
    force: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    ppl_style: str = "token"  # token-weighted NLL | paper: mean over documents of document means (evaluate.py)
    prompt_template: str = "{question}"  # the user message of an accuracy problem

    def validate(self) -> "AblationConfig":
        self.sets = parse_class_sets(self.sets)
        require(self.control in CONTROLS + ("random",),
                f"--control must be one of {', '.join(CONTROLS)}, got {self.control!r}")
        if self.control == "random":  # the name of the layer-matched control before 0.2
            self.control = "layer"
        self.control_seeds = parse_seeds(self.control_seeds)
        require(isinstance(self.control_bins, int) and self.control_bins >= 1,
                f"--control-bins must be an integer >= 1, got {self.control_bins}")
        self.metrics = tuple(self.metrics)
        bad = [m for m in self.metrics if m not in PPL_METRICS + ("accuracy",) + CHOICE_METRICS]
        require(not bad and bool(self.metrics),
                f"--metric: unknown {bad or list(self.metrics)!r}; use a comma list of nll, ppl, bpb, accuracy, "
                "choice_accuracy")
        require(self.scope in ("auto", "all", "response"), f"--scope must be auto, all or response, got {self.scope!r}")
        require(self.positions in ("all", "generated"), f"--positions must be 'all' or 'generated', got {self.positions!r}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.bootstrap >= 0, f"--bootstrap must be >= 0 (0: no intervals), got {self.bootstrap}")
        require(self.max_examples is None or self.max_examples >= 1, f"--max-examples must be >= 1, got {self.max_examples}")
        require(self.max_length is None or self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(self.ppl_style in PPL_STYLES, f"--ppl-style must be one of {', '.join(PPL_STYLES)}, "
                f"got {self.ppl_style!r}")
        require(isinstance(self.prompt_template, str) and "{question}" in self.prompt_template,
                f"the accuracy prompt template must contain {{question}}, got {self.prompt_template!r}")
        if "accuracy" in self.metrics:
            require(self.math_corpus is not None or (self.eval_corpus is not None and not self.ppl_metrics),
                    "--metric accuracy needs task problems: give --math-corpus PATH (or --eval-corpus PATH when "
                    "accuracy is the only metric)")
        if self.choice_corpus is not None:
            self.choice_corpus = str(self.choice_corpus)
        require("choice_accuracy" not in self.metrics or bool(self.choice_corpus),
                "--metric choice_accuracy needs multiple-choice questions: give --choice-corpus PATH or hf:belebele")
        self.model.validate()
        return self

    @property
    def ppl_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in PPL_METRICS)

    @property
    def control_or_none(self) -> str | None:
        return None if self.control == "none" else self.control


# -- reproducible runs: RunConfig <-> YAML ---------------------------------------------------------
#: RunConfig fields a config file leaves out: how a run is shown, not what it computes
_NOT_IN_FILE = ("progress", "force")


def run_config_to_yaml(cfg: Any) -> str:
    """The YAML text of a `pipeline.RunConfig` (every field that decides the results)."""
    import dataclasses

    import yaml

    from . import __version__

    data: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in _NOT_IN_FILE:
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        data[f.name] = value
    head = f"# langneurons {__version__} run config: replay with `langneurons run --config FILE [--out DIR]`\n"
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def run_config_from_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """A validated `pipeline.RunConfig` from a YAML file (as `run_config_to_yaml` writes it),
    with ``overrides`` (e.g. the options given on the command line) taking precedence."""
    import dataclasses

    import yaml

    from .pipeline import RunConfig

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise LangNeuronsError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise LangNeuronsError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    require(isinstance(data, dict), f"--config {path}: expected a mapping of run options, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - names)
    require(not unknown, f"--config {path}: unknown option(s) {', '.join(unknown)}")
    data.update(overrides or {})
    for key in ("out", "corpus"):
        if data.get(key) is not None and not str(data[key]).startswith("hf:"):
            data[key] = Path(data[key])
    for key in ("neuron_sets", "control_seeds", "metrics"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    if isinstance(data.get("lam"), list):
        data["lam"] = tuple(data["lam"])
    data.setdefault("out", Path("runs/demo"))
    try:
        cfg = RunConfig(**data)
    except TypeError as exc:
        raise LangNeuronsError(f"--config {path}: {exc}") from None
    return cfg.validate()
