"""Adversarial training (FGM on the looked-up embeddings) and training-batch augmentation (feature dropout, text
mixing), and the label noise they are measured under: off by default and then the plain run bit for bit, seeded,
the same draws at world sizes 1 and 2, and trained through DMP + TrainPipelineSparseDist (e2e, at world size 2)."""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import pytest
import torch

from conftest import ONE_PASS
from torchrec_mtl.build import build_cached_item_text, build_model
from torchrec_mtl.config import ConfigError, ModelConfig, TextConfig, config_from_dict, load_config
from torchrec_mtl.data.augment import Augmentation
from torchrec_mtl.data.batch import TEXT_MIX_PARTNER, TEXT_MIX_WEIGHT
from torchrec_mtl.data.loader import BatchLoader
from torchrec_mtl.data.shards import EncodedLog
from torchrec_mtl.data.splits import flipped_labels
from torchrec_mtl.model import MultiTaskTrain
from torchrec_mtl.modules.adversarial import fgm_perturbations
from torchrec_mtl.modules.item_text import mix_rows
from torchrec_mtl.tasks import MultiTaskObjective, esmm_tasks

TABLES = {f"C{i}": 50 for i in range(1, 9)}
FEATURES = [*TABLES, "item_text"]
NUM_TEXT_ITEMS = 30


def _log(n: int, seed: int = 0) -> EncodedLog:
    """Random rows of the synthetic layout plus an item-text column (row 0, no text, for about a fifth)."""
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.3).astype(np.float32)
    text_rows = rng.integers(1, NUM_TEXT_ITEMS + 1, n) * (rng.random(n) > 0.2)
    return EncodedLog(
        dense=rng.random((n, 13)).astype(np.float32),
        sparse=np.column_stack([rng.integers(1, 50, (n, 8)), text_rows]).astype(np.int64),
        labels={
            "click": click,
            "conversion": (click * (rng.random(n) < 0.4)).astype(np.float32),
            "rating": np.where(click == 1, rng.integers(1, 6, n), np.nan).astype(np.float32),
        },
    )


def _train_model(epsilon: Optional[float], text_mix: bool = False, weighting: str = "static") -> MultiTaskTrain:
    """A small unsharded model with item text, the same weights for every call; ``epsilon`` None: built without
    the adversarial argument."""
    torch.manual_seed(0)
    text = build_cached_item_text(TextConfig(), 16, NUM_TEXT_ITEMS, 8, torch.device("cpu"))
    model = build_model(ModelConfig(), 13, TABLES, torch.device("cpu"), item_text=text)
    objective = MultiTaskObjective(esmm_tasks(), {"rating": 3.0}, weighting, gradient_cosine_every=2)
    if epsilon is None:
        return MultiTaskTrain(model, objective)
    return MultiTaskTrain(model, objective, adversarial_epsilon=epsilon, text_mix=text_mix)


def _steps(train: MultiTaskTrain, loader: BatchLoader) -> list:
    optimizer = torch.optim.Adam(train.parameters(), lr=0.01)
    losses = []
    for batch in loader:
        optimizer.zero_grad()
        loss, (logged, _, _) = train(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(logged))
    return losses


def test_fgm_moves_each_row_epsilon_along_its_gradient_and_leaves_zero_rows():
    ids = torch.randn(5, 3, 4, requires_grad=True)
    text = torch.randn(5, 4, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0])  # row 2 is padding: no gradient
    loss = (weights[:, None, None] * ids**2).sum() + (weights[:, None] * text).sum()
    r_ids, r_text = fgm_perturbations(loss, [ids, text], epsilon=0.3)
    joint = torch.cat([r_ids.flatten(1), r_text], dim=1)
    torch.testing.assert_close(joint.norm(dim=1), torch.tensor([0.3, 0.3, 0.0, 0.3, 0.3]))
    gradient = torch.cat([(2 * weights[:, None, None] * ids).flatten(1), weights[:, None].expand(5, 4)], dim=1)
    cosine = torch.nn.functional.cosine_similarity(joint[[0, 1, 3, 4]], gradient[[0, 1, 3, 4]].detach(), dim=1)
    torch.testing.assert_close(cosine, torch.ones(4))
    assert not r_ids.requires_grad and ids.grad is None, "detached, and no gradient left on the inputs"


