"""Sequence features (``model.sequence``): DIN's activation unit and BST's encoder on their own (masking, empty
histories, gradients, what DIN learns to weigh), the model built around them (which tables are unpooled, the
widths, the lookups read from the EmbeddingCollection) and the config's checks, each naming its key.

The sharded path is in tests/test_distributed.py, the CLI (train, evaluate, fine-tune, the refusals) in
tests/test_sequence_e2e.py."""

from __future__ import annotations

import doctest

import pytest
import torch
import yaml
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from list_logs import list_schema
from torchrec_mtl.build import build_model
from torchrec_mtl.config import ConfigError, InteractionConfig, ModelConfig, SequenceConfig, load_config
from torchrec_mtl.embedding_tables import UNPOOLED, embedding_tables
from torchrec_mtl.model import MultiTaskModel, SequenceSparseArch
from torchrec_mtl.modules import sequence as sequence_module
from torchrec_mtl.modules.sequence import BSTEncoder, DINAttention, InterestArch, SequenceLookups
from torchrec_mtl.schema import ListSpec

D, L = 8, 6


def _modules():
    torch.manual_seed(0)
    return {
        "din": DINAttention(D, [16, 8]),
        "din_softmax": DINAttention(D, [16, 8], softmax=True),
        "bst": BSTEncoder(D, L, num_heads=2, num_layers=2),
    }


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(5, D, generator=generator)
    history = torch.randn(5, L, D, generator=generator)
    return query, history, torch.tensor([6, 3, 1, 0, 2])


def test_the_examples_of_the_sequence_module_run():
    assert doctest.testmod(sequence_module).failed == 0


@pytest.mark.parametrize("name", ["din", "din_softmax", "bst"])
def test_padded_positions_change_nothing_even_holding_nan(name, inputs):
    module = _modules()[name].eval()
    query, history, lengths = inputs
    expected = module(query, history, lengths)
    garbage = history.clone()
    for row, length in enumerate(lengths.tolist()):
        garbage[row, length:] = torch.randn(L - length, D) * 100
    garbage[1, 5] = float("nan")
    torch.testing.assert_close(module(query, garbage, lengths), expected, rtol=0, atol=1e-6)
    # a valid position does change the output (the check above would pass for a module ignoring the history)
    moved = history.clone()
    moved[0, 0] += 1.0
    assert not torch.allclose(module(query, moved, lengths)[0], expected[0])


