"""The typer application object shared by the command modules (cli/<stage>.py)."""

from __future__ import annotations

import typer

from ..errors import LangNeuronsError

app = typer.Typer(
    name="langneurons",
    help="Find, classify and test the language neurons of Hugging Face causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def split_list(value: str | None, option: str = "the comma list") -> list[str] | None:
    """'en,zh, de' -> ['en', 'zh', 'de']; None/'' -> None (the option was left out).

    A value that names nothing (',,', ' , ') is an error, never "all": it is a typo or an
    empty shell variable, and reading it as "everything" would silently widen the analysis.
    """
    if value is None or value == "":
        return None
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise LangNeuronsError(f"{option} {value!r} names nothing; give a comma list such as en,de "
                               "(or leave the option out for all)")
    return items
