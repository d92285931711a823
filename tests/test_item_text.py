"""Item text in the model: the table rows of an items file, the cached vectors in a sharded TorchRec table, frozen
through pipelined training (or tuned when asked), and cold items evaluated apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from torchrec_mtl.config import load_config
from torchrec_mtl.run import PreparedJob, prepare_job, run_job
from torchrec_mtl.modules.item_text import ITEM_TEXT_TABLE
from torchrec_mtl.text.cache import encode_items_file
from torchrec_mtl.text.encoder import TextEncoder
from torchrec_mtl.text.table import ItemTextTable
from torchrec_mtl.train.distributed import init_distributed
from torchrec_mtl.train.loop import train
from conftest import ONE_PASS


def _config(small_log, bert, out, *overrides):
    return load_config(
        "configs/mmoe_synthetic.yaml",
        [
            f"data.dir={small_log}",
            "data.generate=null", *ONE_PASS,
            f"out_dir={out}",
            f"model.text={{encoder: {bert}, cache: {out}/item_text.npz}}",
            "training.batch_size=256",
            "training.eval_batch_size=2048",
            "training.progress=false",
            *overrides,
        ],
    )


def _table_weights(job: PreparedJob) -> torch.Tensor:
    """The whole text table, assembled from this (only) rank's shards."""
    (name,) = [n for n in job.sharded.state_dict() if n.endswith(f"{ITEM_TEXT_TABLE}.weight")]
    tensor = job.sharded.state_dict()[name]
    full = torch.zeros(tensor.size())
    for shard in tensor.local_shards():
        (row, col), (height, width) = shard.metadata.shard_offsets, shard.tensor.shape
        full[row : row + height, col : col + width] = shard.tensor
    return full


def test_items_file_rows_fallback_and_errors(tmp_path, tiny_bert_dir):
    items = tmp_path / "items.tsv"
    items.write_text("item_id\tdescription\n0a\tred shoes\nff\t\n1b\tthe book\n")
    encode_items_file(items, tmp_path / "cache.npz", TextEncoder(tiny_bert_dir), progress=False)
    table = ItemTextTable.load(items, tmp_path / "cache.npz", "hex")
    # rows follow the file; an empty description, an unknown key and an empty key (-1) fall back to row 0's zeros
    assert table.rows(np.array([0x1B, 0x0A, 0xFF, 0x99, -1])).tolist() == [3, 1, 2, 0, 0]
    assert table.has_text.tolist() == [False, True, False, True]
    assert not table.vectors[[0, 2]].any() and table.vectors[[1, 3]].any(axis=1).all()

    items.write_text("item_id\tdescription\n0a\tred shoes\nzz\tthe book\n")
    with pytest.raises(ValueError, match=r"items.tsv:3: item_id 'zz' is not a hex id"):
        ItemTextTable.load(items, tmp_path / "cache.npz", "hex")
    items.write_text("item_id\tdescription\n0a\tred shoes\n0A\tthe book\n")
    with pytest.raises(ValueError, match="appears more than once"):
        ItemTextTable.load(items, tmp_path / "cache.npz", "hex")


@pytest.mark.parametrize("trainable", [False, True])
def test_cached_vectors_sit_in_a_planner_sharded_table_frozen_unless_trainable(
    small_log, tiny_bert_dir, tmp_path, trainable
):
    config = _config(small_log, tiny_bert_dir, tmp_path, f"model.text.trainable={str(trainable).lower()}")
    job = prepare_job(config, init_distributed())
    assert ITEM_TEXT_TABLE in str(job.sharded.plan), "the planner placed the text table"
    vectors = torch.from_numpy(job.text_table.vectors)
    assert torch.equal(_table_weights(job), vectors), "the sharded table holds the cached vectors"
    projection = [p.detach().clone() for p in job.sharded.module.model.item_text.projection.parameters()]

    loader = job.loader("train")
    loader.shards = [shard.take(np.arange(2048)) for shard in loader.shards[:1]]
    loader.num_rows = 2048
    train(job.sharded, job.pipeline, loader, epochs=1, show_progress=False)

    after = _table_weights(job)
    trained_projection = list(job.sharded.module.model.item_text.projection.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(projection, trained_projection)), "the projection learns"
    if trainable:
        assert not torch.equal(after, vectors), "a trainable table is tuned by the embedding optimizer"
    else:
        assert torch.equal(after, vectors), "a frozen table is bit-identical after training"


def test_results_report_cold_and_warm_items_with_text(small_log, tiny_bert_dir, tmp_path):
    results = run_job(_config(small_log, tiny_bert_dir, tmp_path))
    segments = results["segments"]
    meta = json.loads((small_log / "meta.json").read_text())
    assert segments["cold"]["rows"] + segments["warm"]["rows"] == meta["rows"]["test"]
    assert 0 < segments["cold"]["rows"] < segments["warm"]["rows"]
    for segment in segments.values():
        assert set(segment["tasks"]) == {"ctr", "cvr", "rating", "ctcvr"}
        assert 0.5 < segment["tasks"]["ctr"]["auc"] < 1.0
    # a second run reuses every cached vector
    assert "200 items, 0 encoded, 200 reused" in _rerun_output(small_log, tiny_bert_dir, tmp_path)


def _rerun_output(small_log, bert, tmp_path) -> str:
    import contextlib
    import io

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        config = _config(small_log, bert, tmp_path)
        prepare_job(config, init_distributed())
    return captured.getvalue()


def test_fine_tuning_trains_the_top_bert_layer_end_to_end_and_nothing_below(small_log, tiny_bert_dir, tmp_path):
    config = _config(small_log, tiny_bert_dir, tmp_path, "model.text.finetune_layers=1")
    job = prepare_job(config, init_distributed())
    arch = job.sharded.module.model.item_text
    bert = arch.bert
    before = {name: p.detach().clone() for name, p in bert.named_parameters()}
    loader = job.loader("train")
    loader.shards = [shard.take(np.arange(1024)) for shard in loader.shards[:1]]
    loader.num_rows = 1024
    summary = train(job.sharded, job.pipeline, loader, epochs=1, show_progress=False)
    assert summary.steps == 4 and len(summary.losses) == 1 and all(np.isfinite(summary.losses))
    changed = {name for name, p in bert.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("encoder.layer.1.") for name in changed), sorted(changed)
    assert any(name.startswith("encoder.layer.1.attention") for name in changed), "the top layer trains"
    # the descriptions were tokenised in table-row order: row r encodes item r's description
    r = int(job.text_table.rows(np.array([job.train_shards[0].keys["C2"][0]]))[0])
    tokens = arch.token_ids[r][arch.attention_mask[r].bool()]
    from transformers import AutoTokenizer

    decoded = AutoTokenizer.from_pretrained(str(tiny_bert_dir)).decode(tokens, skip_special_tokens=True)
    assert decoded == job.text_table.descriptions[r]
