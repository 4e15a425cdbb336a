"""The typer application object shared by the command modules (cli/<stage>.py)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="langneurons",
    help="Find, classify and test the language neurons of Hugging Face causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def split_list(value: str | None) -> list[str] | None:
    """'en,zh, de' -> ['en', 'zh', 'de']; None/'' -> None."""
    if value is None:
        return None
    items = [x.strip() for x in value.split(",") if x.strip()]
    return items or None
