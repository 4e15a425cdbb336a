"""Atomic file writes and checksums.

Nothing is ever written half: every artifact goes to a temporary file in the same directory
and is renamed into place, so a killed run leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError

from .errors import ArtifactError, WriteError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file onto ``path``.

    Any failure to write (a full disk, a read-only directory; ``OSError`` or safetensors'
    ``SafetensorError``) becomes one `WriteError` naming ``path``, after the temporary file is
    removed: the old file, if any, is untouched and no half-written file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; artifacts are meant to be shared like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        if isinstance(exc, (OSError, SafetensorError)):
            raise _write_error(path, exc) from None
        raise
    return path


def _write_error(path: Path, exc: BaseException) -> WriteError:
    """The reason of a failed write in words: ``strerror`` of an OSError; for a SafetensorError
    (its message embeds Rust's io::Error, e.g. ``IoError(Os { code: 28, kind: StorageFull,
    message: "No space left on device" })``) the embedded message and code."""
    if isinstance(exc, OSError):
        return WriteError(path, exc.strerror or str(exc) or type(exc).__name__, exc.errno or 0)
    text = str(exc)
    found = re.search(r'message: "([^"]+)"', text)
    code = re.search(r"code: (\d+)", text)
    reason = found.group(1) if found else (" ".join(text.split()) or type(exc).__name__)
    return WriteError(path, reason, int(code.group(1)) if code else 0)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def torch_load_tensors(path: str | os.PathLike, error: type[Exception]) -> Any:
    """``torch.load(path, weights_only=True)`` of a published file, with one-line errors.

    Only tensors, numbers, strings, lists and dicts are ever unpickled. A file holding other
    Python objects is refused with a line saying so -- never torch's multi-line advice to pass
    ``weights_only=False``, which would run whatever code the file carries.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise error(f"{path} is not a tensor file langneurons can load safely (it holds Python objects other "
                    "than tensors, numbers, lists and dicts; such pickles are never loaded)") from None
    except Exception as exc:  # truncated, not a torch file, unreadable
        first = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        raise error(f"cannot read {path} as a torch file ({first[:200]})") from None


def read_parquet(path: str | os.PathLike, redo: str = "run the stage that writes it again") -> Any:
    """``pandas.read_parquet`` of a run artifact; a truncated or damaged file is one
    `ArtifactError` naming it (pyarrow's own errors are long and name no remedy)."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:  # ArrowInvalid, OSError, ValueError, ...: all mean "cannot use this file"
        first = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        first = first.replace(f"'{path}'", "").replace(str(path), "")
        raise ArtifactError(f"{path} is unreadable or truncated ({first[:160].strip()}); delete it and {redo}") from None


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header.

    safetensors keeps ``__metadata__`` in a hash map, so two saves of the same content write
    its keys in a different order (different bytes, different checksums: a replayed run could
    not be told identical to the original).  The header is rewritten with the metadata keys
    sorted; its length, and so every tensor offset, is unchanged."""
    import json
    import struct

    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # never happens for a pure reordering; leave the file as it was
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))
