#!/usr/bin/env python3
"""Turn a MIND folder (behaviors.tsv, news.tsv) into a click log with news text (torchrec_mtl.data.mind).

Example::

    .venv/bin/python tools/mind_to_log.py --source ../shared/data/mind-small-subset --out runs/data/mind
    .venv/bin/torchrec-mtl train --config configs/mmoe_mind.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from torchrec_mtl.data.mind import convert_mind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/mind-small-subset")
    parser.add_argument("--out", default="runs/data/mind")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    print(json.dumps(convert_mind(args.source, args.out, args.test_fraction), indent=2))
    print(f"-> {args.out} (train.tsv, test.tsv, items.tsv, meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
