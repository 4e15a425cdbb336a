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


def _warning_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.showwarning = _warning_line
    try:
        app(args=argv, standalone_mode=False)
    except LangNeuronsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished languages and flushed partial counts are kept; run again to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:
        # Usage errors: typer >= 0.22 raises exceptions of its own copy of click, so they are
        # recognised by their interface (show() + exit_code) rather than by class.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            raise SystemExit(code) from None
        if type(exc).__name__ == "Abort":
            raise SystemExit(1) from None
        raise

if __name__ == "__main__":
    main()
