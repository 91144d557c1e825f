"""The shared recipe loop and shipped-checkpoint files of the zoo transformers."""

import dataclasses

import pytest
import torch

from mechscope.core.checkpoint import MissingCheckpointError, load_tensors
from mechscope.zoo.recipes import load_shipped, save_shipped, train_steps
from mechscope.zoo.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab=11, n_ctx=6, d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32)


@dataclasses.dataclass(frozen=True)
class Recipe:
    lr: float = 1e-2
    weight_decay: float = 0.0
    steps: int = 40


def test_loop_lowers_the_loss_and_logs():
    torch.manual_seed(0)
    model = Transformer(CFG)
    tokens = torch.randint(0, 11, (8, 6))
    lines = []

    def loss_at(step):
        logits = model(tokens)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))

    first = loss_at(0).item()
    out = train_steps(model, Recipe(), loss_at, pct_start=0.1, clip=0.5, log=lines.append)
    assert out is model and not model.training
    assert loss_at(0).item() < first
    assert [line.split(":")[0].split()[1] for line in lines] == ["0", "39"]


def test_save_load_round_trip_records_config_and_recipe(tmp_path):
    torch.manual_seed(1)
    model = Transformer(CFG).eval()
    path = tmp_path / "m.safetensors"
    save_shipped(path, model, CFG, Recipe())
    back = load_shipped(path, CFG, "test", "test_task")
    x = torch.randint(0, 11, (2, 6))
    assert torch.equal(back(x), model(x)) and not back.training
    _, meta = load_tensors(path)
    assert "recipe" in str(meta) and "d_model" in str(meta)
    with pytest.raises(MissingCheckpointError, match="mechscope train test_task"):
        load_shipped(tmp_path / "missing.safetensors", CFG, "test", "test_task")


def test_transformer_config_declares_its_bounds_on_the_fields():
    import pytest

    from mechscope.core.config import ConfigError

    for bad, message in ((dict(vocab=0), "vocab must be >= 1"), (dict(d_mlp=0), "d_mlp must be >= 1"),
                         (dict(act="tanh"), "expected one of 'gelu', 'relu'")):
        with pytest.raises(ConfigError, match=message):
            TransformerConfig(**bad)
    assert TransformerConfig(d_mlp=None).d_mlp is None  # attention-only
