"""The report page and the files it is written to: ``render_html`` puts the summary, tables, warnings and figures
(embedded as base64 PNG, so the page stands alone) into one HTML document; ``write_report`` reads a run folder and
writes that page with the figures as PNG in a folder beside it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from torchrec_mtl.outputs import KNOWN_NAMES, check_folder, new_file, new_folder
from torchrec_mtl.report.canvas import FigureSection
from torchrec_mtl.report.data import dig, load_predictions, load_results, number, task_kinds
from torchrec_mtl.report.figures import FIGURES, draw_figures
from torchrec_mtl.report.tables import html_table, metrics_table, run_summary, segments_table

# a figures folder holding only these (written before folders were marked) is an earlier report's, to replace
KNOWN_NAMES["report"] = {f"{name}.png" for name in FIGURES}

PathLike = Union[str, Path]

# the first line of every report: a file that starts with it is one of ours, which a new report may replace
HTML_FIRST_LINE = "<!DOCTYPE html><!-- torchrec-mtl run report -->"

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1.2em; }
dt { font-weight: 600; } dd { margin: 0; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; }
.note { color: #666; font-style: italic; margin: .3em 0; }
.warning { color: #9a3412; }
"""


def _figure_html(figure: FigureSection) -> str:
    """A figure's section: its title, its image when drawn, then its notes."""
    parts = [f"<h2>{html.escape(figure.title)}</h2>"]
    if figure.png is not None:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(f'<img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">')
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in figure.notes]
    return "\n".join(parts)


def render_html(results: Dict[str, Any], run_dir: Path, figures: Sequence[FigureSection]) -> str:
    """The whole page: summary, tables, warnings, then the figures (embedded, so the file stands alone)."""
    summary = "".join(
        f"<dt>{html.escape(what)}</dt><dd>{html.escape(value)}</dd>" for what, value in run_summary(results, run_dir)
    )
    parts = [f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>", f"<dl>{summary}</dl>"]
    kinds = task_kinds(results)
    parts += ["<h2>Test metrics</h2>", metrics_table(results["tasks"], kinds)]
    segments = results.get("segments") or {}
    if segments:
        parts += ["<h2>Test metrics by item segment</h2>", segments_table(segments, kinds)]
    cosine = dig(results, "diagnostics", "gradient_cosine", default={})
    if cosine:
        parts += [
            "<h2>Gradient cosine between tasks (shared tower parameters)</h2>",
            html_table(["tasks", "mean cosine"], [[pair.replace("|", " & "), number(v)] for pair, v in cosine.items()]),
        ]
    warnings = dig(results, "diagnostics", "warnings", default=[])
    parts.append("<h2>Warnings</h2>")
    if warnings:
        parts.append("<ul>" + "".join(f'<li class="warning">{html.escape(str(w))}</li>' for w in warnings) + "</ul>")
    else:
        parts.append('<p class="note">none</p>')
    parts += [_figure_html(figure) for figure in figures]
    return (
        f'{HTML_FIRST_LINE}\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Run report: {html.escape(run_dir.resolve().name)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        "<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_report(run_dir: PathLike, out: Optional[PathLike] = None) -> Path:
    """Write the run's HTML report (default ``run_dir/report.html``) and its figures as PNG in a folder beside it.

    The folder is named after the HTML file without its suffix: ``run_dir/report/`` for the default. Returns the
    HTML file's path. Raises ``ReportError`` when ``results.json`` (or a present ``predictions.npz``) is missing or
    malformed.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    results = load_results(run_dir / "results.json")
    source = run_dir / "predictions.npz"
    predictions = load_predictions(source)
    figures = draw_figures(results, predictions, source)

    folder = out.with_suffix("") if out.suffix else out.parent / f"{out.name}_figures"
    inputs = [run_dir / "results.json", source]
    check_folder(folder, "report", inputs, option="--out (its figures folder)")
    with new_file(out, inputs, ours_if_starts_with=HTML_FIRST_LINE) as page:
        with new_folder(folder, "report", inputs, option="--out (its figures folder)") as pngs:
            for figure in figures:
                if figure.png is not None:
                    (pngs / f"{figure.name}.png").write_bytes(figure.png)
        page.write(render_html(results, run_dir, figures))
    return out