@pytest.mark.parametrize("name", ["din", "din_softmax", "bst"])
def test_an_empty_history_gives_a_finite_output_and_finite_gradients(name, inputs):
    module = _modules()[name].train()
    query, history, _ = inputs
    history = history.clone().requires_grad_(True)
    query = query.clone().requires_grad_(True)
    output = module(query, history, torch.zeros(5, dtype=torch.long))
    assert torch.isfinite(output).all()
    (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(history.grad).all()
    assert history.grad.abs().sum() == 0, "an empty history is all padding: no gradient reaches it"
    if name.startswith("din"):
        assert output.abs().sum() == 0, "DIN's weighted sum over no position is zeros"


def test_bst_reads_the_order_of_the_history_through_its_positions(inputs):
    module = _modules()["bst"].eval()
    query, history, lengths = inputs
    swapped = history.clone()
    swapped[0, [0, 5]] = history[0, [5, 0]]
    assert not torch.allclose(module(query, swapped, lengths)[0], module(query, history, lengths)[0])


def test_the_gradient_reaches_the_history_rows_of_the_table_and_not_the_padding():
    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="t_item", embedding_dim=D, num_embeddings=20,
                                                     feature_names=["item", "history"])])  # fmt: skip
    features = KeyedJaggedTensor(  # rows: item 1 with history [2, 3]; item 4 with history [] (padding reads nothing)
        keys=["item", "history"], values=torch.tensor([1, 4, 2, 3]), lengths=torch.tensor([1, 1, 2, 0])
    )
    for module in (DINAttention(D, [8]), BSTEncoder(D, 3)):
        ec.zero_grad()
        looked_up = ec(features)
        history = looked_up["history"]
        output = module(looked_up["item"].values(), history.to_padded_dense(3), history.lengths())
        # weighted: the plain sum of a LayerNorm's output (BST's last step) does not depend on its input
        (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        grad = ec.embeddings["t_item"].weight.grad
        touched = {row for row in range(20) if grad[row].abs().sum() > 0}
        assert {2, 3} <= touched <= {1, 2, 3, 4}, (type(module).__name__, touched)


def test_din_learns_to_weigh_the_history_item_equal_to_the_candidate_most():
    """A toy task that only attention solves: each history position carries a random bit beside its item, and the
    label is the bit of the position whose item is the candidate. Untrained, the heaviest position (in absolute
    weight: the readout may flip the sign) is the matching one in about one row in L; trained, in every row."""
    torch.manual_seed(0)
    items, rows = 40, 1024
    table = torch.nn.functional.normalize(torch.randn(items, D - 1), dim=1)
    history_ids = torch.stack([torch.randperm(items)[:L] for _ in range(rows)])
    match_at = torch.randint(0, L, (rows,))
    bits = torch.randint(0, 2, (rows, L)).float()
    label = bits[torch.arange(rows), match_at]
    history = torch.cat([table[history_ids], bits.unsqueeze(-1) * 2 - 1], dim=-1)
    query = torch.cat([table[history_ids[torch.arange(rows), match_at]], torch.zeros(rows, 1)], dim=-1)
    lengths = torch.full((rows,), L)
    attention, readout = DINAttention(D, [32]), torch.nn.Linear(D, 1)

    def match_share():
        with torch.no_grad():
            weights = attention.weights(query, history, lengths)
        return (weights.abs().argmax(dim=1) == match_at).float().mean().item()

    before = match_share()
    optimizer = torch.optim.Adam([*attention.parameters(), *readout.parameters()], lr=0.02)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 150 small steps: a second thread costs more than it brings (0.3 s on one core)
    try:
        for _ in range(150):
            logit = readout(attention(query, history, lengths)).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    after = match_share()
    assert before < 0.35 and after > 0.95, (before, after)


# --- the lookups and the model --------------------------------------------------------------------------------------


def _collections():
    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=[
        EmbeddingConfig(name="t_item", embedding_dim=D, num_embeddings=10, feature_names=["item", "history", "seen"]),
        EmbeddingConfig(name="t_cat", embedding_dim=D, num_embeddings=5, feature_names=["cat", "hist_cat"]),
    ])  # fmt: skip
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_user", embedding_dim=D, num_embeddings=7,
                                                            feature_names=["user"])])  # fmt: skip
    return ebc, ec


def _batch(hist_cat_lengths=(2, 0, 1)):
    # rows: 3; keys in schema order; "seen" is a mean-pooled list of t_item that is no sequence feature
    keys = ["user", "item", "cat", "history", "seen", "hist_cat"]
    lengths = [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 1, 3, 0, 1, *hist_cat_lengths]
    values = torch.arange(sum(lengths)) % 5
    return KeyedJaggedTensor(keys=keys, values=values, lengths=torch.tensor(lengths))


def _lookups():
    return SequenceLookups(
        ["user", "item", "cat", "seen"], ["item", "cat", "seen"], {"seen": "mean"}, ["history", "hist_cat"],
        ["item", "cat"], max_length=4,
    )  # fmt: skip


