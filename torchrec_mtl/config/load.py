"""Reading a job config: YAML files with their ``include`` lists, ``key.sub=value`` overrides, and the typed build of
the sections (torchrec_mtl.config.sections), whose errors name the dotted key; torchrec_mtl.config.check then checks
the values.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from torchrec_mtl.config.check import _check
from torchrec_mtl.config.sections import ConfigError, JobConfig
from torchrec_mtl.yaml_files import YamlFileError, read_yaml

_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _build(annotation: Any, value: Any, path: str) -> Any:
    """``value`` as ``annotation``, or a ConfigError naming ``path``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _build(options[0], value, path)
        for option in options:  # e.g. float | str: the first type that takes the value
            try:
                return _build(option, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {' or '.join(map(_type_name, options))}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or '<top>'}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        hints = typing.get_type_hints(annotation)
        names = [f.name for f in dataclasses.fields(annotation)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed here: {', '.join(names)}")
        required = [
            f.name
            for f in dataclasses.fields(annotation)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in value]
        if missing:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{missing[0]}: missing; {annotation.__name__} needs {', '.join(required)}")
        built = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        try:
            return annotation(**built)
        except ValueError as error:  # a dataclass's own __post_init__ check
            raise ConfigError(f"{path}: {error}") from None
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as a string
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        # NaN fails every comparison, so a range check downstream would let it through
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{path}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _set_dotted(raw: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


# The keys that hold a path of their own (data.train, data.test, data.validation and model.text's items and cache are
# relative to data.dir instead). Set in a file, a relative one resolves against that file's folder, so a config runs
# from any working directory; set on the command line, against the working directory.
PATH_KEYS = ("data.dir", "data.schema", "data.shards", "model.text.encoder", "checkpoint.dir", "checkpoint.resume",
             "finetune.checkpoint", "out_dir")  # fmt: skip
_NOT_PATHS = {"checkpoint.resume": ("auto", "never")}


def _resolve_paths(raw: Dict[str, Any], folder: Path) -> None:
    """Make the relative paths ``raw`` sets (PATH_KEYS) absolute, against ``folder``."""
    for dotted in PATH_KEYS:
        *sections, key = dotted.split(".")
        node: Any = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and value not in _NOT_PATHS.get(dotted, ()):
            node[key] = os.path.normpath(os.path.join(folder.absolute(), os.path.expanduser(value)))


def _read_yaml(path: Path, chain: tuple = ()) -> Dict[str, Any]:
    """A config file with its ``include`` list (files relative to it, merged in order, then the file over them); its
    paths (PATH_KEYS) resolved against its folder."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: includes itself (through {' -> '.join(str(p) for p in chain)})")
    try:
        raw = read_yaml(path, "config") or {}
    except YamlFileError as error:
        raise ConfigError(str(error)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    includes = raw.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ConfigError(f"{path}: include: expected a list of config files, got {includes!r}")
    _resolve_paths(raw, path.parent)
    merged: Dict[str, Any] = {}
    for i, item in enumerate(includes):
        try:
            merged = _merge(merged, _read_yaml(path.parent / item, (*chain, path.resolve())))
        except ConfigError as error:
            raise ConfigError(f"{path}: include[{i}]: {error}") from None
    return _merge(merged, raw)


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Optional[List[str]] = None,
    raw: Optional[Dict[str, Any]] = None,
) -> JobConfig:
    """Read ``path`` (YAML; its ``include`` files first, e.g. a dataset, a model, the tasks and the training
    sections), or take ``raw`` (a config as a dict, e.g. the one a checkpoint records), apply ``key.sub=value``
    overrides, validate, and return the JobConfig."""
    if raw is not None and path is not None:
        raise ValueError("load_config: give a path or a raw config, not both")
    raw = copy.deepcopy(raw) if raw is not None else (_read_yaml(Path(path)) if path is not None else {})
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem})") from None
        _set_dotted(raw, key.strip(), value)
    if not isinstance(raw.get("data"), dict) or "schema" not in raw["data"]:
        # set nowhere: the synthetic schema that ships with the package, wherever it is installed
        from torchrec_mtl.shipped import configs_root

        raw.setdefault("data", {})
        if isinstance(raw["data"], dict):
            raw["data"]["schema"] = str(configs_root().joinpath("datasets", "synthetic.yaml"))
    try:
        config = _build(JobConfig, raw, "")
        _check(config)
    except ConfigError as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None
    return config


def config_from_dict(raw: Dict[str, Any]) -> JobConfig:
    """A JobConfig from a dict such as ``config_to_dict`` writes (keys added since then take their defaults)."""
    return _build(JobConfig, raw, "")


def config_to_dict(config: JobConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)
