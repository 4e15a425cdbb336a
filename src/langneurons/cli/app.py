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


from ..config import split_list  # noqa: E402,F401 - the CLI modules' list parser lives with the configs
