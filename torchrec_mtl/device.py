"""Where tensors live: the device a user names (``--device``), checked against the machine, and the device a
collective's tensor needs.

Training takes its device from the process group (torchrec_mtl.train.distributed.init_distributed: a GPU per process
under NCCL, the host under gloo); the serving commands (evaluate, predict, export, vectors) take ``--device``, the
host by default. Results go to the host only where they are written out (files, numpy, pickled rank state); the
sites that do so are listed, with their reasons, in tests/test_device.py.

Example::

    >>> usable_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torchrec_mtl.errors import DeviceError  # noqa: F401 (raised here; importable from here)

# the serving commands' device when none is named: every machine has a host, not every one a GPU
DEFAULT_DEVICE = "cpu"


def usable_device(name: str | torch.device) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N`` or a torch.device) as a torch.device this process can use, or
    DeviceError in one line saying why not. ``cuda`` without an index stays so: the process group picks the GPU of
    each process (its LOCAL_RANK)."""
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{device.type}: not supported; allowed: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else (
                f"torch {torch.__version__} sees no CUDA GPU"
            )  # fmt: skip
            raise DeviceError(f"CUDA is not available on this machine ({built}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
    return device


def collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces only GPU tensors (the process's own, which
    init_distributed set), gloo host ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
