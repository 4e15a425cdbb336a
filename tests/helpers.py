"""Helpers shared by the test modules (one copy each). Oracles (naive loops, hand computations)
stay in the test modules next to what they check, independent of src."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from langneurons.cli import main
from tiny import SAMPLE_TEXTS


def message_lines(err: str) -> list[str]:
    """stderr lines that are messages: warnings and progress bars are not."""
    return [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")
            and not x.startswith("WARNING:") and not re.search(r"\d+%\|", x)]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run the command line in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_error(argv, capsys) -> str:
    """Run the CLI, expect exit code 2 and exactly one stderr message line starting with 'error:'."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def class_rule(active, selected):
    """The documented class rule written out case by case (an oracle independent of src):
    codes 1 specific, 2 related, 3 general (any neuron active in all K), 4 unassigned; returns
    (classes int8 [L, N], active kept only where it is defined: selected or general)."""
    import torch

    K = active.shape[0]
    n_act = active.sum(0)
    classes = torch.zeros(selected.shape, dtype=torch.int8)
    classes[selected & (n_act == 0)] = 4
    classes[selected & (n_act == 1)] = 1
    classes[selected & (n_act >= 2) & (n_act < K)] = 2
    classes[n_act == K] = 3
    return classes, active & (selected | (n_act == K)).unsqueeze(0)


def write_sample_corpus(directory: Path, repeat: int = 3) -> Path:
    """A <lang>.txt corpus of the tiny tokenizer's sample sentences (each repeated)."""
    directory.mkdir(parents=True, exist_ok=True)
    for lang, texts in SAMPLE_TEXTS.items():
        (directory / f"{lang}.txt").write_text("\n".join(texts * repeat) + "\n", encoding="utf-8")
    return directory


__all__ = ["message_lines", "run_cli", "cli_error", "class_rule", "write_sample_corpus", "pytest"]
