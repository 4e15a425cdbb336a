"""Errors that the CLI turns into one clear line (never a deep traceback).

Every error a user can cause with bad input derives from `LangNeuronsError`; its message
says what is wrong and what to do.
"""


class LangNeuronsError(Exception):
    """Base class for user-facing errors: the message is the whole story."""


class CorpusError(LangNeuronsError, ValueError):
    """The corpus cannot be read or is not what the command needs."""


class StatsError(LangNeuronsError, ValueError):
    """Activation statistics are missing, corrupt or incompatible."""


class ArchitectureError(LangNeuronsError, ValueError):
    """The model's MLP activation cannot be located."""


class NeuronMapError(LangNeuronsError, ValueError):
    """A neuron map is missing, corrupt or does not fit the model/stats."""


class WriteError(LangNeuronsError, OSError):
    """An artifact could not be written (disk full, read-only directory, ...).

    Raised by `langneurons.io.atomic_write` for every artifact, whatever the writer raised
    (``OSError``, or safetensors' ``SafetensorError``, which is *not* an OSError). It is both a
    `LangNeuronsError` (the CLI prints one line) and an ``OSError`` (code that handles I/O
    errors keeps working); ``strerror`` is the reason, ``filename`` the artifact. Nothing is
    left half-written: the temporary file is removed and the old artifact, if any, stays.
    """

    def __init__(self, path: object, reason: str, errno: int = 0):
        OSError.__init__(self, errno, reason, str(path))

    def __str__(self) -> str:
        return (f"cannot write {self.filename} ({self.strerror}); check free space and permissions "
                "(nothing was written)")


class ArtifactError(LangNeuronsError, ValueError):
    """A run artifact (ablation.parquet, stability tables, ...) is unreadable, truncated or damaged."""
