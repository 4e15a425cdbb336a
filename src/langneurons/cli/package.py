"""`langneurons package`: a shareable neuron set with provenance and a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app


@app.command("package")
def package_(
    run_dir: Path = typer.Argument(..., help="Run directory with a neuron map."),
    out: Path = typer.Argument(..., help="Folder to write (neurons, provenance.json, README.md model card)."),
    push_to_hub: Optional[str] = typer.Option(None, help="Upload the folder to this hub repo (user/name)."),
    public: bool = typer.Option(False, help="With --push-to-hub: create the repo public (default: private)."),
) -> None:
    """Package a run's neuron map with its full provenance, for sharing."""
    from ..package import package

    folder = package(run_dir, out, push_to_hub=push_to_hub, private=not public)
    typer.echo(f"wrote {folder}" + (f" and pushed it to {push_to_hub}" if push_to_hub else ""))