def test_the_lookups_read_single_ids_pooled_lists_histories_and_queries_from_the_collections():
    ebc, ec = _collections()
    features = _batch()
    arch = SequenceSparseArch(ebc, ec, _lookups())
    embeddings, history, lengths, query = arch(features)
    assert embeddings.shape == (3, 4, D) and history.shape == (3, 4, 2 * D) and query.shape == (3, 2 * D)
    assert lengths.tolist() == [2, 0, 1]
    item = ec.embeddings["t_item"].weight
    jagged = features.to_dict()
    torch.testing.assert_close(embeddings[:, 0], ebc(features)["user"])
    torch.testing.assert_close(embeddings[:, 1], item[jagged["item"].values()])
    torch.testing.assert_close(query[:, :D], embeddings[:, 1])  # the candidate item is the query
    # a list that is no sequence feature pools as its bag would (mean; an empty list: zeros)
    mean = EmbeddingBagConfig(
        name="t_item", embedding_dim=D, num_embeddings=10, feature_names=["seen"], pooling=PoolingType.MEAN
    )
    bags = EmbeddingBagCollection(tables=[mean])
    bags.embedding_bags["t_item"].weight.data.copy_(item.data)
    torch.testing.assert_close(embeddings[:, 3], bags(features)["seen"])
    # the history: each position's item and category side by side, zeros after the row's length
    first = jagged["history"].values()[:2]
    torch.testing.assert_close(history[0, :2, :D], item[first])
    assert history[1].abs().sum() == 0 and history[2, 1:].abs().sum() == 0


def test_sequence_features_of_different_lengths_in_a_row_are_an_error_naming_them():
    ebc, ec = _collections()
    with pytest.raises(ValueError, match=r"'history' and 'hist_cat' .* different lengths in 2 row\(s\)"):
        SequenceSparseArch(ebc, ec, _lookups())(_batch(hist_cat_lengths=(1, 0, 2)))


SCHEMA = list_schema(categories=True)  # the synthetic columns C1-C8, history (C2's table), tags, hist_category (C3's)
SIZES = {"C1": 30, "C2": 20, "C3": 6, "C4": 5, "C5": 4, "C6": 9, "C7": 11, "C8": 3, "history": 20, "tags": 50,
         "hist_category": 6}  # fmt: skip
LISTS = {name: ListSpec(**spec) for name, spec in SCHEMA["lists"].items()}


def _model(**sequence) -> MultiTaskModel:
    torch.manual_seed(0)
    config = ModelConfig(sequence=SequenceConfig(**sequence), interaction=InteractionConfig(kind="concat"))
    return build_model(config, 13, SIZES, device=torch.device("cpu"), lists=LISTS)


def test_the_tables_a_sequence_feature_looks_up_are_unpooled_and_the_rest_pooled():
    tables = embedding_tables(SIZES, LISTS, ["history", "hist_category"])
    assert [(t.name, t.features) for t in tables if t.collection == UNPOOLED] == [
        ("t_C2", ("C2", "history")), ("t_C3", ("C3", "hist_category"))]  # fmt: skip
    model = _model(kind="din", features=["history", "hist_category"])
    arch = model.sparse_arch
    assert isinstance(arch, SequenceSparseArch)
    assert sorted(arch.embedding_collection.embeddings) == ["t_C2", "t_C3"]
    assert sorted(arch.embedding_bag_collection.embedding_bags) == ["t_C1", "t_C4", "t_C5", "t_C6", "t_C7", "t_C8",
                                                                     "t_tags"]  # fmt: skip
    # one embedding per non-sequence feature in schema order, then the interest vector
    assert arch.sparse_feature_names == ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "tags"]
    assert isinstance(model.interest, InterestArch)
    assert model.interest.attention.dim == 2 * 16 and model.interest.projection.out_features == 16
    # concat: the dense output and 9 features + the interest, 16 wide each
    assert model.interaction.out_features == 16 * (1 + 9 + 1)


@pytest.mark.parametrize("kind", ["din", "bst"])
def test_a_sequence_model_scores_a_batch_and_one_feature_needs_no_projection(kind):
    model = _model(kind=kind, features=["history"], num_heads=4)
    assert isinstance(model.interest.projection, torch.nn.Identity)
    assert "t_C3" not in model.sparse_arch.embedding_collection.embeddings, "only history's table is unpooled"
    rows = 4
    lengths = [1] * (8 * rows) + [3, 0, 8, 1] + [2] * rows + [3, 0, 8, 1]  # C1-C8, history, tags, hist_category
    features = KeyedJaggedTensor(keys=list(SIZES), values=torch.arange(sum(lengths)) % 3,
                                 lengths=torch.tensor(lengths))  # fmt: skip
    outputs = model(torch.randn(rows, 13), features)
    assert sorted(outputs) == ["ctr", "cvr", "rating"] and all(torch.isfinite(v).all() for v in outputs.values())


