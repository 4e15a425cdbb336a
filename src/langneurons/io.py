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

from .errors import WriteError


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
