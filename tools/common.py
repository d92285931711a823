"""What the comparison tools share: repeated runs of the main job (run or reuse a run, mean and spread over seeds),
quiet logs, and the shared data beside the checkout. Not part of the package: the tools import it as ``common``
(tools/ is on ``sys.path`` when a tool runs as a script; a tool that is also loaded from its file, as
tests/test_retrieval.py loads eval_representations.py, puts tools/ there first).

A run is reused when its ``results.json`` was made by the same learned configuration (everything but where it writes,
progress display and diagnostics' sampling) on the same data (the input files' fingerprint, and for a generated log
the generator's version); otherwise it runs again.

Example::

    >>> results = run_or_reuse(load_config("configs/mmoe_synthetic.yaml", ["out_dir=runs/x/seed0"]))  # doctest: +SKIP
    >>> mean_and_spread([0.70, 0.71, 0.72])
    (0.71, 0.01)
"""

from __future__ import annotations

import json
import logging
import statistics
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from torchrec_mtl.config import JobConfig, config_from_dict, config_to_dict
from torchrec_mtl.data import synthetic
from torchrec_mtl.data.prepare import MissingInputError, resolve_files
from torchrec_mtl.data.preprocess import input_fingerprint
from torchrec_mtl.run.train import run_job
from torchrec_mtl.schema import DatasetSchema

# The read-only datasets beside the checkout (../shared/data from the repository root).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# One pass over every training row, no validation rows, no early stopping: what the shipped configs did before they
# held out a tenth and stopped early (configs/parts/training.yaml). The comparison tools measured their tables so and
# keep doing it, so that each table's command gives its figures again.
ONE_PASS = ["data.validation_fraction=0", "training.early_stopping=null", "training.epochs=1"]
# (section, key) pairs that change how a run is shown or where it writes, not what it learns
_NOT_LEARNED = {("training", "progress"), ("training", "curve_every"), ("objective", "gradient_cosine_every")}


def learned_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict without ``out_dir`` and the keys that do not change the trained model; keys added to the
    config since ``config`` was written take their defaults."""
    config = config_to_dict(config_from_dict(config))
    kept = {key: value for key, value in config.items() if key not in ("out_dir", "checkpoint")}
    for section, key in _NOT_LEARNED:
        kept[section] = {k: v for k, v in kept[section].items() if k != key}
    return kept


def data_identity(config: JobConfig) -> Dict[str, Any]:
    """What the run's data are: the fingerprint preprocessing gives the input files, and the generator version."""
    try:
        files = resolve_files(config.data)
    except MissingInputError:
        return {}
    schema = DatasetSchema.from_yaml(config.data.schema)
    options = {"test_fraction": config.data.test_fraction, "split_seed": config.data.split_seed}
    identity: Dict[str, Any] = {"fingerprint": input_fingerprint(schema, files, **options)}
    if config.data.generate is not None:
        identity["generator_version"] = synthetic.GENERATOR_VERSION
    return identity


def run_or_reuse(config: JobConfig, label: str = "") -> Dict:
    """The results of ``config``'s run: from ``out_dir/results.json`` when it is the same run, else run it now."""
    cached = Path(config.out_dir) / "results.json"
    if cached.exists():
        results = json.loads(cached.read_text())
        same_config = learned_config(results["config"]) == learned_config(config_to_dict(config))
        if same_config and results.get("data") == data_identity(config):
            return results
    print(f"== {label or config.out_dir}", flush=True)
    results = run_job(config)
    results["data"] = data_identity(config)  # after the run: a generated log exists now
    cached.write_text(json.dumps(results, indent=2))
    return results


def mean_and_spread(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), rounded to 6 places."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(statistics.fmean(values), 6), round(spread, 6)


def summary_row(labels: Dict[str, Any], values: Sequence[float], seeds: Sequence[int]) -> Dict[str, Any]:
    """One row of a comparison table: its ``labels`` (dataset, model, task, metric ...), then ``mean``, ``std``,
    ``seeds`` and the per-seed ``values``."""
    mean, std = mean_and_spread(values)
    return {**labels, "mean": mean, "std": std, "seeds": list(seeds), "values": list(values)}


def save_rows(rows: List[Dict] | Dict, out: str | Path, table: str) -> None:
    """Write a comparison's summary ``rows`` (or a benchmark's one result) as JSON to ``out`` (its folder made), then
    print ``table`` and where the rows went."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    print(table)
    print(f"-> {out}")


def quiet() -> None:
    """Silence torchrec's and torch.distributed's info logs and library warnings: the tools print their own table."""
    for name in ("torchrec", "root", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _written_columns(data_dir: str | Path) -> List[str] | None:
    """The columns a converter recorded in ``data_dir``'s log: MovieLens's meta.json, else MIND's header row."""
    meta = Path(data_dir) / "meta.json"
    if not (Path(data_dir) / "train.tsv").exists() or not meta.exists():
        return None
    recorded = json.loads(meta.read_text()).get("columns", {})
    if isinstance(recorded, dict) and "order" in recorded:
        return list(recorded["order"])
    with open(Path(data_dir) / "train.tsv", encoding="utf-8") as lines:
        return lines.readline().rstrip("\n").split("\t")


def ensure_movielens(data_dir: str, source: str | Path = SHARED_DATA / "movielens-latest-small") -> None:
    """Convert MovieLens latest-small (``source``) into the multi-task log in ``data_dir`` unless it is there with
    the columns and the history rule the converter writes now (a log written before the history columns, or with
    histories of training ratings only, is converted again)."""
    from torchrec_mtl.data.movielens import COLUMNS, HISTORY_EVENTS, convert_movielens

    meta = Path(data_dir) / "meta.json"
    events = json.loads(meta.read_text()).get("history", {}).get("events") if meta.exists() else None
    if _written_columns(data_dir) != COLUMNS or events != HISTORY_EVENTS:
        convert_movielens(str(source), data_dir)


def ensure_mind(data_dir: str, source: str | Path = SHARED_DATA / "mind-small-subset") -> None:
    """Convert the MIND subset (``source``) into the click log in ``data_dir`` unless it is there with the columns
    the converter writes now."""
    from torchrec_mtl.data.mind import COLUMNS, convert_mind

    if _written_columns(data_dir) != COLUMNS:
        convert_mind(str(source), data_dir)


def ensure_converted(dataset: str, data_dir: str) -> None:
    """The converted log of ``dataset`` (movielens, mind) in ``data_dir``; other datasets need none (a generated
    log is the job's own step)."""
    if dataset == "movielens":
        ensure_movielens(data_dir)
    elif dataset == "mind":
        ensure_mind(data_dir)


def rows_by(rows: List[Dict], *keys: str) -> Dict[Tuple, List[Dict]]:
    """Rows grouped by the values of ``keys``, in first-seen order."""
    grouped: Dict[Tuple, List[Dict]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(row)
    return grouped
