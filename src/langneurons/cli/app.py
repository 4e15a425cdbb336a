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


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"langneurons {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log lines (-v: info, -vv: debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors (no warnings, no info lines)."),
) -> None:
    """Find, classify and test the language neurons of Hugging Face causal language models."""
    import logging
    import warnings

    if quiet and verbose:
        raise LangNeuronsError("give either -q or -v, not both")
    level = logging.ERROR if quiet else logging.DEBUG if verbose >= 2 else logging.INFO if verbose else None
    if level is not None:
        logging.getLogger("langneurons").setLevel(level)
        logging.getLogger().setLevel(min(level, logging.getLogger().level))
    if quiet:
        warnings.simplefilter("ignore")
