"""What every report figure shares: the ``FigureSection`` it ends up as, a matplotlib figure of a few panels, its
PNG bytes, and the legend, tick and colour choices that keep the figures alike.

matplotlib is imported inside the functions: it is an optional dependency, and importing the report (as the CLI
does for ``ReportError``) must not need it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

PANELS_PER_ROW = 3
DPI = 100


@dataclass
class FigureSection:
    """One drawn figure (its PNG bytes) or the reason it was not drawn, with notes on what it leaves out."""

    name: str
    title: str
    png: Optional[bytes] = None
    notes: List[str] = field(default_factory=list)


def new_figure(panels: int, width: float = 4.6, height: float = 3.8) -> Tuple[Any, List[Any]]:
    """A figure of ``panels`` axes, at most PANELS_PER_ROW a row, with the spare axes of the last row removed.

    Figures come from ``matplotlib.figure.Figure`` on the Agg canvas rather than from pyplot: nothing is registered
    globally, so nothing is left open, and a caller's interactive backend (a notebook's) is left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # an optional dependency: the rest of the package runs without it
        raise ImportError("the run report draws its figures with matplotlib; pip install matplotlib") from error

    columns = min(panels, PANELS_PER_ROW)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for spare in axes[panels:]:
        spare.remove()
    return figure, list(axes[:panels])


def png_bytes(figure: Any) -> bytes:
    """The figure as PNG, then cleared: each figure is drawn once, and its memory goes with it."""
    buffer = io.BytesIO()
    # No "Software" entry: the PNG's bytes then depend on the data only, not on the matplotlib version.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    figure.clear()
    return buffer.getvalue()


def outside_legend(axis: Any) -> None:
    """A legend right of the axes: lines that span the whole step range leave no free corner inside them."""
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def log_ticks(axis: Any, low: float, high: float) -> None:
    """Plain-number ticks on log axes: 1-2-5 steps over a short range, powers of ten over a long one.

    matplotlib labels minor ticks as ``2×10^-2`` when a range spans little more than a decade, and they collide.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    subs = (1.0, 2.0, 5.0) if high / low < 100 else (1.0,)
    for which in (axis.xaxis, axis.yaxis):
        which.set_major_locator(LogLocator(base=10, subs=subs))
        which.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        which.set_minor_formatter(NullFormatter())


def task_colors(names: Sequence[str]) -> Dict[str, str]:
    """One colour per task, the same in every figure."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}
