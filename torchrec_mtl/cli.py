"""The ``torchrec-mtl`` commands and their one error path: every failure of the user's input, files or environment is
one line on stderr and exit 2; one no check foresaw is one line and exit 70. The parser, its checks and the examples
are torchrec_mtl.cli_args (``torchrec-mtl --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from torchrec_mtl.config import ConfigError
from torchrec_mtl.data.prepare import MissingInputError
from torchrec_mtl.cli_args import build_parser
from torchrec_mtl.data.preprocess import LogFormatError, TooManyBadRows
from torchrec_mtl.data.shards import ShardError
from torchrec_mtl.outputs import OutputError
from torchrec_mtl.schema import SchemaError
from torchrec_mtl.text.cache import TextCacheError
from torchrec_mtl.errors import (
    CheckpointError,
    DeviceError,
    EnsembleError,
    NonFiniteLoss,
    TrainingStopped,
)
from torchrec_mtl.report import ReportError

if TYPE_CHECKING:
    import torch

    from torchrec_mtl.config import JobConfig


class InputError(ValueError):
    """A command-line argument naming a file that is not there."""


# Library loggers that report, at WARNING, choices made here on purpose (a CPU topology, small tables going
# data-parallel, a deprecation inside torchrec's own calls): shown from -v on, so they do not bury the results.
LIBRARY_LOGGERS = ("torchrec", "root", "torch.distributed", "torch.fx", "fbgemm_gpu")
# Warnings raised inside the libraries about their own internals, which a user cannot act on: shown from -v on.
LIBRARY_WARNINGS = r"(torch|torchrec|torchmetrics|fbgemm_gpu|tensordict|transformers)(\.|$)"


def configure_output(verbose: int = 0, quiet: bool = False) -> None:
    """Python warnings and library logs for a verbosity: ``quiet`` shows neither; the default shows each warning
    once, except the libraries' warnings about their own internals, and library log messages at ERROR; ``verbose``
    1 shows every warning once and library messages at WARNING; 2 shows debug messages too."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    level = logging.ERROR if verbose == 0 else logging.WARNING if verbose == 1 else logging.DEBUG
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL if quiet else level)
    warnings.resetwarnings()
    if quiet:
        warnings.simplefilter("ignore")
        return
    warnings.simplefilter("once" if verbose < 2 else "always")
    if verbose == 0:
        warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)


def _input_file(option: str, path: str) -> None:
    """A file argument that must be an existing file (not a folder)."""
    if not os.path.exists(path):
        raise InputError(f"{option}: {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{option}: {path} is a folder; expected a file")


def _device(name: str) -> torch.device:
    """``--device``: a torch.device this machine has, or InputError saying why not (in one line)."""
    from torchrec_mtl.device import DeviceError, usable_device

    try:
        return usable_device(name)
    except DeviceError as error:
        raise InputError(f"--device {name}: {error}") from None


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


