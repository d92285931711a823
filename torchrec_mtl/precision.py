"""Mixed precision of the dense part (``training.precision``): ``fp32`` (the default: no autocast at all, bit for bit
what training did before this choice existed), ``bf16`` or ``fp16``.

Under ``bf16`` or ``fp16`` the dense arch, the interaction, the tower and its heads and the retrieval towers run under
``torch.autocast`` on the run's device; the embedding lookups (and the item-text arch) stay outside it, in fp32, and
the tower's outputs are cast back to fp32 before the objective, so losses and metrics are computed in fp32 and the
weights stay fp32 (autocast casts copies).

``fp16`` needs loss scaling (its gradients underflow): a ``torch.amp.GradScaler`` multiplies the loss the pipeline
backpropagates and unscales the dense gradients before the dense optimizer steps, skipping the step (and lowering
the scale) when one is not finite. TorchRec's fused embedding optimizers update the tables *inside* backward, before
any step could be skipped, from whatever gradient reaches them, so that gradient must already be the true one:
``GradientUnscale`` sits on the embedding lookups' outputs (and on a trainable item-text table's) and divides the
gradient flowing back into the tables by the same scale, in fp32; when that gradient is not finite (the step the
scaler will skip) it passes zeros instead, so an overflow never writes into a table (with rowwise Adagrad, Adagrad
or SGD a zero gradient changes nothing; Adam's moments still move). Tables therefore train with unscaled gradients,
as under fp32, whatever their optimizer.

Example::

    >>> precision = Precision("bf16", torch.device("cpu"))
    >>> with precision.autocast():
    ...     torch.nn.Linear(4, 2)(torch.randn(3, 4)).dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
from torch import nn

PRECISIONS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The dense part's precision on ``device``: its autocast context and, for fp16, the run's GradScaler (starting
    at ``init_scale``, GradScaler's default; it halves on every overflow and doubles after 2,000 clean steps).

    Raises ValueError for an unknown name, or bf16 on a GPU without bf16 support (before Ampere)."""

    def __init__(self, name: str, device: torch.device, init_scale: float = 2.0**16) -> None:
        if name not in PRECISIONS:
            raise ValueError(f"{name!r}; allowed: {', '.join(PRECISIONS)}")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or fp32")
        self.name, self.dtype, self.device_type = name, PRECISIONS[name], device.type
        self.scaler: Optional[torch.amp.GradScaler] = None
        if name == "fp16":
            self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)

    def autocast(self) -> ContextManager:
        if self.dtype is None:  # fp32: no autocast context at all, so nothing changes
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def _unscaled(gradient: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    true = gradient * scale.reciprocal().to(gradient.dtype)  # a power of two: exact
    # no host sync: a non-finite gradient (the step the scaler skips) becomes zeros on the device
    return torch.where(torch.isfinite(true).all(), true, torch.zeros_like(true))


class GradientUnscale(nn.Module):
    """Identity forward; in backward, the gradient divided by the scale of this step's loss (zeros when it is not
    finite), so that the fused embedding optimizers upstream see true gradients. A module, so that TorchRec's
    pipeline tracer takes it as a leaf."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        super().__init__()
        self.scaler = scaler

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if not (self.training and embeddings.requires_grad):
            return embeddings
        # the scale the objective multiplies this step's loss by, as a device tensor (GradScaler.scale of a one)
        scale = self.scaler.scale(torch.ones((), device=embeddings.device))
        embeddings.register_hook(partial(_unscaled, scale=scale))
        return embeddings


class ScaledStep:
    """The optimizer as the training pipeline sees it under fp16: ``step`` unscales the dense gradients, steps unless
    one is not finite, and updates the scale (GradScaler.step, GradScaler.update). Everything else (checkpoints, the
    learning-rate schedule) keeps using the optimizer itself."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        self.optimizer.zero_grad(*args, **kwargs)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @property
    def param_groups(self) -> Any:
        return self.optimizer.param_groups
