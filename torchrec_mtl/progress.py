"""When progress bars are drawn: asked for, and on a terminal. A redirected log (a file, a pipe, CI) gets no bar
redraws; the summaries and curve lines are printed as lines either way.

Example::

    >>> bar_disabled(False), bar_disabled(True)
    (True, None)
"""

from __future__ import annotations

from typing import Optional


def bar_disabled(progress: bool) -> Optional[bool]:
    """tqdm's ``disable``: True when not asked for; None (tqdm's "only on a terminal") when asked for."""
    return None if progress else True