def test_fgm_with_epsilon_0_trains_bit_identically_and_a_positive_epsilon_adds_a_larger_loss():
    loader = BatchLoader(_log(384), FEATURES, 128, shuffle=True, seed=1)
    plain, zero = _train_model(None), _train_model(0.0)
    assert _steps(plain, loader) == _steps(zero, loader)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    # on the same weights: FGM's loss is clean + adversarial, the adversarial part the larger (a step up the loss)
    first = next(iter(loader))
    clean = _train_model(None)(first)[0]
    fgm = _train_model(0.5)
    total, (logged, predictions, _) = fgm(first)
    assert torch.equal(total.detach(), logged)
    assert float(total) > 2 * float(clean) > 0, (float(total), float(clean))
    assert set(predictions) == {"ctr", "cvr", "rating", "ctcvr"}
    fgm.eval()  # evaluation: the clean forward alone
    with torch.no_grad():
        assert torch.equal(fgm(first)[0], clean.detach())


def test_the_adversarial_pass_has_no_side_effects_on_the_objective():
    model = _train_model(0.5, weighting="gradnorm")
    batch = next(iter(BatchLoader(_log(256), FEATURES, 128, shuffle=True, seed=1)))
    objective, weighting = model.objective, model.objective.weighting
    model.train()
    model(batch)  # one step: GradNorm moves its multipliers once, the cosine is sampled once
    assert int(weighting.steps) == 1 and objective.gradient_cosine.calls == 1
    terms = dict(objective.last_terms)
    outputs = model.model(batch.dense_features, batch.sparse_features)
    loss = objective.loss(outputs, batch)
    assert int(weighting.steps) == 1 and objective.gradient_cosine.calls == 1 and weighting.training
    assert objective.last_terms.keys() == terms.keys()
    assert all(torch.equal(objective.last_terms[k], v) for k, v in terms.items())
    assert torch.isfinite(loss) and loss.requires_grad


def _augmented(rank: int, world_size: int, batch_size: int, seed: int = 7, **augmentation) -> list:
    augment = Augmentation.from_config(FEATURES, seed=seed, categorical=list(TABLES), text_feature="item_text",
                                       **{"feature_dropout": 0.0, "text_mix": 0.0, **augmentation})  # fmt: skip
    loader = BatchLoader(_log(4096), FEATURES, batch_size, rank, world_size, shuffle=True, seed=3, augmentation=augment)
    return list(loader)


def test_feature_dropout_is_seeded_apart_from_the_shuffle_and_the_same_at_world_sizes_1_and_2():
    plain = _augmented(0, 1, 256)
    dropped = _augmented(0, 1, 256, feature_dropout=0.2)
    assert len(plain) == len(dropped) == 16
    for a, b in zip(plain, dropped):
        assert torch.equal(a.dense_features, b.dense_features), "the row order is the shuffle's alone"
    before = torch.stack([b.sparse_features.values() for b in plain])
    after = torch.stack([b.sparse_features.values() for b in dropped])
    share = ((after == 0) & (before != 0)).view(16, 9, 256)[:, :8].float().mean()
    assert 0.18 < float(share) < 0.22, "about p of every categorical feature's IDs become row 0"
    assert torch.equal(before.view(16, 9, 256)[:, 8], after.view(16, 9, 256)[:, 8]), "a single share spares the text"
    # reproducible from its seed, another seed draws otherwise
    again = torch.stack([b.sparse_features.values() for b in _augmented(0, 1, 256, feature_dropout=0.2)])
    assert torch.equal(after, again)
    other = torch.stack([b.sparse_features.values() for b in _augmented(0, 1, 256, seed=8, feature_dropout=0.2)])
    assert not torch.equal(after, other)
    # two ranks of half the batch: the same rows with the same IDs dropped
    ranks = [_augmented(r, 2, 128, feature_dropout=0.2) for r in (0, 1)]
    for whole, first, second in zip(dropped, *ranks):
        for key in FEATURES:
            joined = torch.cat([first.sparse_features[key].values(), second.sparse_features[key].values()])
            assert torch.equal(whole.sparse_features[key].values(), joined), key
    named = _augmented(0, 1, 256, feature_dropout={"C3": 0.5, "item_text": 0.5})
    values = torch.stack([b.sparse_features.values() for b in named]).view(16, 9, 256)
    changed = (values != before.view(16, 9, 256)).float().mean(dim=(0, 2))
    assert changed[[2, 8]].min() > 0.3 and changed[[0, 1, 3, 4, 5, 6, 7]].max() == 0, changed


