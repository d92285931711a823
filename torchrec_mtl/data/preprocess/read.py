"""Reading a log: complete lines in bounded chunks, plain or gzip, with exact line numbers.

A line longer than the limit is counted as it streams by and never held whole; an empty line stands in for it so the
line numbers after it stay exact (LineTooLong), and ChunkParser.parse rejects it as "line too long".

Example::

    >>> for chunk, consumed, too_long in read_chunks(Path("day_0.gz"), 8 << 20):  # doctest: +SKIP
    ...     assert chunk.endswith(b"\\n")
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_mtl.data.preprocess.errors import LogFormatError


def _open_bytes(path: Path) -> Tuple[io.BufferedReader, IO[bytes]]:
    """The file and a stream of its bytes, gunzipped when it starts with the gzip magic number."""
    raw = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    buffered = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
    gzipped = buffered.peek(2)[:2] == b"\x1f\x8b"  # peek, not seek: pipes cannot seek
    return buffered, (gzip.GzipFile(fileobj=buffered) if gzipped else buffered)


MAX_LINE_BYTES = 1 << 20  # the default longest line read: longer ones are rejected as "line too long"
_TOO_LONG_HEAD = 200  # bytes of a line too long kept for rejects.tsv


@dataclass
class LineTooLong:
    """A line of more than ``limit`` bytes, skipped while it was read: an empty line stands in for it in its chunk
    (so the line numbers after it stay exact), and ChunkParser.parse rejects that line as "line too long"."""

    index: int  # of the stand-in among its chunk's lines (0: the first)
    length: int  # bytes before its b"\n"
    limit: int
    head: bytes  # its first bytes

    def value(self) -> str:
        return f"{self.length:,} bytes, limit {self.limit:,}"

    def raw_line(self) -> str:
        return self.head.decode("utf-8", "replace") + f"... ({self.length - len(self.head):,} more bytes)"


def read_chunks(
    path: Path, chunk_bytes: int, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[Tuple[bytes, int, List[LineTooLong]]]:
    """Yield (chunk of whole lines ending in b"\\n", bytes of the file consumed so far, the chunk's lines too long).

    Reads sequentially, so a named pipe works as well as a file (its progress then counts uncompressed bytes). A line
    of more than ``max_line_bytes`` bytes before its b"\\n" is counted as it streams by, never held whole, and an
    empty line stands in for it (see LineTooLong): a chunk is at most ``chunk_bytes + max_line_bytes + 1`` bytes."""
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes: expected at least 1, got {max_line_bytes}")
    raw, stream = _open_bytes(path)
    carry = b""  # the start of a line not ended yet: at most max_line_bytes bytes
    skipping: Optional[LineTooLong] = None  # a line not ended yet that is already too long: only counted
    consumed = 0
    with raw:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
                raise LogFormatError(
                    f"{path}: compressed data is truncated or corrupt after {consumed:,} bytes of it were read "
                    f"({type(error).__name__}: {error}); re-copy or re-compress it"
                ) from None
            if not block:
                break
            consumed = raw.tell() if stream is not raw else consumed + len(block)
            ended: Optional[LineTooLong] = None
            if skipping is not None:
                cut = block.find(b"\n")
                if cut < 0:
                    skipping.length += len(block)
                    continue
                skipping.length += cut
                ended, skipping, block = skipping, None, block[cut + 1 :]
            else:
                block = carry + block
            cut = block.rfind(b"\n")
            whole, carry = block[: cut + 1], block[cut + 1 :]
            if len(carry) > max_line_bytes:
                skipping, carry = LineTooLong(0, len(carry), max_line_bytes, carry[:_TOO_LONG_HEAD]), b""
            chunk, too_long = _skip_long_lines(whole, max_line_bytes)
            if ended is not None:
                chunk = b"\n" + chunk
                too_long = [ended, *(replace(t, index=t.index + 1) for t in too_long)]
            if chunk:
                yield chunk, consumed, too_long
        if skipping is not None:
            yield b"\n", consumed, [skipping]
        elif carry:
            yield carry + b"\n", consumed, []


def _skip_long_lines(chunk: bytes, max_line_bytes: int) -> Tuple[bytes, List[LineTooLong]]:
    """``chunk`` (whole lines) with an empty line in place of each line of more than ``max_line_bytes`` bytes."""
    if len(chunk) <= max_line_bytes + 1:
        return chunk, []
    ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    long_lines = np.flatnonzero(ends - starts > max_line_bytes).tolist()
    if not long_lines:
        return chunk, []
    pieces, too_long, position = [], [], 0
    for i in long_lines:
        start, end = int(starts[i]), int(ends[i])
        pieces.append(chunk[position:start])
        too_long.append(LineTooLong(i, end - start, max_line_bytes, chunk[start : start + _TOO_LONG_HEAD]))
        position = end  # its b"\n" stays
    pieces.append(chunk[position:])
    return b"".join(pieces), too_long


def drop_first_line(chunk: bytes, too_long: Sequence[LineTooLong]) -> Tuple[bytes, bytes, List[LineTooLong]]:
    """(the chunk's first line without its line end, the rest of the chunk, the rest's lines too long)."""
    first, _, rest = chunk.partition(b"\n")
    return first.rstrip(b"\r"), rest, [replace(t, index=t.index - 1) for t in too_long if t.index > 0]
