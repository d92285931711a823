"""From a job's data section to preprocessed shards: resolve the files, and preprocess only when something changed.

Example::

    >>> log = prepare_shards(load_config("configs/mmoe_synthetic.yaml").data)  # doctest: +SKIP
    >>> log.rows("train"), log.table_sizes  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Dict, List

from torchrec_mtl.config import DataConfig
from torchrec_mtl.data.preprocess import MAX_LINE_BYTES, input_fingerprint, preprocess
from torchrec_mtl.data.shards import ShardedLog
from torchrec_mtl.schema import DatasetSchema


class MissingInputError(FileNotFoundError):
    """A configured train or test pattern that matches no file."""


def resolve_files(config: DataConfig) -> Dict[str, List[str]]:
    """split -> sorted files matching the configured patterns (relative to ``config.dir`` unless absolute)."""
    files_by_split = {}
    splits = (("train", config.train), ("validation", config.validation),
              ("test", [] if config.test_fraction > 0 else config.test))  # fmt: skip
    for split, patterns in splits:
        files: List[str] = []
        for pattern in patterns:
            full = pattern if Path(pattern).is_absolute() else str(Path(config.dir) / pattern)
            matched = sorted(glob.glob(full))
            if not matched:
                raise MissingInputError(f"data.{split}: {pattern!r} matches no file (looked for {full})")
            files.extend(matched)
        if files:
            files_by_split[split] = files
    return files_by_split


def shards_dir(config: DataConfig) -> Path:
    return Path(config.shards) if config.shards else Path(config.dir) / "shards"


def prepare_shards(config: DataConfig, progress: bool = True) -> ShardedLog:
    """Preprocess the configured logs into ``shards_dir(config)`` unless it already holds them; open them."""
    schema = DatasetSchema.from_yaml(config.schema)
    files_by_split = resolve_files(config)
    split_options = {"test_fraction": config.test_fraction, "split_seed": config.split_seed}
    if config.max_line_bytes != MAX_LINE_BYTES:  # the default stays out, so earlier shards are reused
        split_options["max_line_bytes"] = config.max_line_bytes
    wanted = input_fingerprint(schema, files_by_split, **split_options)
    out = shards_dir(config)
    metadata = out / "metadata.json"
    if metadata.exists() and json.loads(metadata.read_text()).get("fingerprint") == wanted:
        if progress:
            print(f"reusing the preprocessed shards in {out}", flush=True)
    else:
        if progress:
            print(f"preprocessing {sum(map(len, files_by_split.values()))} file(s) into {out} ...", flush=True)
        preprocess(
            schema, files_by_split, out, max_bad_fraction=config.max_bad_fraction, progress=progress,
            out_option="data.shards", **split_options,
        )  # fmt: skip
    return ShardedLog.open(out)
