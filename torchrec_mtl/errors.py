"""The errors a run raises for its users to read (one line each, naming what failed), defined without torch so that
the command line can catch them before it imports the heavy parts: ``torchrec-mtl --version`` and ``configs`` start
in a fraction of a second, and a missing torchrec is one line of advice (torchrec_mtl.cli)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it."""


class TrainingStopped(RuntimeError):
    """SIGTERM stopped training after a checkpoint was written; running the same job again continues from it."""


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step, the terms that were not finite and (in a
    distributed run) the rank that saw it. Every rank raises it at the same step with the same message."""


class DeviceError(ValueError):
    """A device this machine does not have (CUDA without a GPU, a GPU index past the last)."""


class EnsembleError(ValueError):
    """Checkpoints that cannot be averaged: another schema, other tasks or other data than the first member's. The
    message names the member and what differs (torchrec_mtl.ensemble)."""
