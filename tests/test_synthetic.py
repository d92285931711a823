"""The generator's planted truth: stated ceilings, funnel rules, cold items, determinism."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.data.synthetic_text import CATEGORY_WORDS
from torchrec_mtl.schema import DatasetSchema

SCHEMA = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")


def read_log(path, schema: DatasetSchema) -> pl.DataFrame:
    """The raw log as a typed frame (the generator's output, before any preprocessing)."""
    return pl.read_csv(
        path,
        separator="\t",
        has_header=False,
        new_columns=schema.columns,
        schema_overrides={**{c: pl.Utf8 for c in schema.categorical}, **{c: pl.Float32 for c in schema.labels}},
        quote_char=None,
    )


def _auc(scores, labels) -> float:
    # torchmetrics, not the torchrec implementation the generator uses: an independent reproduction.
    return float(binary_auroc(torch.as_tensor(scores), torch.as_tensor(labels).long()))


def test_stated_ceilings_are_reproduced_from_written_probabilities(small_log):
    meta = json.loads((small_log / "meta.json").read_text())
    test = read_log(small_log / "test.tsv", SCHEMA)
    truth = pl.read_csv(small_log / "test_truth.tsv", separator="\t")
    assert truth.height == test.height == meta["rows"]["test"]
    click = test["click"].to_numpy() == 1
    conversion = test["conversion"].to_numpy() == 1
    p_click, p_conv = truth["p_click"].to_numpy(), truth["p_conversion_given_click"].to_numpy()
    ceilings = meta["ceilings"]
    assert _auc(p_click, click) == pytest.approx(ceilings["ctr_auc"], abs=1e-4)
    assert _auc(p_conv[click], conversion[click]) == pytest.approx(ceilings["cvr_auc"], abs=1e-4)
    assert _auc(p_click * p_conv, conversion) == pytest.approx(ceilings["ctcvr_auc"], abs=1e-4)
    rating = test["rating"].to_numpy()
    rmse = np.sqrt(np.mean((truth["expected_rating"].to_numpy()[click] - rating[click]) ** 2))
    assert rmse == pytest.approx(ceilings["rating_rmse"], abs=1e-6)


def test_default_difficulty_is_realistic(tmp_path):
    # The default latent structure at a tenth of the default size: ceilings and rates barely depend on row count.
    meta = generate(SyntheticConfig(num_rows=200_000), tmp_path)
    assert 0.70 <= meta["ceilings"]["ctr_auc"] <= 0.85
    assert 0.02 <= meta["rates"]["click"] <= 0.10
    assert 0.05 <= meta["rates"]["conversion_given_click"] <= 0.25
    assert 0.5 < meta["ceilings"]["cvr_auc"] < 0.9 and 0.5 < meta["ceilings"]["ctcvr_auc"] < 0.95


def test_funnel_rules_and_missing_ratings(small_log):
    frame = pl.concat([read_log(small_log / name, SCHEMA) for name in ("train.tsv", "test.tsv")])
    click, conversion, rating = (frame[c].to_numpy() for c in ("click", "conversion", "rating"))
    assert set(np.unique(click)) == {0, 1}
    assert np.all(conversion[click == 0] == 0), "a conversion without a click"
    assert np.all(np.isnan(rating[click == 0])), "a rating on an unclicked row"
    observed = rating[click == 1]
    assert not np.isnan(observed).any()
    assert observed.min() >= 0.5 and observed.max() <= 5.0 and np.all(observed * 2 == np.round(observed * 2))


def test_cold_items_appear_only_in_test_and_have_text(small_log):
    train = read_log(small_log / "train.tsv", SCHEMA)
    test = read_log(small_log / "test.tsv", SCHEMA)
    items = pl.read_csv(small_log / "items.tsv", separator="\t")
    train_items, test_items = set(train["C2"]), set(test["C2"])
    cold = test_items - train_items
    assert cold, "no cold items in the test split"
    cold_share = test["C2"].is_in(list(cold)).mean()
    meta = json.loads((small_log / "meta.json").read_text())
    assert cold_share == pytest.approx(meta["rates"]["cold_item_share_of_test_rows"], abs=1e-9)
    assert (train_items | test_items) <= set(items["item_id"])
    assert items["description"].str.len_chars().min() > 10


def test_item_descriptions_carry_the_item_category(small_log):
    # Every description names its item's category with one of that category's two words, and no other category's.
    category_words = {w for pair in CATEGORY_WORDS for w in pair}
    pairs = pl.read_csv(small_log / "items.tsv", separator="\t").join(
        read_log(small_log / "train.tsv", SCHEMA).select("C2", "C3").unique(), left_on="item_id", right_on="C2"
    )
    for category, descriptions in pairs.group_by("C3").agg(pl.col("description")).iter_rows():
        used = [set(d.split()) & category_words for d in descriptions]
        assert all(len(words) == 1 for words in used), (category, descriptions[:3])
        assert any(set.union(*used) <= set(pair) for pair in CATEGORY_WORDS), (category, set.union(*used))


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    config = SyntheticConfig(num_rows=3_000, num_users=50, num_items=40, num_brands=10, seed=7)
    generate(config, tmp_path / "a")
    generate(config, tmp_path / "b")
    generate(SyntheticConfig(num_rows=3_000, num_users=50, num_items=40, num_brands=10, seed=8), tmp_path / "c")
    for name in ("train.tsv", "test.tsv", "items.tsv", "test_truth.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.tsv").read_bytes() != (tmp_path / "c" / "train.tsv").read_bytes()


def test_text_ceiling_replays_the_generator_and_orders_its_ceilings(small_log, tmp_path):
    """tools/text_ceiling.py: the replayed draws give the log's own truth (it checks), and knowing the appeal word
    sits between knowing nothing of a cold item's own appeal and knowing it exactly."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ceiling.json"
    subprocess.run([sys.executable, "tools/text_ceiling.py", "--data", str(small_log), "--out", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    ceiling = json.loads(out.read_text())
    assert ceiling["cold_rows"] > 0
    assert ceiling["ceiling_without_own_appeal"] < ceiling["ceiling_with_appeal_sextile"] <= ceiling["ceiling_true"]
    assert ceiling["max_text_gain"] == pytest.approx(
        ceiling["ceiling_with_appeal_sextile"] - ceiling["ceiling_without_own_appeal"], abs=2e-4
    )
    other = tmp_path / "other"  # the same config with another log's truth: refused, not silently wrong
    other.mkdir()
    (other / "meta.json").write_text((small_log / "meta.json").read_text())
    (other / "test_truth.tsv").write_text("p_click\tp_conversion_given_click\texpected_rating\n" + "0.5\t0.5\t3\n" * 10)
    failed = subprocess.run([sys.executable, "tools/text_ceiling.py", "--data", str(other), "--out", str(out)],
                            capture_output=True, text=True)  # fmt: skip
    assert failed.returncode == 2 and "does not give test_truth.tsv's p_click" in failed.stderr


def test_the_affinity_profile_plants_most_of_the_click_signal_in_the_user_item_affinity(tmp_path):
    config = SyntheticConfig(profile="affinity", num_rows=60_000, num_users=3_000, num_items=800, seed=3)
    meta = generate(config, tmp_path / "a")
    c = meta["ceilings"]
    # the affinity carries more of the click than the item's own quality, and a user's segment tells part of it
    assert c["ctr_auc"] - c["ctr_auc_without_affinity"] > 0.08
    assert c["ctr_auc"] - c["ctr_auc_without_item_quality"] < c["ctr_auc"] - c["ctr_auc_without_affinity"]
    assert c["ctr_auc_without_affinity"] < c["ctr_auc_segment_affinity_only"] < c["ctr_auc"]
    assert c["cvr_auc_without_price_term"] < c["cvr_auc"] and c["cvr_auc_without_affinity"] < c["cvr_auc"]
    assert abs(meta["rates"]["click"] - config.click_rate) < 0.01
    # few impressions per user, heavy-tailed: the median user has far fewer rows than the mean
    users = pl.read_csv(tmp_path / "a" / "train.tsv", separator="\t", has_header=False).get_column("column_17")
    counts = users.value_counts().get_column("count").to_numpy()
    assert np.median(counts) < 0.6 * counts.mean()
    again = generate(config, tmp_path / "b")
    assert (tmp_path / "a" / "train.tsv").read_bytes() == (tmp_path / "b" / "train.tsv").read_bytes()
    assert again["ceilings"] == meta["ceilings"]
    with pytest.raises(ValueError, match="profile: expected one of default, affinity"):
        SyntheticConfig(profile="other")
