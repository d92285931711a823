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
- ``lists``: categorical columns that hold several tokens per row (a history of items, a set of genres), each also
  listed under ``categorical``: ``{column: {separator: "|", max_length: 50, keep: first|last, pooling: mean|sum,
  shares: <column> or null}}``. The field is split at ``separator`` (one character, not the file's, and none a token
  can hold); each element is a token of ``categorical_format`` mapped by the column's vocabulary rule; an empty
  field is an empty list. A list longer than ``max_length`` keeps its ``keep`` (default ``first``) ``max_length``
  elements and is counted as truncated. ``pooling`` (default ``mean``) pools the list's embeddings into one vector.
  ``shares: item`` maps the tokens through ``item``'s vocabulary and looks them up in ``item``'s embedding table
  (a clicked item's embedding is the candidate's); the list's vocabulary rule must then be ``item``'s.

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
from typing import Any, Dict, List, Optional, Tuple


from torchrec_mtl.yaml_files import YamlFileError, read_yaml

LABEL_KINDS = ("binary", "regression")
CATEGORICAL_FORMATS = ("hex", "decimal")
LIST_KEEPS = ("first", "last")
LIST_POOLINGS = ("mean", "sum")
# characters a token of each format may hold: a list separator among them would cut tokens apart
TOKEN_CHARACTERS = {"hex": "0123456789abcdefABCDEF+-", "decimal": "0123456789+-"}


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
class ListSpec:
    """A multi-valued categorical column: its ``separator``, at most ``max_length`` tokens kept per row (the
    ``first`` or ``last`` ones), pooled by ``mean`` or ``sum``, and the column whose vocabulary and table it
    ``shares`` (None: its own).

    Example::

        >>> ListSpec(separator="|", max_length=20, keep="last", shares="item").pooling
        'mean'
    """

    separator: str
    max_length: int
    keep: str = "first"
    pooling: str = "mean"
    shares: Optional[str] = None


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
    lists: Dict[str, ListSpec] = field(default_factory=dict)
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
        self._check_lists()

    def _check_lists(self) -> None:
        """Each list column's keys, and that the lists sharing a table agree with its owner (SchemaError naming
        ``lists.<column>.<key>``)."""
        where = self.source
        for key in ("user_id", "item_id", "item_text_key"):
            if getattr(self, key) in self.lists:
                raise SchemaError(f"{where}: {key}: {getattr(self, key)!r} is a list column; an identity column "
                                  f"holds one token per row")  # fmt: skip
        pooling_of_table: Dict[str, Tuple[str, str]] = {}  # owner -> (pooling, the list that set it)
        for column, spec in self.lists.items():
            path = f"{where}: lists.{column}"
            if column not in self.categorical:
                raise SchemaError(f"{path}: not a categorical column (list it under categorical too)")
            if len(spec.separator) != 1:
                raise SchemaError(f"{path}.separator: expected one character, got {spec.separator!r}")
            if spec.separator == self.separator or spec.separator in "\r\n":
                raise SchemaError(f"{path}.separator: {spec.separator!r} separates the file's fields or lines; "
                                  f"choose another character")  # fmt: skip
            if spec.separator in TOKEN_CHARACTERS[self.categorical_format]:
                raise SchemaError(f"{path}.separator: {spec.separator!r} can be part of a {self.categorical_format} "
                                  f"token; choose another character")  # fmt: skip
            if spec.max_length < 1:
                raise SchemaError(f"{path}.max_length: expected >= 1, got {spec.max_length}")
            if spec.keep not in LIST_KEEPS:
                raise SchemaError(f"{path}.keep: expected one of {LIST_KEEPS}, got {spec.keep!r}")
            if spec.pooling not in LIST_POOLINGS:
                raise SchemaError(f"{path}.pooling: expected one of {LIST_POOLINGS}, got {spec.pooling!r}")
            owner = spec.shares
            if owner is None:
                continue
            if owner in self.lists:
                shared = self.lists[owner].shares
                hint = f" (it shares {shared!r}: share that)" if shared is not None else ""
                raise SchemaError(f"{path}.shares: {owner!r} is a list column itself; a list shares the table of a "
                                  f"single-ID column{hint}")  # fmt: skip
            if owner not in self.categorical:
                raise SchemaError(f"{path}.shares: {owner!r} is not a categorical column; allowed: "
                                  f"{self.single_id_columns}")  # fmt: skip
            if self.vocabulary_rule(column) != self.vocabulary_rule(owner):
                raise SchemaError(
                    f"{path}.shares: {owner!r} maps tokens by {_rule_text(self.vocabulary_rule(owner))}, {column!r} by "
                    f"{_rule_text(self.vocabulary_rule(column))}; a shared table needs one rule (set the same under "
                    f"feature_vocabulary)"
                )
            pooling, other = pooling_of_table.setdefault(owner, (spec.pooling, column))
            if pooling != spec.pooling:
                raise SchemaError(f"{path}.pooling: {spec.pooling!r}, but {other!r} shares {owner!r}'s table too "
                                  f"with pooling {pooling!r}; one table pools one way")  # fmt: skip

    @property
    def list_columns(self) -> List[str]:
        """The list columns, in the order of ``categorical``."""
        return [c for c in self.categorical if c in self.lists]

    @property
    def single_id_columns(self) -> List[str]:
        """The categorical columns of one token per row, in the order of ``categorical`` (the ``sparse`` columns of
        the shards)."""
        return [c for c in self.categorical if c not in self.lists]

    def vocabulary_owner(self, feature: str) -> str:
        """The column whose vocabulary maps ``feature``'s tokens: the column a list shares, else the feature."""
        spec = self.lists.get(feature)
        return spec.shares if spec is not None and spec.shares is not None else feature

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
        if not self.lists:  # a schema without lists keeps the fingerprint it had before lists existed
            del content["lists"]
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
            "user_id", "item_id", "item_text_key", "lists",
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
        lists = fields.get("lists")
        if lists is None:
            fields.pop("lists", None)
        elif not isinstance(lists, dict):
            raise SchemaError(f"{source}: lists: expected a mapping of column -> {{separator, max_length, ...}}")
        else:
            fields["lists"] = {name: _list_spec(spec, f"{source}: lists.{name}") for name, spec in lists.items()}
        return cls(**fields, source=source)


