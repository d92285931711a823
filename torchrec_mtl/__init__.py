"""torchrec_mtl: multi-task recommendation models on TorchRec."""

from importlib import metadata

try:
    __version__ = metadata.version("torchrec-mtl")
except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0.0.0+source"
