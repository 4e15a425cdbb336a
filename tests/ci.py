"""Skips that must not hide real checks on CI (issue 19, item 14).

Locally a missing tool (Chromium) or model is a reason to skip a check; on CI (``CI=true``,
set by every CI service and by ``.ci/run``) the same condition means the check never ran, so
it fails instead and names what is missing.
"""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """``pytest.skip(reason)``, or ``pytest.fail`` under CI=true (a skip there hides a real check)."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: this check must run on CI, so a skip is a failure)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str | None = None):
    """``pytest.importorskip(name)``, failing instead of skipping under CI=true: every optional
    package the tests use is in the ``[test]`` extra that CI installs."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        why = reason or f"needs the {name} package"
        if on_ci():
            pytest.fail(f"{why} (CI=true: this check must run on CI, so a skip is a failure)", pytrace=False)
        pytest.skip(why, allow_module_level=True)  # also at a module's top (test_lm_eval.py)
