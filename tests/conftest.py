"""Shared fixtures: a small generated log on disk, and a launcher for multi-process gloo tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from torchrec_mtl.data import synthetic
from torchrec_mtl.data.synthetic import SyntheticConfig, generate

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = SyntheticConfig(num_rows=40_000, num_users=300, num_items=200, num_brands=40, seed=3)


@pytest.fixture(scope="session")
def small_log(tmp_path_factory) -> Path:
    """A 40,000-row synthetic log (train, test, items, truth, meta) in a temporary folder."""
    out = tmp_path_factory.mktemp("small_log")
    generate(SMALL, out)
    return out


# The tiny BERT's vocabulary: a few general words and every word the synthetic descriptions use.
WORDS = ["a", "the", "man", "woman", "is", "eating", "food", "meal", "stock", "market", "fell", "rose", "red", "blue",
         "shoes", "book", "cook", "run", "fast", "slow"]  # fmt: skip
WORDS += sorted(
    (
        {
            part
            for group in (
                synthetic._CATEGORY_WORDS,
                synthetic._APPEAL_WORDS,
                synthetic._VALUE_WORDS,
                synthetic._PRICE_WORDS,
            )
            for words in group
            for word in words
            for part in word.split()
        }
        | set(synthetic._FILLER_WORDS)
    )
    - set(WORDS)
)


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden size 32) with its tokenizer, saved like a user's model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained on the folder reads vocab.txt in both transformers 4 and 5 (in 5 the constructor
    # silently ignores vocab_file=, leaving only the special tokens).
    tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    assert len(tok) == len(vocab), "tiny tokenizer did not pick up its vocab"
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(cfg).eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