def _label_spec(spec: Any, where: str) -> LabelSpec:
    if isinstance(spec, str):
        return LabelSpec(spec)
    if isinstance(spec, dict) and set(spec) <= {"kind", "optional"} and "kind" in spec:
        return LabelSpec(spec["kind"], bool(spec.get("optional", False)))
    raise SchemaError(f"{where}: expected a kind {LABEL_KINDS} or {{kind: ..., optional: true}}, got {spec!r}")


def _list_spec(spec: Any, where: str) -> ListSpec:
    """A ``lists`` entry's types (its values are checked by DatasetSchema)."""
    keys = {"separator", "max_length", "keep", "pooling", "shares"}
    if not isinstance(spec, dict) or not set(spec) <= keys:
        raise SchemaError(f"{where}: expected a mapping of {sorted(keys)}, got {spec!r}")
    missing = sorted({"separator", "max_length"} - set(spec))
    if missing:
        raise SchemaError(f"{where}: missing key(s) {missing}")
    max_length = spec["max_length"]
    if not isinstance(max_length, int) or isinstance(max_length, bool):
        raise SchemaError(f"{where}.max_length: expected an integer, got {max_length!r}")
    for key in ("separator", "keep", "pooling"):
        if key in spec and not isinstance(spec[key], str):
            raise SchemaError(f"{where}.{key}: expected a string, got {spec[key]!r}")
    if spec.get("shares") is not None and not isinstance(spec["shares"], str):
        raise SchemaError(f"{where}.shares: expected a column name or null, got {spec['shares']!r}")
    return ListSpec(**spec)


def _rule_text(rule: VocabularyRule) -> str:
    return f"{{hash_size: {rule.hash_size}}}" if rule.is_hash else f"{{min_count: {rule.min_count}}}"


def _rule(rule: Any, where: str) -> VocabularyRule:
    if not isinstance(rule, dict) or not set(rule) <= {"hash_size", "min_count"}:
        raise SchemaError(f"{where}: expected {{hash_size: N}} or {{min_count: k}}, got {rule!r}")
    for key, value in rule.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{where}.{key}: expected an integer, got {value!r}")
    return VocabularyRule(**rule)
