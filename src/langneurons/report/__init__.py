"""Figures and the self-contained HTML report of a run.

* `build_report(run_dir)` writes RUN_DIR/report.html (and RUN_DIR/figures/*.png|svg);
* `write_figures(run_dir, anatomy, nmap)` draws the figures alone;
* `register_section(name, title, render)` lets later stages add their own section
  (see `langneurons.report.sections`).
"""

from .figures import FigureResult, write_figures
from .html import ReportContext, build_report
from .sections import figure_html, register_section, table_html

__all__ = ["FigureResult", "ReportContext", "build_report", "figure_html", "register_section", "table_html",
           "write_figures"]
