#!/usr/bin/env python3
"""How much item text can lift cold-item CTR AUC on a synthetic log, at best: Bayes-optimal ceilings on the test
rows of cold items (items that never appear in training) with and without what the description tells.

A cold item's click appeal is its brand's share (the brand is a feature) plus its own part; an ID cannot carry the
own part for an item it never saw, and the description carries it only as one of six appeal words (its sextile).
So, scoring each cold row by its true click logit with the item's own appeal:

- ``ceiling_true``: known exactly (the data's ceiling, as ``meta.json`` has it for all rows);
- ``ceiling_with_appeal_sextile``: replaced by its mean over the items of the same appeal word (all the text says);
- ``ceiling_without_own_appeal``: left out (all a model without text can know about a cold item);

and ``max_text_gain`` = with sextile - without: the largest cold CTR AUC gain a text-fused model can have over the
same model on IDs, were both perfect. The latent draws are the generator's own (``synthetic.draw_latents`` with the
log's config and seed); the replay is checked against the log's ``test_truth.tsv`` before anything is computed.

Example::

    .venv/bin/python tools/text_ceiling.py --data runs/data/synthetic --out runs/text_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import polars as pl

from torchrec_mtl.data import synthetic


def replay_generator(data_dir: Path) -> Dict[str, Any]:
    """The generator's variables up to the click draw, for the log in ``data_dir`` (its meta.json's config), and
    under ``rng`` its random generator, left where the generator draws the click labels next."""
    config = synthetic.SyntheticConfig(**json.loads((data_dir / "meta.json").read_text())["config"])
    rng = np.random.default_rng(config.seed)
    world: Dict[str, Any] = dict(synthetic.draw_latents(config, rng), rng=rng)
    truth = pl.read_csv(data_dir / "test_truth.tsv", separator="\t")["p_click"].to_numpy()
    replayed = world["p_click"][world["is_test"]]
    if replayed.shape != truth.shape or not np.allclose(replayed, truth, rtol=0, atol=1e-12):
        raise ValueError(f"{data_dir}: the replayed generator does not give test_truth.tsv's p_click")
    return world


def text_ceilings(data_dir: Path) -> Dict[str, float]:
    world = replay_generator(data_dir)
    item, brand = world["item"], world["item_brand"]
    cold_rows = world["is_test"] & world["cold"][item]
    clicked = world["rng"].random(len(item)) < world["p_click"]  # the generator's next draw: the click labels
    own = world["click_appeal"] - world["brand_click_appeal"][brand]
    edges = np.quantile(world["click_appeal"], np.linspace(0.0, 1.0, 7)[1:-1])  # the description's six words
    sextile = np.searchsorted(edges, world["click_appeal"])
    own_given_word = np.array([own[sextile == s].mean() for s in range(6)])[sextile]
    without_own = world["click_logit"] - own[item]
    auc = lambda logit: synthetic.binary_auc(logit[cold_rows], clicked[cold_rows])  # noqa: E731
    result = {
        "cold_rows": int(cold_rows.sum()),
        "ceiling_true": auc(world["click_logit"]),
        "ceiling_with_appeal_sextile": auc(without_own + own_given_word[item]),
        "ceiling_without_own_appeal": auc(without_own),
    }
    result["max_text_gain"] = result["ceiling_with_appeal_sextile"] - result["ceiling_without_own_appeal"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/data/synthetic", help="a folder written by torchrec-mtl generate")
    parser.add_argument("--out", required=True, help="JSON file for the ceilings")
    args = parser.parse_args(argv)
    try:
        result = text_ceilings(Path(args.data))
    except (OSError, ValueError) as error:
        print(f"text_ceiling: {error}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:<30}{value}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
