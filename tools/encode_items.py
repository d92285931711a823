#!/usr/bin/env python3
"""Encode an items file's descriptions into the item-text cache: the same code as `torchrec-mtl encode-items`.

example: .venv/bin/python tools/encode_items.py --items runs/data/synthetic/items.tsv \
    --cache runs/data/synthetic/item_text.npz
"""

import sys

from torchrec_mtl.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode-items", *sys.argv[1:]]))
