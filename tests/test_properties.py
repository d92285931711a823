"""Property-based tests (hypothesis) of the inputs users hand us: log lines, schema files, config overrides, CLI
arguments. Whatever they hold, nothing crashes with a traceback: a line is used or rejected with a reason (the
counts add up), a schema or config is accepted or refused with an error naming the key, the CLI exits with a code.

Examples tried per test are set by ``max_examples`` below (at least 1,000 for each parser). CI runs the
"ci" profile: derandomized, the same examples every run, so main stays green for a reason; the "explore" profile
draws new ones (``HYPOTHESIS_PROFILE=explore PROPERTY_EXAMPLES=5000 .venv/bin/python -m pytest
tests/test_properties.py``) and whatever it finds becomes an ``@example`` here.
"""

from __future__ import annotations

import contextlib
import io
import math
import os

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from list_logs import list_schema
from torchrec_mtl.cli import main
from torchrec_mtl.config import ConfigError, load_config
from torchrec_mtl.data.preprocess import REASONS, ChunkParser, LogFormatError, preprocess
from torchrec_mtl.schema import DatasetSchema, SchemaError

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "1000"))

SCHEMA = DatasetSchema.from_yaml("configs/datasets/synthetic.yaml")
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fields as logs really hold them, good and bad: numbers, hex tokens, labels like "2" or "yes", NaN and inf in
# integer columns, huge values, stray quotes, carriage returns, NUL bytes, a BOM, non-ASCII text.
ADVERSARIAL = st.sampled_from(
    ["", "0", "1", "2", "yes", "-1", "nan", "NaN", "inf", "-inf", "1e18", "1e400", "99999999999999999999", "0x1f",
     "ab12", "ZZ", "+5", "3.5", '"', "''", "\r", "\x00", "\ufeff1", "é", "日本", " 1", "1 ", "--", "1,2"]
)  # fmt: skip
FIELD = st.one_of(
    ADVERSARIAL,
    st.integers(-(10**20), 10**20).map(str),
    st.text(alphabet="0123456789abcdefABCDEF", max_size=18),
    st.text(max_size=12).filter(lambda t: "\t" not in t and "\n" not in t),
)
LINE = st.one_of(
    st.lists(FIELD, min_size=0, max_size=26).map("\t".join),
    st.just("\t".join(["1", "0", "4.5", *["3"] * 13, *["a1"] * 8])),  # a valid row
    st.just("\t".join(["0", "0", "", *["7"] * 13, *["ff"] * 8])),  # valid, no rating
)
ENDING = st.sampled_from(["\n", "\r\n"])


@FAST
@example(lines=["\t" * 25], ending="\n", bom=False)  # a first line with too many fields (polars refuses it)
@given(lines=st.lists(LINE, min_size=1, max_size=30), ending=ENDING, bom=st.booleans())
def test_every_line_of_a_chunk_is_used_or_rejected_with_a_known_reason(lines, ending, bom):
    chunk = (("\ufeff" if bom else "") + ending.join(lines) + ending).encode("utf-8", errors="surrogatepass")
    parsed = ChunkParser(SCHEMA, SCHEMA.columns).parse(chunk, first_line=1)
    assert parsed.lines == len(lines)
    assert len(parsed.line_numbers) + len(parsed.rejections) == parsed.lines, "a row was lost or counted twice"
    assert {reason for _, reason, *_ in parsed.rejections} <= set(REASONS)
    lines_seen = sorted([*parsed.line_numbers.tolist(), *(line for line, *_ in parsed.rejections)])
    assert lines_seen == list(range(1, len(lines) + 1))
    assert not (parsed.dense != parsed.dense).any() and all(map(math.isfinite, parsed.dense.ravel()))


LIST_SCHEMA = DatasetSchema.from_dict(list_schema(max_length=3), source="lists.yaml")
ELEMENT = st.one_of(
    st.sampled_from(["a1", "ff", "0", "", "zz", "+1", "-1", " 1", "1,2", "1ffffffffffffffffff", "\r", "é"]),
    st.text(alphabet="0123456789abcdef", min_size=1, max_size=17),
)
LIST_FIELD = st.lists(ELEMENT, max_size=6).map("|".join)
LIST_LINE = st.tuples(LIST_FIELD, st.lists(ELEMENT, max_size=5).map(",".join)).map(
    lambda lists: "\t".join(["1", "0", "4.5", *["3"] * 13, *["a1"] * 8, *lists])
)