def test_text_mixing_pairs_rows_with_text_seeded_and_the_same_weights_at_world_sizes_1_and_2():
    batches = _augmented(0, 1, 256, text_mix=0.3)
    for batch in batches:
        text = batch.sparse_features["item_text"].values()
        partner, weight = batch.augmentation[TEXT_MIX_PARTNER], batch.augmentation[TEXT_MIX_WEIGHT]
        assert (text[partner] != 0).all(), "partners have text"
        assert (weight[text == 0] == 0).all() and (weight >= 0).all() and (weight <= 0.3).all()
        assert float(weight[text != 0].mean()) == pytest.approx(0.15, abs=0.03)
    again = _augmented(0, 1, 256, text_mix=0.3)
    for a, b in zip(batches, again):
        assert all(torch.equal(a.augmentation[k], b.augmentation[k]) for k in a.augmentation)
    ranks = [_augmented(r, 2, 128, text_mix=0.3) for r in (0, 1)]
    for whole, first, second in zip(batches, *ranks):
        joined = torch.cat([first.augmentation[TEXT_MIX_WEIGHT], second.augmentation[TEXT_MIX_WEIGHT]])
        assert torch.equal(whole.augmentation[TEXT_MIX_WEIGHT], joined)
        assert (first.augmentation[TEXT_MIX_PARTNER] < 128).all(), "a partner is one of the rank's own rows"
    assert _augmented(0, 1, 256)[0].augmentation == {}
    vectors = torch.randn(4, 3)
    mixed = mix_rows(vectors, (torch.tensor([1, 0, 3, 2]), torch.tensor([0.0, 0.5, 0.0, 1.0])))
    assert torch.equal(mixed[[0, 2]], vectors[[0, 2]]), "a weight of 0 keeps the vector exactly"
    torch.testing.assert_close(mixed[1], (vectors[0] + vectors[1]) / 2)
    torch.testing.assert_close(mixed[3], vectors[2])


def test_a_resumed_epoch_makes_the_skipped_batches_augmentation_draws():
    augment = Augmentation({0: 0.3}, text_mix=0.2, text_column=8, seed=2)
    whole, resumed = (BatchLoader(_log(2048), FEATURES, 128, 1, 2, shuffle=True, seed=5, augmentation=augment)
                      for _ in range(2))
    whole.set_epoch(1)
    resumed.set_epoch(1, start_batch=3)
    expected, got = list(whole)[3:], list(resumed)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert all(torch.equal(a.augmentation[k], b.augmentation[k]) for k in a.augmentation)
    evaluation = BatchLoader(_log(512), FEATURES, 128, shuffle=False, pad_tail=True, augmentation=augment)
    assert all(b.augmentation == {} for b in evaluation), "unshuffled batches are not augmented"


def test_text_mixing_changes_the_text_input_in_training_only():
    model = _train_model(0.0, text_mix=True)
    batch = _augmented(0, 1, 256, text_mix=0.5)[0]
    model.train()
    mixed = model(batch)[0]
    plain = model.objective(model.model(batch.dense_features, batch.sparse_features), batch)[0]
    assert not torch.equal(mixed, plain)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)[0], plain.detach())


def test_flipped_labels_flip_a_seeded_share_of_present_labels():
    log = _log(20_000)
    (noisy,) = flipped_labels([log], {"click": 0.1}, seed=4)
    flipped = noisy.labels["click"] != log.labels["click"]
    assert 0.09 < flipped.mean() < 0.11
    assert set(np.unique(noisy.labels["click"])) == {0.0, 1.0}
    assert np.array_equal(noisy.labels["conversion"], log.labels["conversion"]), "only the named label"
    (again,) = flipped_labels([log], {"click": 0.1}, seed=4)
    assert np.array_equal(again.labels["click"], noisy.labels["click"])
    rating = {**log.labels, "click": np.where(np.arange(20_000) % 2, np.nan, 1.0).astype(np.float32)}
    (with_missing,) = flipped_labels([EncodedLog(log.dense, log.sparse, rating)], {"click": 0.5}, seed=0)
    assert np.isnan(with_missing.labels["click"][1::2]).all(), "a missing label stays missing"
    assert flipped_labels([log], {}, seed=0)[0] is log


def test_the_levers_are_off_by_default_and_their_keys_are_checked():
    config = load_config("configs/mmoe_synthetic.yaml")
    training = config.training
    assert training.adversarial.epsilon == 0.0 and training.label_noise == {}
    assert (training.augmentation.feature_dropout, training.augmentation.text_mix) == (0.0, 0.0)
    old = config_from_dict({"training": {"batch_size": 64, "item_id_dropout": 0.1}})  # a config written before them
    assert old.training.adversarial.epsilon == 0.0 and old.training.item_id_dropout == 0.1
    augmentation = "training.augmentation={feature_dropout: {C3: 0.1, item_text: 0.2}, text_mix: 0.2, seed: 4}"
    ok = load_config("configs/mmoe_synthetic.yaml", [augmentation, "training.label_noise={click: 0.1}"])
    assert ok.training.augmentation.feature_dropout == {"C3": 0.1, "item_text": 0.2}
    for override, message in [
        ("training.adversarial.epsilon=-1", "training.adversarial.epsilon: -1.0; allowed: >= 0"),
        ("training.augmentation.feature_dropout=1.5", "training.augmentation.feature_dropout: 1.5; allowed"),
        ("training.augmentation.feature_dropout={C9: 0.1}", "feature_dropout.C9: not a feature"),
        ("training.augmentation.text_mix=2", "training.augmentation.text_mix: 2.0; allowed: 0 to 1"),
        ("training.label_noise={rating: 0.1}", "training.label_noise.rating: not a binary label"),
        ("training.label_noise={click: 0.7}", "training.label_noise.click: 0.7; allowed: 0 to 0.5"),
    ]:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("+", r"\+")):
            load_config("configs/mmoe_synthetic.yaml", [override])
    with pytest.raises(ConfigError, match="text_mix: mixes item-text vectors, but model.text is null"):
        load_config("configs/mmoe_synthetic.yaml", ["model.text=null", "training.augmentation.text_mix=0.1"])


