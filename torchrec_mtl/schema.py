"""What each column of a tabular log is: labels, integer and numeric features, categorical features, user and item IDs.

A schema is a YAML file in configs/datasets/. Headerless files (Criteo) list their columns in file order under
``columns`` (default: labels, then integer, numeric and categorical features in the order declared); files with a
header row are matched by name, and header columns the schema does not use must be listed under ``ignore``.

Per-column rules applied by preprocessing (torchrec_mtl.data.preprocess):

- ``labels``: ``binary`` (0 or 1) or ``regression`` (a finite number). A label is required on every row unless
  declared ``{kind: ..., optional: true}``; an optional label that is empty is missing (NaN: the row is outside that
  task's sample space).
- ``integer``: counts, transformed by ``log(1 + max(x, 0))``; empty means 0.
- ``numeric``: floats used as they are (already normalised upstream); empty means 0.
- ``categorical``: tokens in ``categorical_format`` (``hex``: Criteo's 32-bit hashes; ``decimal``: integer IDs),
  mapped to embedding rows by ``vocabulary`` (``{hash_size: N}``: row ``1 + token % (N - 1)``, as torchrec's criteo
  preprocessing hashes; ``{min_count: k}``: the tokens seen at least k times in the training split, in token order).
  Row 0 is shared by empty, rare and unseen tokens. ``feature_vocabulary`` overrides the rule per feature.

Example::

    >>> schema = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")  # doctest: +SKIP
    >>> schema.columns[:4]  # doctest: +SKIP
    ['click', 'conversion', 'rating', 'I1']
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


from torchrec_mtl.yaml_files import YamlFileError, read_yaml

LABEL_KINDS = ("binary", "regression")
CATEGORICAL_FORMATS = ("hex", "decimal")


class SchemaError(ValueError):
    """A schema file that cannot describe a log; the message names the file and the key."""


@dataclass(frozen=True)
class LabelSpec:
    kind: str
    optional: bool = False


@dataclass(frozen=True)
class VocabularyRule:
    """Exactly one of ``hash_size`` (rows, including row 0) or ``min_count``."""

    hash_size: Optional[int] = None
    min_count: Optional[int] = None

    @property
    def is_hash(self) -> bool:
        return self.hash_size is not None


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    labels: Dict[str, LabelSpec]
    integer: List[str]
    categorical: List[str]
    numeric: List[str] = field(default_factory=list)
    vocabulary: VocabularyRule = field(default_factory=lambda: VocabularyRule(min_count=1))
    feature_vocabulary: Dict[str, VocabularyRule] = field(default_factory=dict)
    categorical_format: str = "hex"
    separator: str = "\t"
    header: bool = False
    # Criteo's trailing fields are categoricals that may be empty; editors strip trailing tabs. When true, a line
    # missing only categorical fields is padded with empty fields (counted as padded); otherwise it is rejected.
    pad_short_rows: bool = False
    file_columns: Optional[List[str]] = None
    ignore: List[str] = field(default_factory=list)
    user_id: Optional[str] = None
    item_id: Optional[str] = None
    item_text_key: Optional[str] = None
    source: str = field(default="<in memory>", compare=False)

    @property
    def key_columns(self) -> List[str]:
        """The identity columns (user ID, item ID, item-text key) whose raw tokens preprocessing keeps beside the
        embedding rows: for per-user metrics, cold-item segments and text lookups."""
        return list(dict.fromkeys(c for c in (self.user_id, self.item_id, self.item_text_key) if c is not None))

    def __post_init__(self) -> None:
        where = self.source
        for label, spec in self.labels.items():
            if spec.kind not in LABEL_KINDS:
                raise SchemaError(f"{where}: labels.{label}: expected one of {LABEL_KINDS}, got {spec.kind!r}")
        seen = set()
        for column in [*self.features_and_labels, *self.ignore]:
            if column in seen:
                raise SchemaError(f"{where}: column {column!r} is declared twice")
            seen.add(column)
        if self.file_columns is not None:
            missing = [c for c in self.features_and_labels if c not in self.file_columns]
            extra = [c for c in self.file_columns if c not in seen]
            if missing or extra:
                raise SchemaError(
                    f"{where}: columns: every label and feature must appear once and every other column be listed "
                    f"under ignore; not in columns: {missing}, neither a label, a feature nor ignored: {extra}"
                )
        for key in ("user_id", "item_id", "item_text_key"):
            value = getattr(self, key)
            if value is not None and value not in self.categorical:
                raise SchemaError(f"{where}: {key}: {value!r} is not among the categorical columns")
        if self.categorical_format not in CATEGORICAL_FORMATS:
            raise SchemaError(
                f"{where}: categorical_format: expected one of {CATEGORICAL_FORMATS}, got {self.categorical_format!r}"
            )
        if len(self.separator) != 1:
            raise SchemaError(f"{where}: separator: expected one character, got {self.separator!r}")
        for feature, rule in [("vocabulary", self.vocabulary), *self.feature_vocabulary.items()]:
            path = feature if feature == "vocabulary" else f"feature_vocabulary.{feature}"
            if feature != "vocabulary" and feature not in self.categorical:
                raise SchemaError(f"{where}: {path}: not a categorical column")
            if (rule.hash_size is None) == (rule.min_count is None):
                raise SchemaError(f"{where}: {path}: give exactly one of hash_size or min_count")
            if rule.hash_size is not None and not 2 <= rule.hash_size < 2**31:
                raise SchemaError(f"{where}: {path}.hash_size: expected 2 <= hash_size < 2**31, got {rule.hash_size}")
            if rule.min_count is not None and rule.min_count < 1:
                raise SchemaError(f"{where}: {path}.min_count: expected >= 1, got {rule.min_count}")

    @property
    def features_and_labels(self) -> List[str]:
        return [*self.labels, *self.integer, *self.numeric, *self.categorical]

    @property
    def columns(self) -> List[str]:
        """Columns in file order for a headerless file."""
        return list(self.file_columns) if self.file_columns is not None else self.features_and_labels

    @property
    def dense(self) -> List[str]:
        """Dense model inputs, in order: the transformed integer features, then the numeric ones."""
        return [*self.integer, *self.numeric]

    def vocabulary_rule(self, feature: str) -> VocabularyRule:
        return self.feature_vocabulary.get(feature, self.vocabulary)

    def fingerprint(self) -> str:
        """Changes whenever a rule that shapes the preprocessed output changes."""
        content = {k: v for k, v in asdict(self).items() if k != "source"}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "DatasetSchema":
        try:
            raw = read_yaml(path, "schema")
        except YamlFileError as error:
            raise SchemaError(str(error)) from None
        if not isinstance(raw, dict):
            raise SchemaError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "<in memory>") -> "DatasetSchema":
        allowed = {
            "name", "labels", "integer", "numeric", "categorical", "vocabulary", "feature_vocabulary",
            "categorical_format", "separator", "header", "pad_short_rows", "columns", "ignore",
            "user_id", "item_id", "item_text_key",
        }  # fmt: skip
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise SchemaError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"name", "labels", "integer", "categorical"} - set(raw))
        if missing:
            raise SchemaError(f"{source}: missing key(s) {missing}")
        fields = dict(raw)
        for key in ("integer", "numeric", "categorical", "columns", "ignore"):
            if key not in fields:
                continue
            value = fields[key]
            if value is None and key not in ("integer", "categorical"):
                del fields[key]  # an empty YAML entry: the default (none, or the file order)
            elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise SchemaError(f"{source}: {key}: expected a list of column names, got {value!r}")
        scalar_types = {
            "name": (str,), "categorical_format": (str,), "separator": (str,), "header": (bool,),
            "pad_short_rows": (bool,), "user_id": (str, type(None)), "item_id": (str, type(None)),
            "item_text_key": (str, type(None)),
        }  # fmt: skip
        for key, types in scalar_types.items():
            if key in fields and not isinstance(fields[key], types):
                expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise SchemaError(f"{source}: {key}: expected {expected}, got {fields[key]!r}")
        if not isinstance(fields.get("feature_vocabulary") or {}, dict):
            raise SchemaError(f"{source}: feature_vocabulary: expected a mapping of column -> rule")
        if not isinstance(fields["labels"], dict) or not fields["labels"]:
            raise SchemaError(f"{source}: labels: expected a mapping of label column -> kind")
        fields["labels"] = {name: _label_spec(spec, f"{source}: labels.{name}") for name, spec in raw["labels"].items()}
        if "vocabulary" in fields:
            fields["vocabulary"] = _rule(fields["vocabulary"], f"{source}: vocabulary")
        fields["feature_vocabulary"] = {
            name: _rule(rule, f"{source}: feature_vocabulary.{name}")
            for name, rule in (fields.get("feature_vocabulary") or {}).items()
        }
        if "columns" in fields:
            fields["file_columns"] = fields.pop("columns")
        return cls(**fields, source=source)


def _label_spec(spec: Any, where: str) -> LabelSpec:
    if isinstance(spec, str):
        return LabelSpec(spec)
    if isinstance(spec, dict) and set(spec) <= {"kind", "optional"} and "kind" in spec:
        return LabelSpec(spec["kind"], bool(spec.get("optional", False)))
    raise SchemaError(f"{where}: expected a kind {LABEL_KINDS} or {{kind: ..., optional: true}}, got {spec!r}")


def _rule(rule: Any, where: str) -> VocabularyRule:
    if not isinstance(rule, dict) or not set(rule) <= {"hash_size", "min_count"}:
        raise SchemaError(f"{where}: expected {{hash_size: N}} or {{min_count: k}}, got {rule!r}")
    for key, value in rule.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{where}.{key}: expected an integer, got {value!r}")
    return VocabularyRule(**rule)
