"""The section registry of the HTML report, and helpers to write sections.

Later stages add their section without editing html.py: a module inside ``langneurons.report``
(imported automatically when a report is built) or any code that runs before `build_report`
calls::

    from langneurons.report.sections import register_section

    def render(run_dir: Path) -> str | None:      # None: nothing to show for this run
        if not (run_dir / "comparison.parquet").exists():
            return None
        return "<p>...</p>"                       # an HTML fragment (escape your text!)

    register_section("comparison", "Base vs aligned", render, order=60)

The fragment is wrapped in ``<section id="section-<name>"><h2>title</h2> ... </section>``.
Registering a name again replaces the earlier section (so a stage can take over a built-in one).
A section whose renderer raises is shown as a one-line error instead of breaking the report.
Built-in order: manifest 10, summary 20, identification 30, anatomy 40, interventions 50.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Renderer = Callable[..., "str | None"]


@dataclass
class Section:
    name: str  # element id is "section-<name>"
    title: str
    render: Renderer  # render(run_dir) -> html | None, or render(run_dir, ctx) when takes_context
    order: int = 100
    takes_context: bool = False


_REGISTRY: dict[str, Section] = {}


def register_section(name: str, title: str, render: Renderer, *, order: int = 100,
                     takes_context: bool = False) -> Section:
    """Add (or replace) a report section; see the module docstring."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"section name {name!r} must be non-empty letters, digits, '-' or '_' (it becomes an id)")
    section = Section(name, title, render, order, takes_context)
    _REGISTRY[name] = section
    return section


def unregister_section(name: str) -> None:
    _REGISTRY.pop(name, None)


def sections() -> list[Section]:
    """Registered sections in display order (order, then name)."""
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


# -- helpers for section authors -------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def png_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the PNG header, None when the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def figure_html(png: str | Path, alt: str, caption: str, fig_id: str | None = None, scale: float = 2 / 3) -> str:
    """An embedded PNG figure (data URI: the page needs no other file) with its caption.

    The image is shown at ``scale`` of its pixel size (150-dpi figures at 100 CSS px per inch, so
    they stay sharp on high-density screens and keep their relative sizes), never wider than the page.
    """
    alt = alt.strip() or Path(png).stem.replace("_", " ")
    ident = f' id="{esc(fig_id)}"' if fig_id else ""
    size = png_size(png)
    dims = f' width="{round(size[0] * scale)}" height="{round(size[1] * scale)}"' if size else ""
    return (f'<figure{ident}><img src="{png_data_uri(png)}" alt="{esc(alt)}"{dims}>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def table_html(header: list[Any], rows: list[list[Any]], cls: str = "", footer: list[list[Any]] | None = None) -> str:
    """A simple escaped table; numbers are right-aligned."""

    def cell(tag: str, v: Any) -> str:
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        text = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else (
            f"{v:,.4g}" if isinstance(v, float) else str(v))
        return f'<{tag}{" class=num" if num else ""}>{esc(text)}</{tag}>'

    # an all-empty header (key/value tables) gets no header row at all
    head = "".join(f"<th>{esc(h)}</th>" for h in header) if any(str(h) for h in (header or [])) else ""
    body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
    foot = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in (footer or []))
    c = f' class="{esc(cls)}"' if cls else ""
    return (f"<table{c}>" + (f"<thead><tr>{head}</tr></thead>" if head else "") + f"<tbody>{body}</tbody>"
            + (f"<tfoot>{foot}</tfoot>" if foot else "") + "</table>")


def note_html(text: str, kind: str = "note") -> str:
    return f'<p class="{esc(kind)}">{esc(text)}</p>'
