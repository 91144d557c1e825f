"""Building a decomposition from a model and a config, its files, and every bad input."""

import pytest
import torch
from torch import nn

from mechscope.core.checkpoint import CheckpointError
from mechscope.core.config import ConfigError
from mechscope.spd.checkpoint import load_decomposition, save_decomposition
from mechscope.spd.components import SPDError
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.tasks.tms import TMSInstance
from mechscope.zoo.mlp import MLP


def _tms(seed=0, identity=False):
    torch.manual_seed(seed)
    return TMSInstance(5, 2, hidden_identity=identity)


def test_layers_are_described_from_the_model():
    dec = Decomposition(_tms(identity=True), SPDConfig(sites=("encoder", "identity", "decoder"), C=7,
                                                       C_per_site={"identity": 3}, tied=("decoder=encoder",)),
                        example_inputs=torch.rand(2, 5))
    info = {i.path: (i.kind, i.d_in, i.d_out, i.C, i.tied_to) for i in dec.layers}
    # TMS's +ID identity is a frozen nn.Linear set to I
    assert info == {"encoder": ("linear", 5, 2, 7, None), "identity": ("linear", 2, 2, 3, None),
                    "decoder": ("linear", 2, 5, 7, "encoder")}
    assert torch.equal(dec.target_weight("identity"), torch.eye(2))
    # tied: the decoder has no parameters of its own
    names = [n for n, _ in dec.named_parameters()]
    assert not any(n.startswith("components.decoder") for n in names)


def test_a_site_that_is_not_a_linear_layer_is_refused_with_the_valid_paths():
    with pytest.raises(SPDError, match=r"'acts.0' is a ReLU, not a linear or embedding layer.*layers.0"):
        Decomposition(MLP((4, 4, 2)), SPDConfig(sites=("acts.0",)))


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="C must be >= 1"):
        SPDConfig(sites=("encoder",), C=0)
    with pytest.raises(ConfigError, match="C must be >= 1"):
        SPDConfig(sites=("encoder",), C=-3)
    with pytest.raises(ConfigError, match="C_per_site"):
        SPDConfig(sites=("encoder",), C_per_site={"encoder": 0})
    with pytest.raises(ConfigError, match="DST=SRC"):
        SPDConfig(sites=("encoder",), tied=("decoder",))
    with pytest.raises(ConfigError, match="no field 'steps_per_layer'"):
        SPDConfig.from_dict({"steps_per_layer": 3})
    with pytest.raises(SPDError, match="no sites"):
        Decomposition(_tms(), SPDConfig())


def test_bad_ties_and_unknown_paths():
    with pytest.raises(SPDError, match="both must be decomposed"):
        Decomposition(_tms(), SPDConfig(sites=("decoder",), tied=("decoder=encoder",)))
    with pytest.raises(SPDError, match="cannot tie"):
        Decomposition(_tms(), SPDConfig(sites=("encoder", "decoder"), tied=("decoder=encoder",),
                                        C_per_site={"decoder": 3}))
    with pytest.raises(Exception, match="no module at path 'encoderr'.*did you mean 'encoder'"):
        Decomposition(_tms(), SPDConfig(sites=("encoderr",)))


def test_an_identity_needs_example_inputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Linear(4, 2))
    with pytest.raises(SPDError, match="example_inputs"):
        Decomposition(model, SPDConfig(sites=("1",)))
    dec = Decomposition(model, SPDConfig(sites=("1",), C=5), example_inputs=torch.randn(2, 3))
    assert dec.info["1"].d_in == 4 and dec.info["1"].kind == "identity"
    assert torch.equal(dec.target_weight("1"), torch.eye(4))


def test_decomposition_round_trip_and_another_target_is_refused(tmp_path):
    model = _tms(seed=0)
    dec = Decomposition(model, SPDConfig(sites=("encoder", "decoder"), tied=("decoder=encoder",), C=6))
    path = tmp_path / "dec.safetensors"
    save_decomposition(path, dec, {"note": "test"})
    back = load_decomposition(path, model)
    assert back.cfg == dec.cfg
    for (n1, p1), (n2, p2) in zip(dec.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(CheckpointError, match="decomposition of another target"):
        load_decomposition(path, _tms(seed=1))


def test_a_file_that_is_not_a_decomposition_is_refused(tmp_path):
    from mechscope.core.checkpoint import save_tensors

    path = tmp_path / "plain.safetensors"
    save_tensors(path, {"x": torch.zeros(2)}, {"kind": "something"})
    with pytest.raises(CheckpointError, match="not an SPD decomposition"):
        load_decomposition(path, _tms())
