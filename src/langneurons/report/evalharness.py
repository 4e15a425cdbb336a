"""Report section: lm-evaluation-harness results under interventions (``langneurons eval``)."""

from __future__ import annotations

import json
from pathlib import Path

from .sections import esc, note_html, register_section, table_html


def _section_eval(run_dir: Path) -> str | None:
    from ..evalharness import RESULTS, results_table

    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    header, rows = results_table(result)
    shown = [[f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in rows]
    note = note_html(f"lm-evaluation-harness tasks {', '.join(result.get('tasks', []))} on {result.get('model')} "
                     f"(revision {result.get('revision') or 'local files'}); 'none' is the unmodified model, "
                     "equal to lm-eval's hf model. Per-sample records: eval/samples/.")
    return note + table_html([esc(h) for h in header], shown)


register_section("eval", "Evaluation harness (lm-eval)", _section_eval, order=55)