@FAST
@given(lines=st.lists(LIST_LINE, min_size=1, max_size=30))
def test_every_list_is_kept_cut_to_its_max_length_or_rejected_with_a_list_reason(lines):
    parsed = ChunkParser(LIST_SCHEMA, LIST_SCHEMA.columns).parse(("\n".join(lines) + "\n").encode(), first_line=1)
    assert len(parsed.line_numbers) + len(parsed.rejections) == parsed.lines == len(lines)
    assert {reason for _, reason, *_ in parsed.rejections} <= set(REASONS)
    kept = [lines[n - 1].removesuffix("\r") for n in parsed.line_numbers]  # a CR before the line end ends it
    for name, width in (("history", 3), ("tags", 3)):
        fields = [line.split("\t")[-2 if name == "history" else -1] for line in kept]
        elements = [0 if field == "" else field.count("|" if name == "history" else ",") + 1 for field in fields]
        assert parsed.lists[name].lengths.tolist() == [min(n, width) for n in elements]
        assert parsed.truncated[name] == sum(n > width for n in elements)
        assert (parsed.lists[name].values >= 0).all() and len(parsed.lists[name].values) == sum(
            parsed.lists[name].lengths
        )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@example(raw=b"\x1f\x8b", good=0)  # gzip's magic number, then nothing
@given(raw=st.binary(max_size=600), good=st.integers(0, 5))
def test_whole_files_of_random_bytes_are_counted_line_by_line(tmp_path_factory, raw, good):
    folder = tmp_path_factory.mktemp("p")
    valid = "\t".join(["1", "0", "4.5", *["3"] * 13, *["a1"] * 8]) + "\n"
    path = folder / "log.tsv"
    path.write_bytes(valid.encode() * good + raw)
    try:
        summary = preprocess(SCHEMA, {"train": [path]}, folder / "out", max_bad_fraction=1.0, progress=False)
    except LogFormatError as error:  # bytes that start like gzip but are not: refused, naming the file
        assert raw.startswith(b"\x1f\x8b") and not good and str(path) in str(error)
        return
    assert summary.rows_read == summary.total_written + summary.rows_rejected
    assert summary.total_written >= good


SCHEMA_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**10), st.text(max_size=8), st.floats(allow_nan=True)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SCHEMA_KEYS = st.sampled_from(
    ["name", "labels", "integer", "numeric", "categorical", "vocabulary", "feature_vocabulary", "categorical_format",
     "separator", "header", "pad_short_rows", "columns", "ignore", "user_id", "item_id", "item_text_key", "lists",
     "other"]
)  # fmt: skip


@FAST
@given(changes=st.dictionaries(SCHEMA_KEYS, SCHEMA_VALUE, max_size=4))
def test_a_schema_is_accepted_or_refused_naming_its_key(changes):
    raw = yaml.safe_load(open("configs/datasets/synthetic.yaml"))
    raw.update(changes)
    try:
        DatasetSchema.from_dict(raw, source="random.yaml")
    except SchemaError as error:
        assert "random.yaml" in str(error)


CONFIG_KEYS = st.sampled_from(
    ["training.batch_size", "training.epochs", "training.embedding_lr", "training.item_id_dropout",
     "training.sharding_types", "model.embedding_dim", "model.tower.kind", "model.tower.num_experts",
     "model.tower.expert_layer_sizes", "model.text", "model.text.finetune_layers", "objective.tasks",
     "objective.tasks.cvr.given", "objective.weighting", "objective.products", "data.test_fraction", "data.train",
     "nonsense.key", "model", "training"]
)  # fmt: skip
CONFIG_VALUE = st.one_of(
    st.sampled_from(["0", "-1", "1", "2.5", "null", "true", "[]", "[row_wise]", "{}", "mmoe", "abc", "[1, -2]",
                     "{ctr: {label: nope}}", "{ctr: {label: click}}", "1e9", "'quoted", "[unclosed"]),
    st.text(max_size=10),
)  # fmt: skip


@FAST
@given(overrides=st.lists(st.tuples(CONFIG_KEYS, CONFIG_VALUE), max_size=3))
def test_config_overrides_are_accepted_or_refused_naming_the_key(overrides):
    try:
        load_config("configs/mmoe_synthetic.yaml", [f"{key}={value}" for key, value in overrides])
    except ConfigError as error:
        # the message names the file or the key it is about
        named = ["configs/mmoe_synthetic.yaml", "override", *(key for key, _ in overrides)]
        assert any(name in str(error) for name in named), str(error)
    except yaml.YAMLError:
        pass  # a value that is not YAML: reported by the CLI (test below)


ARGS = st.lists(
    st.one_of(
        st.sampled_from(["train", "preprocess", "generate", "encode-items", "--config", "--schema", "--out",
                         "--rows", "--items", "--cache", "--help", "configs/mmoe_synthetic.yaml", "/nonexistent",
                         "training.epochs=0", "model.tower.kind=x", "--train", "--test-fraction", "2", "-1"]),
        st.text(max_size=8),
    ),
    max_size=5,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=ARGS)
def test_cli_arguments_end_in_an_exit_code_never_a_traceback(argv):
    if (
        argv[:1] == ["train"]
        and len(argv) > 2
        and "configs/mmoe_synthetic.yaml" in argv
        and all("=" not in a or a.split("=")[0] in ("training.epochs", "model.tower.kind") for a in argv)
    ):
        return  # a valid train command would train for minutes: not what this test is about
    if argv[:1] == ["generate"] and "--out" in argv:
        return  # a valid generate command writes millions of rows
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            code = exit_.code
    assert code in (0, 1, 2), (argv, code)
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
