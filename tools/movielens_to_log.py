#!/usr/bin/env python3
"""Turn MovieLens ml-latest-small into the multi-task log of configs/datasets/movielens.yaml (see
torchrec_mtl.data.movielens for the construction): train.tsv, test.tsv, items.tsv and meta.json.

example: .venv/bin/python tools/movielens_to_log.py --out runs/data/movielens --negatives 4 --seed 0 --split per_user
"""

from __future__ import annotations

import argparse
import sys

from torchrec_mtl.data.movielens import SPLITS, convert_movielens, summary_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        default="../shared/data/movielens-latest-small",
        help="folder with ratings.csv, movies.csv, tags.csv",
    )
    parser.add_argument("--out", default="runs/data/movielens", help="output folder")
    parser.add_argument("--negatives", type=int, default=4, help="sampled unrated movies per rating")
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of the ratings in test: each user's latest (per_user) or the latest overall (global)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="per_user",
        help="per_user: each user's last ratings in test (every test user is in train); global: one time cut",
    )
    args = parser.parse_args(argv)
    summary = convert_movielens(args.source, args.out, args.negatives, args.test_fraction, args.seed, split=args.split)
    print(summary_text(summary))
    print(f"-> {args.out} (train.tsv, test.tsv, items.tsv, meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