def _convert(args: argparse.Namespace) -> int:
    from torchrec_mtl.data.sources import SOURCES, convert

    if not os.path.isdir(args.source):
        raise InputError(f"--source: {args.source}: no such folder; expected {SOURCES[args.dataset].expects}")
    try:
        summary = convert(args.dataset, args.source, args.out, seed=args.seed, test_fraction=args.test_fraction)
    except FileNotFoundError as error:
        raise InputError(f"--source: {error}; expected {SOURCES[args.dataset].expects}") from None
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=2))
    print(f"-> {args.out}; train it with a config whose data.schema is {SOURCES[args.dataset].schema}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from torchrec_mtl.config import load_config
    from torchrec_mtl.run import run_job

    config = load_config(args.config, [*_verbosity_overrides(args), *args.overrides])
    run_job(config)
    if dist.get_rank() == 0:
        _write_report(config.out_dir)
    return 0


def _verbosity_overrides(args: argparse.Namespace) -> List[str]:
    """-q turns training's progress bars off, -v prints the whole sharding plan; the config's own keys say otherwise
    when given as KEY=VALUE."""
    return ["training.progress=false"] if args.quiet else ["training.print_plan=true"] if args.verbose else []


def _tune(args: argparse.Namespace) -> int:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise InputError("tune needs Optuna: pip install 'torchrec-mtl[tune]'") from None
    from torchrec_mtl.tune import tune

    for option, path in (("--config", args.config), ("--space", args.space)):
        _input_file(option, path)
    summary = tune(args.config, args.space, args.trials, args.out, [*_verbosity_overrides(args), *args.overrides],
                   progress=not args.quiet)  # fmt: skip
    best = summary["best"]
    if best is None:
        print(f"no trial finished with a score; the trials: {os.path.join(args.out, 'trials.tsv')}")
    else:
        print(f"best: trial {best['trial']}, validation {summary['metric']} {abs(best['score']):.4f}; its config: "
              f"{os.path.join(args.out, 'best.yaml')}")  # fmt: skip
    return 0


def _write_report(run_dir: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no report: matplotlib is not installed (pip install 'torchrec-mtl[report]')")
        return
    from torchrec_mtl.report import write_report

    print(f"report: {write_report(run_dir)}")


def _member_configs(checkpoints: List[str], overrides: Optional[List[str]]) -> List[Tuple[Path, JobConfig]]:
    """An ensemble's members: each checkpoint (a run's checkpoints folder: its newest) with the job config it was
    trained with, as it recorded it: with ``overrides`` as evaluate reads it, or (None) as load_trained does. Only
    the train state is read, so members are compared (torchrec_mtl.ensemble.check_members) before any weight."""
    from torchrec_mtl.config import config_from_dict, load_config
    from torchrec_mtl.train.checkpoint import TRAIN_STATE, read_train_state, resolve_checkpoint

    members = []
    for checkpoint in checkpoints:
        if not os.path.exists(checkpoint):
            raise InputError(f"--checkpoint: {checkpoint}: no such folder")
        path = resolve_checkpoint(checkpoint)
        recorded = read_train_state(path).get("config")  # JSON; the whole folder is verified when it is loaded
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{path / TRAIN_STATE}: records no job config (the 'config' key); train again")
        config = config_from_dict(recorded) if overrides is None else load_config(overrides=overrides, raw=recorded)
        members.append((path, config))
    return members


def _evaluate(args: argparse.Namespace) -> int:
    checkpoints = args.checkpoint or []
    if len(checkpoints) > 1 and args.config is not None:
        raise InputError("evaluate: --config takes one --checkpoint; an ensemble's members are evaluated with the "
                         "configs they recorded (KEY=VALUE overrides apply to each)")  # fmt: skip
    from torchrec_mtl.config import load_config
    from torchrec_mtl.run import evaluate_checkpoint, evaluate_ensemble

    device = _device(args.device)
    if len(checkpoints) > 1:  # an ensemble: every member with the config it recorded
        members = _member_configs(checkpoints, [*_verbosity_overrides(args), *args.overrides])
        evaluate_ensemble([config for _, config in members], [str(path) for path, _ in members], device)
        return 0
    checkpoint = checkpoints[0] if checkpoints else None
    if args.config is not None:
        config = load_config(args.config, [*_verbosity_overrides(args), *args.overrides])
    else:  # the config the checkpoint was trained with, as it recorded it
        if checkpoint is None:
            raise InputError("evaluate: give --checkpoint (its recorded config is used) or --config (its run's newest)")
        from torchrec_mtl.train.checkpoint import read_train_state, resolve_checkpoint

        path = resolve_checkpoint(checkpoint)
        recorded = read_train_state(path).get("config")  # JSON; the whole folder is verified when it is loaded
        if not isinstance(recorded, dict):
            raise InputError(f"--checkpoint: {path} records no job config; give --config")
        config = load_config(overrides=[*_verbosity_overrides(args), *args.overrides], raw=recorded)
    evaluate_checkpoint(config, checkpoint, device)
    return 0


def _trained(checkpoint: str, device: torch.device):
    from torchrec_mtl.inference import load_trained

    if not os.path.exists(checkpoint):
        raise InputError(f"--checkpoint: {checkpoint}: no such folder")
    return load_trained(checkpoint, device)


def _predict(args: argparse.Namespace) -> int:
    from torchrec_mtl.predict import predict_file

    device = _device(args.device)
    if args.input != "-":
        _input_file("--input", args.input)
    if len(args.checkpoint) > 1:  # an ensemble: its members agree before any is loaded
        from torchrec_mtl.ensemble import check_members

        check_members(_member_configs(args.checkpoint, None), evaluation=False)
    trained = [_trained(checkpoint, device) for checkpoint in args.checkpoint]
    summary = predict_file(trained if len(trained) > 1 else trained[0], args.input, args.out, progress=not args.quiet,
                           max_line_bytes=args.max_line_bytes)  # fmt: skip
    print(json.dumps(summary), file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from torchrec_mtl.inference import export
    from torchrec_mtl.pruning import Pruning

    pruning = Pruning(rows=args.prune_rows, by=args.prune_by, dense=args.prune_dense, scope=args.prune_scope)
    path = export(_trained(args.checkpoint, _device(args.device)), args.out, quantize=args.quantize, pruning=pruning)
    print(f"exported {path} (manifest: {path.parent / 'manifest.json'})")
    return 0


def _vectors(args: argparse.Namespace) -> int:
    from torchrec_mtl.representations import export_representations

    device = _device(args.device)
    if not os.path.exists(args.checkpoint):
        raise InputError(f"--checkpoint: {args.checkpoint}: no such folder")
    manifest = export_representations(args.checkpoint, args.out, progress=not args.quiet, device=device)
    print(
        f"wrote {manifest['users']['count']:,} user and {manifest['items']['count']:,} item vectors "
        f"({manifest['items']['count'] - manifest['items']['seen_in_training']:,} items unseen in training) of "
        f"dim {manifest['dim']} to {args.out}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from torchrec_mtl.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _configs(args: argparse.Namespace) -> int:
    from torchrec_mtl.shipped import copy_configs, listing

    if args.copy is None:
        print(listing())
        return 0
    summary = copy_configs(args.copy)
    kept = f" ({len(summary['unchanged'])} already there, unchanged)" if summary["unchanged"] else ""
    print(f"wrote {len(summary['written'])} files into {summary['folder']}{kept}; run a job there with\n"
          f"  cd {shlex.quote(args.copy)} && torchrec-mtl train --config configs/mmoe_synthetic.yaml")  # fmt: skip
    return 0


# Failures of the user's input, files or environment: one line on stderr, exit 2.
USER_ERRORS = (
    SchemaError, LogFormatError, TooManyBadRows, ShardError, InputError, MissingInputError, OutputError,
    TextCacheError, CheckpointError, ReportError, NonFiniteLoss, DeviceError, EnsembleError,
)  # fmt: skip
EXIT_USER_ERROR = 2
# What to install when a part of the stack is missing (docs/install.md says why torchrec goes in with --no-deps).
MISSING_STACK_HINTS = {
    "torch": "install torch 2.13 first (pip install torch==2.13.0; docs/install.md)",
    "torchrec": "on CPU install it without its dependencies, beside FBGEMM's CPU build: pip install "
    "fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.9.2 (docs/install.md)",
    "fbgemm_gpu": "install FBGEMM for your device: pip install fbgemm-gpu-cpu==1.8.0 on CPU, fbgemm-gpu==1.8.0 on "
    "CUDA (docs/install.md)",
}
EXIT_BUG = 70  # EX_SOFTWARE: an error no check foresaw


COMMANDS = {
    "generate": _generate, "preprocess": _preprocess, "encode-items": _encode_items, "convert": _convert,
    "train": _train, "tune": _tune,
    "evaluate": _evaluate, "predict": _predict, "export": _export, "vectors": _vectors, "report": _report,
    "configs": _configs,
}  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"torchrec-mtl: config error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except USER_ERRORS as error:
        print(f"torchrec-mtl: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as error:
        print(f"torchrec-mtl: {error}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # the reader went away (torchrec-mtl configs | head): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 128 + signal.SIGPIPE
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in MISSING_STACK_HINTS:
            raise
        print(f"torchrec-mtl: {error}; {MISSING_STACK_HINTS[error.name.split('.')[0]]}", file=sys.stderr)
        return EXIT_USER_ERROR
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
