"""The ``torchrec-mtl`` command line.

Examples::

    torchrec-mtl generate --out runs/data/synthetic --rows 3000000 --seed 0
    torchrec-mtl train --config configs/mmoe_synthetic.yaml training.epochs=2
    torchrun --nproc_per_node 2 -m torchrec_mtl.cli train --config configs/mmoe_synthetic.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import List, Optional

from torchrec_mtl.config import ConfigError, load_config


def _quiet_library_logs() -> None:
    # torchrec's planner and sharders log at WARNING about choices we make on purpose (CPU topology, small tables
    # going data-parallel); they would bury the results table.
    for name in ("torchrec", "root", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _generate(args: argparse.Namespace) -> int:
    from torchrec_mtl.data.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(num_rows=args.rows, seed=args.seed)
    meta = generate(config, args.out)
    print(json.dumps({k: meta[k] for k in ("rows", "rates", "ceilings")}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from torchrec_mtl.job import run_job

    run_job(load_config(args.config, args.overrides))
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
    generate.add_argument("--rows", type=int, default=3_000_000, help="rows in train + test (default 3,000,000)")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_generate)

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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_logs()
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"torchrec-mtl: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
