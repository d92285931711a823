"""The dense features' way into the tower: through the dense arch (an MLP ending at the embedding dim), or raw
(``model.dense_arch_layer_sizes: []``) into the interactions that take any width (concat, dcn), as the peers' models
take them."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from torchrec_mtl.build import build_model
from torchrec_mtl.config import ConfigError, InteractionConfig, ModelConfig, load_config

SIZES = {"C1": 7, "C2": 5, "C3": 11}


def _interaction_input_and_output(kind: str, dense_arch: list) -> tuple:
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=4, dense_arch_layer_sizes=dense_arch, interaction=InteractionConfig(kind=kind))
    model = build_model(config, num_dense=3, table_sizes=SIZES, device=torch.device("cpu"))
    seen = {}
    model.interaction.register_forward_hook(lambda module, inputs, output: seen.update(output=output))
    dense = torch.rand(2, 3) * 5
    ids = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SIZES), values=torch.tensor([1, 2, 0, 4, 3, 9]), lengths=torch.ones(6, dtype=torch.int32)
    )
    outputs = model(dense, ids)
    return model, dense, seen["output"], outputs


@pytest.mark.parametrize("kind", ["concat", "dcn"])
def test_raw_dense_features_reach_the_interaction_as_they_are(kind):
    model, dense, interaction_output, outputs = _interaction_input_and_output(kind, [])
    assert model.interaction.out_features == 3 + 4 * len(SIZES)  # the peers' width: raw dense + embeddings
    assert interaction_output.shape == (2, 3 + 4 * len(SIZES))
    if kind == "concat":
        assert torch.equal(interaction_output[:, :3], dense)
    assert not any(p.requires_grad for p in model.dense_arch.parameters())  # nothing between them
    assert all(torch.isfinite(logit).all() for logit in outputs.values())


def test_the_dense_arch_projects_the_dense_features_to_the_embedding_dim():
    model, dense, interaction_output, _ = _interaction_input_and_output("concat", [8, 4])
    assert model.interaction.out_features == 4 * (1 + len(SIZES))
    assert torch.equal(interaction_output[:, :4], model.dense_arch(dense))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.dense_arch_layer_sizes=[]"], r"model.dense_arch_layer_sizes: \[\]: raw dense features go to concat or "
                                              r"dcn interactions only; dot needs sizes ending at model.embedding_dim"),
        (["model.dense_arch_layer_sizes=[64, 8]", "model.interaction.kind=concat"],
         r"model.dense_arch_layer_sizes: \[64, 8\]; its last size must equal model.embedding_dim \(16\), or \[\]"),
    ],
)
def test_a_dense_front_end_the_interaction_cannot_take_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/mmoe_synthetic.yaml", ["model.interaction.kind=dot", *overrides])