# --- end to end: the sharded pipeline, at world size 1 and 2 -------------------------------------------------------


def _overrides(log, bert, out, *extra) -> list:
    return [f"data.dir={log}", "data.generate=null", *ONE_PASS, f"out_dir={out}",
            f"model.text={{encoder: {bert}, cache: {out}/../item_text.npz}}", "training.batch_size=512",
            "training.eval_batch_size=4096", "training.progress=false", "checkpoint.every_seconds=0",
            "checkpoint.at_end=false", "training.curve_every=0", *extra]  # fmt: skip


def _trained_state(log, bert, out, *extra) -> tuple:
    """One epoch through the sharded pipeline (one process): each step's loss and the whole model state after."""
    from torchrec_mtl.run import prepare_job
    from torchrec_mtl.train.distributed import init_distributed
    from torchrec_mtl.train.loop import train

    config = load_config("configs/mmoe_synthetic.yaml", _overrides(log, bert, out, "training.batch_size=1024", *extra))
    job = prepare_job(config, init_distributed())
    losses = []
    train(job.sharded, job.pipeline, job.loader("train"), 1, show_progress=False,
          after_step=lambda summary, window: losses.append(summary.epoch_loss))  # fmt: skip
    state = {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).detach().clone()
             for k, v in job.sharded.state_dict().items()}  # fmt: skip
    return losses, state


def test_fgm_with_epsilon_0_is_the_plain_step_through_the_pipeline(small_log, tiny_bert_dir, tmp_path):
    plain_losses, plain = _trained_state(small_log, tiny_bert_dir, tmp_path / "a")
    zero_losses, zero = _trained_state(small_log, tiny_bert_dir, tmp_path / "b", "training.adversarial.epsilon=0")
    assert len(plain_losses) == 31 and plain_losses == zero_losses
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain), "the same weights"
    fgm_losses, fgm = _trained_state(small_log, tiny_bert_dir, tmp_path / "c", "training.adversarial.epsilon=0.5")
    assert fgm_losses[0] > 1.5 * plain_losses[0], "clean + adversarial on the first batch"
    table = next(k for k in plain if k.endswith("t_C2.weight"))
    assert not torch.equal(fgm[table], plain[table]), "the tables train from both passes"


def _levers_at_world_size_2(rank: int, world_size: int, port: int, log: str, bert: str, out: str) -> None:
    from dist_workers import _join

    from torchrec_mtl.run import run_job

    _join(rank, world_size, port)
    levers = ["training.adversarial.epsilon=0.5", "training.augmentation={feature_dropout: 0.1, text_mix: 0.3}",
              "training.sharding_types=[row_wise]"]  # fmt: skip
    run_job(load_config("configs/mmoe_synthetic.yaml", _overrides(log, bert, out, *levers)))


def test_the_levers_train_at_world_size_2_reproducibly(small_log, tiny_bert_dir, tmp_path):
    """FGM and both augmentations through DMP + TrainPipelineSparseDist in two gloo processes (row-wise tables: the
    perturbation comes after the output all-to-all), twice: the same results to the bit."""
    import torch.multiprocessing as mp

    from conftest import free_port

    results = []
    for name in ("first", "second"):
        out = tmp_path / name
        mp.spawn(_levers_at_world_size_2, args=(2, free_port(), str(small_log), str(tiny_bert_dir), str(out)), nprocs=2)
        results.append(json.loads((out / "results.json").read_text()))
    first, second = results
    assert first["training"]["world_size"] == 2 and first["training"]["steps"] > 10
    assert all(np.isfinite(loss) for loss in first["training"]["epoch_losses"])
    assert first["tasks"] == second["tasks"] and first["training"]["epoch_losses"] == second["training"]["epoch_losses"]
    assert first["tasks"]["ctr"]["auc"] > 0.55, "it learns"
