"""On-disk cache of item text embeddings, keyed by item ID, model identity and a hash of the text.

Item text changes rarely and BERT encoding is the slow part, so each item is encoded once and only
re-encoded when its text changes. The cache is ONE ``.npz`` file holding:

* ``ids``      -- item IDs as strings (``5`` and ``"5"`` are the same item),
* ``hashes``   -- sha256 (hex, 32 chars) of each item's text,
* ``vectors``  -- float32 [count, dim],
* ``meta``     -- a JSON string: ``{"format": 1, "identity": ..., "dim": ..., "count": ...}``.

Keeping the header inside the same file means a single ``os.replace`` publishes data and metadata
together, so a crash can never leave a header that disagrees with the vectors.

Example::

    from torchrec_mtl.text.cache import ItemTextCache
    from torchrec_mtl.text.encoder import TextEncoder

    enc = TextEncoder()
    cache = ItemTextCache("runs/item_text.npz")
    summary = cache.update({1: "red running shoes", 2: "a cookbook"}, enc)
    # {'encoded': 2, 'reused': 0, 'removed': 0, 'seconds': ..., 'sentences_per_s': ..., ...}
    vecs, has_text = cache.vectors([1, 2, 3])   # item 3 has no text: zero row, has_text[2] is False

A cache written by another model identity (other weights, pooling or max_length) is refused with a
``TextCacheError`` instead of silently mixing vector spaces; pass ``rebuild=True`` to ``update`` to
re-encode everything with the new encoder. A corrupt or truncated file is refused the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
ItemId = str | int


class TextCacheError(RuntimeError):
    """The cache file is unreadable, malformed, or was written by a different model identity."""


def _refuse_non_finite(vectors: np.ndarray, ids: Sequence, where: str, advice: str) -> None:
    """One NaN vector would turn every standardised item vector NaN: refuse it, naming the item."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise TextCacheError(
            f"{where}: item {str(ids[bad[0]])!r} has a non-finite vector ({len(bad):,} item(s) in all); {advice}"
        )


