"""`import langneurons`: lazy public names, and the import stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import langneurons


def test_import_is_light():
    code = ("import sys, langneurons; heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", sorted(langneurons._EXPORTS))
def test_every_export_resolves_to_its_module_object(name):
    value = getattr(langneurons, name)
    module = importlib.import_module(f"langneurons.{langneurons._EXPORTS[name]}")
    assert value is getattr(module, name)
    assert name in dir(langneurons) and name in langneurons.__all__


def test_unknown_names_and_submodules():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        langneurons.nope  # noqa: B018
    record_module = importlib.import_module("langneurons.record")
    assert langneurons.record is record_module and callable(record_module.record)  # not shadowed by an export
