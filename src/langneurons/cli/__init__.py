"""Command line: a thin typer layer over the public functions of each stage.

Every user error (`LangNeuronsError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import warnings

from ..errors import LangNeuronsError
from .app import app

# Each module registers its commands on `app` when imported.
from . import record as _record  # noqa: F401,E402
from . import identify as _identify  # noqa: F401,E402
from . import anatomy as _anatomy  # noqa: F401,E402
from . import ablate as _ablate  # noqa: F401,E402
from . import compare as _compare  # noqa: F401,E402
from . import run as _run  # noqa: F401,E402
from . import align as _align  # noqa: F401,E402
from . import confidence as _confidence  # noqa: F401,E402
from . import lens as _lens  # noqa: F401,E402
from . import eval as _eval  # noqa: F401,E402
from . import package as _package  # noqa: F401,E402
from . import generate as _generate  # noqa: F401,E402
from . import steer as _steer  # noqa: F401,E402


def _warning_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr)


INTERRUPTED = ("interrupted: finished languages and flushed partial counts are kept; run the same command "
               "again to resume")


def _one_line(exc: BaseException) -> str:
    """The message on one line (a message that spans lines would look like several errors)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every outcome is an exit code and at most one message line.

    0: done; 2: bad input (``error: ...``, also usage errors); 130: Ctrl-C (``interrupted: ...``).
    typer with ``standalone_mode=False`` turns Ctrl-C into ``Exit(130)`` and *returns* 130
    instead of raising, so the return value is an exit code too (no command returns a value).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.showwarning = _warning_line
    try:
        code = app(args=argv, prog_name="langneurons", standalone_mode=False)
    except LangNeuronsError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except OSError as exc:
        # A full disk or a read-only directory that no stage turned into a LangNeuronsError.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or _one_line(exc)}; check free space and permissions", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        # Usage errors: typer >= 0.22 raises exceptions of its own copy of click, so they are
        # recognised by their interface (format_message() + exit_code) rather than by class.
        code_attr = getattr(exc, "exit_code", None)
        if callable(getattr(exc, "format_message", None)) and isinstance(code_attr, int):
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `langneurons`: the help is the answer
                exc.show()  # type: ignore[attr-defined]
                raise SystemExit(code_attr) from None
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            print(f"error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
            raise SystemExit(code_attr) from None
        if type(exc).__name__ == "Abort":  # end of input at a prompt
            print("error: aborted (no more input)", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    if code == 130:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130)
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        raise SystemExit(code)

if __name__ == "__main__":
    main()
