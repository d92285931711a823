"""Reading a YAML file a user wrote: every way it can fail becomes one line naming the file.

Example::

    >>> read_yaml("configs/mmoe_synthetic.yaml", "config")["include"][0]  # doctest: +SKIP
    'parts/data_synthetic.yaml'
"""

from __future__ import annotations

import os
from typing import Any

import yaml


class YamlFileError(ValueError):
    """A YAML file that cannot be read or parsed; the message names it and says why."""


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of ``path`` (safe_load: tags that construct Python objects are refused); ``what`` names the
    kind of file in the messages ("config", "schema")."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise YamlFileError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise YamlFileError(f"{path}: is a folder; expected a YAML {what} file") from None
    except UnicodeDecodeError as error:
        raise YamlFileError(f"{path}: not UTF-8 text (byte {error.start}); expected a YAML {what} file") from None
    except OSError as error:
        raise YamlFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise YamlFileError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
