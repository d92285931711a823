#!/usr/bin/env python3
"""Write the synthetic multi-task log with its planted truth (same as `torchrec-mtl generate`).

example: .venv/bin/python tools/generate_synthetic.py --out runs/data/synthetic --rows 3000000 --seed 0
"""

import sys

from torchrec_mtl.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
