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
