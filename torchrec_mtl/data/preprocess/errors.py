"""The errors preprocessing raises: a log it cannot read at all, and a run stopped for too many rejected rows.

Their own module because reading (read_chunks) and the run (preprocess) both raise them; the package re-exports both.
"""

from __future__ import annotations


class LogFormatError(ValueError):
    """A log that cannot be read at all (a header that does not match, a truncated .gz); names the file."""


class TooManyBadRows(ValueError):
    """The rejected share exceeded ``max_bad_fraction``; the message has the counts, examples and the rejects file."""