def text_hash(text: str) -> str:
    """Stable hash of one item's text (first 32 hex chars of sha256 of its UTF-8 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class ItemTextCache:
    """Item ID -> text vector cache stored in one ``.npz``; see the module docstring.

    ``expected_identity``: when given, opening a cache written by a different encoder identity raises
    right away (otherwise the check happens in ``update``).
    """

    def __init__(self, path: str | Path, expected_identity: str | None = None) -> None:
        self.path = Path(path)
        self.identity: str | None = None
        self.dim: int | None = None
        self._ids: np.ndarray = np.zeros(0, dtype=str)
        self._hashes: np.ndarray = np.zeros(0, dtype=str)
        self._vectors: np.ndarray = np.zeros((0, 0), dtype=np.float32)
        if self.path.exists():
            self._load()
            if expected_identity is not None and self.identity != expected_identity:
                raise self._identity_error(expected_identity)
        self._index = {k: i for i, k in enumerate(self._ids.tolist())}

    # ---------------------------------------------------------------- reading

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                missing = {"ids", "hashes", "vectors", "meta"} - set(z.files)
                if missing:
                    raise TextCacheError(
                        f"text cache {self.path} is missing entries {sorted(missing)}; "
                        "expected an npz with ids, hashes, vectors and meta written by ItemTextCache"
                    )
                meta = json.loads(str(z["meta"]))
                ids, hashes, vectors = z["ids"], z["hashes"], z["vectors"]
        except TextCacheError:
            raise
        except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError ... all mean "unreadable"
            raise TextCacheError(
                f"text cache {self.path} is corrupt or truncated ({type(e).__name__}: {e}); expected an npz "
                "written by ItemTextCache; delete it to rebuild"
            ) from e
        n = int(meta.get("count", -1))
        dim = int(meta.get("dim", -1))
        ok = (
            meta.get("format") == FORMAT
            and isinstance(meta.get("identity"), str)
            and ids.shape == (n,)
            and hashes.shape == (n,)
            and vectors.shape == (n, dim)
            and vectors.dtype == np.float32
        )
        if not ok:
            raise TextCacheError(
                f"text cache {self.path} has inconsistent contents (meta {meta}, ids {ids.shape}, "
                f"vectors {vectors.shape} {vectors.dtype}); expected format {FORMAT} with count ids and "
                "float32 vectors [count, dim]"
            )
        _refuse_non_finite(vectors, ids, f"text cache {self.path}", "delete it to rebuild")
        self.identity, self.dim = meta["identity"], dim
        self._ids, self._hashes, self._vectors = ids.astype(str), hashes.astype(str), vectors

    def _identity_error(self, expected: str) -> TextCacheError:
        return TextCacheError(
            f"text cache {self.path} was written by model identity {self.identity!r} but the encoder has "
            f"identity {expected!r}; its vectors live in a different space. Use update(..., rebuild=True) "
            "to re-encode everything, or point at another file"
        )

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: ItemId) -> bool:
        return str(item_id) in self._index

    @property
    def ids(self) -> list:
        """Cached item IDs (as strings), in storage order."""
        return self._ids.tolist()

    def vectors(self, ids: Iterable[ItemId]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for ``ids`` in order, plus a bool mask of which had text.

        Fallback: an ID without cached text gets an all-zero row and ``mask=False``, so a model can
        either ignore the row (multiply by the mask) or learn a separate "no text" embedding.
        """
        ids = [str(i) for i in ids]
        dim = self.dim or 0
        out = np.zeros((len(ids), dim), dtype=np.float32)
        mask = np.zeros(len(ids), dtype=bool)
        for row, key in enumerate(ids):
            j = self._index.get(key)
            if j is not None:
                out[row] = self._vectors[j]
                mask[row] = True
        return out, mask

    # ---------------------------------------------------------------- writing

    def update(
        self, items: Mapping[ItemId, str | None], encoder: Any, rebuild: bool = False, progress: bool = True
    ) -> dict[str, Any]:
        """Make the cache hold exactly ``items``: encode new/changed texts, reuse the rest, drop the absent.

        Items whose text is None or blank count as "no text" and are not stored. Writes the file
        atomically. Returns ``{encoded, reused, removed, seconds, sentences_per_s, count, identity}``.
        """
        start = time.perf_counter()
        identity = encoder.identity
        if self.identity is not None and self.identity != identity and not rebuild:
            raise self._identity_error(identity)
        keep_old = not rebuild and self.identity == identity

        wanted = {str(k): str(v) for k, v in items.items() if v is not None and str(v).strip()}
        if len(wanted) != sum(1 for v in items.values() if v is not None and str(v).strip()):
            raise ValueError("item IDs collide after conversion to str (e.g. 5 and '5')")
        new_ids = list(wanted)
        new_hashes = [text_hash(wanted[k]) for k in new_ids]
        dim = int(encoder.dim)
        vectors = np.zeros((len(new_ids), dim), dtype=np.float32)

        todo = []
        reused = 0
        for row, (key, h) in enumerate(zip(new_ids, new_hashes)):
            j = self._index.get(key) if keep_old else None
            if j is not None and self._hashes[j] == h and self._vectors.shape[1] == dim:
                vectors[row] = self._vectors[j]
                reused += 1
            else:
                todo.append(row)
        if todo:
            vectors[todo] = encoder.encode([wanted[new_ids[r]] for r in todo], progress=progress)
            _refuse_non_finite(vectors, new_ids, f"the encoder ({identity})", "nothing was written to the cache")
        removed = len(set(self._ids.tolist()) - set(new_ids))

        self._write(np.array(new_ids, dtype=str), np.array(new_hashes, dtype=str), vectors, identity)
        self.identity, self.dim = identity, dim
        self._ids, self._hashes, self._vectors = np.array(new_ids, dtype=str), np.array(new_hashes, dtype=str), vectors
        self._index = {k: i for i, k in enumerate(new_ids)}
        seconds = time.perf_counter() - start
        return {
            "encoded": len(todo),
            "reused": reused,
            "removed": removed,
            "seconds": seconds,
            "sentences_per_s": (encoder.last_sentences_per_s if todo else None),
            "count": len(new_ids),
            "identity": identity,
        }

    def _write(self, ids: np.ndarray, hashes: np.ndarray, vectors: np.ndarray, identity: str) -> None:
        meta = json.dumps({"format": FORMAT, "identity": identity, "dim": int(vectors.shape[1]), "count": len(ids)})
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        # Temp file in the SAME folder: os.replace is only atomic within one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, ids=ids, hashes=hashes, vectors=vectors, meta=np.array(meta))
                f.flush()
                os.fsync(f.fileno())  # data on disk before the rename makes it visible
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:  # persist the rename itself; not possible on every platform, hence best effort
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass


def encode_items_file(
    items_path: str | Path,
    cache_path: str | Path,
    encoder: Any,
    rebuild: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Bring the cache at ``cache_path`` up to date with an items file (tab-separated, header ``item_id`` and
    ``description``, as the generators write): encode only new or changed descriptions. Returns ``update``'s summary
    plus ``items`` (rows read)."""
    import polars as pl

    if Path(cache_path).exists() and Path(items_path).exists() and os.path.samefile(cache_path, items_path):
        raise TextCacheError(f"{cache_path}: the cache path is the items file itself; choose another cache path")
    if Path(cache_path).is_dir():
        raise TextCacheError(f"{cache_path}: is a folder; expected the path of the .npz cache file")
    try:
        frame = pl.read_csv(items_path, separator="\t", infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as error:
        raise TextCacheError(f"{items_path}: cannot read the items file ({error})") from None
    missing = [c for c in ("item_id", "description") if c not in frame.columns]
    if missing:
        raise TextCacheError(
            f"{items_path}: expected columns item_id and description in the header, missing {missing} "
            f"(found {frame.columns})"
        )
    repeated = frame.filter(pl.col("item_id").is_duplicated()).get_column("item_id")
    if len(repeated):
        raise TextCacheError(
            f"{items_path}: item_id {repeated[0]!r} appears more than once ({len(repeated):,} rows share an ID); "
            "expected one description per item"
        )
    items = dict(zip(frame["item_id"].to_list(), frame["description"].fill_null("").to_list(), strict=True))
    summary = ItemTextCache(cache_path).update(items, encoder, rebuild=rebuild, progress=progress)
    return {"items": frame.height, **summary}