def test_the_two_towers_read_the_non_sequence_features_of_a_sequence_model():
    torch.manual_seed(0)
    config = ModelConfig(sequence=SequenceConfig(kind="din", features=["history", "hist_category"]))
    model = build_model(config, 13, SIZES, device=torch.device("cpu"), lists=LISTS,
                        retrieval_features=(["C1"], ["C2", "tags"]))  # fmt: skip
    assert model.retrieval.user_columns == [0] and model.retrieval.item_columns == [1, 8]  # tags: the 9th embedding
    rows = 4
    lengths = [1] * (8 * rows) + [3, 0, 8, 1] + [2] * rows + [3, 0, 8, 1]
    features = KeyedJaggedTensor(keys=list(SIZES), values=torch.arange(sum(lengths)) % 3,
                                 lengths=torch.tensor(lengths))  # fmt: skip
    user, item = model.retrieval_vectors(features)
    assert user.shape == item.shape == (rows, config.retrieval.dim)


def test_kind_none_builds_the_pooled_model_unchanged():
    plain = _model()
    assert not hasattr(plain.sparse_arch, "embedding_collection") and plain.interest is None
    assert not [name for name in plain.state_dict() if "interest" in name or ".embeddings." in name]


# --- the config --------------------------------------------------------------------------------------------------


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "lists.yaml"
    short = {"separator": "|", "max_length": 3, "shares": "C2"}  # shares the item too, but 3 long, not 8
    schema = {**SCHEMA, "lists": {**SCHEMA["lists"], "short": short}, "categorical": [*SCHEMA["categorical"], "short"]}
    path.write_text(yaml.safe_dump(schema))
    return path


def _load(schema_file, *overrides):
    return load_config("configs/mmoe_synthetic.yaml", [f"data.schema={schema_file}", "model.text=null", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.sequence.kind=lstm", "model.sequence.features=[history]"], "model.sequence.kind: 'lstm'; allowed"),
        (["model.sequence.features=[history]"], "model.sequence.features: .* only with model.sequence.kind din"),
        (["model.sequence.kind=din"], "model.sequence.features: none"),
        (["model.sequence.kind=din", "model.sequence.features=[C2]"], r"features\[0\]: 'C2' is not a list column"),
        (["model.sequence.kind=din", "model.sequence.features=[history, tags]"],
         r"features\[1\]: list 'tags' .* shares no column"),
        (["model.sequence.kind=bst", "model.sequence.features=[history, short]"],
         "model.sequence.features: .* need one max_length"),
        (["model.sequence.kind=bst", "model.sequence.features=[history]", "model.sequence.num_heads=3"],
         "model.sequence.num_heads: 3 does not divide the width attended over, 16"),
        (["model.sequence.kind=din", "model.sequence.features=[history]", "model.sequence.attention_layer_sizes=[]"],
         "model.sequence.attention_layer_sizes"),
        (["model.sequence.kind=din", "model.sequence.features=[history]",
          "objective.tasks={ctr: {label: click}, match: {label: click, kind: retrieval}}", "objective.products={}",
          "model.retrieval.user_features=[C1, history]"], "model.retrieval.user_features: .* sequence features"),
    ],
)  # fmt: skip
def test_bad_sequence_configs_are_refused_naming_the_key(schema_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _load(schema_file, *overrides)


def test_a_good_sequence_config_loads(schema_file):
    config = _load(schema_file, "model.sequence.kind=bst", "model.sequence.features=[history, hist_category]")
    assert config.model.sequence.features == ["history", "hist_category"] and config.model.sequence.num_heads == 2


def test_fine_tuning_names_the_attention_sequence_and_its_tables_embeddings():
    from torchrec_mtl.finetune import part_of

    names = [name for name, _ in _model(kind="bst", features=["history"]).named_parameters()]
    assert part_of("sparse_arch.embedding_collection.embeddings.t_C2.weight") == "embeddings"
    assert {part_of(name) for name in names if name.startswith("interest.")} == {"sequence"}
