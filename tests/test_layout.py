"""The package's shape rules (issue 13): no module reaches into another module's private names,
and the command-line modules stay thin (no function over ~80 lines in cli/)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "langneurons"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: set[str] = set()  # names bound to langneurons modules in this file
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("langneurons")):
            for alias in node.names:
                if _private(alias.name):
                    out.append(f"{path.name}:{node.lineno} imports {alias.name}")
                modules.add(alias.asname or alias.name)  # may be a module (from . import x)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("langneurons"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in modules):
            out.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return out


def test_no_module_uses_a_private_name_of_another():
    bad = [v for p in sorted(SRC.rglob("*.py")) for v in _violations(p)]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_what_it_should(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from .stats import _torch_load\nfrom . import record\nrecord._RESUME_KEYS\n", encoding="utf-8")
    assert len(_violations(p)) == 2


def test_cli_functions_are_short():
    long = []
    for p in sorted((SRC / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
