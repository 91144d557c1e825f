"""LoReFT and DiReFT: the formulas, the constraint, the parameter count, training with the model
frozen, save and load, positions, and clear errors."""

import pytest
import torch

from mechscope.core.site import Site
from mechscope.steer.finetune import TrainRecipe, train_reft
from mechscope.steer.reft import (
    DiReFT,
    LoReFT,
    Reft,
    ReftError,
    load_reft,
    n_trainable,
    parse_positions,
    prompt_positions,
    save_reft,
)
from mechscope.zoo import build


def test_loreft_formula_and_orthonormal_rows():
    m = LoReFT(16, rank=3, seed=0)
    r = m.rotate.weight.detach()
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-5)
    h = torch.randn(5, 16)
    w, b = m.learned_source.weight.detach(), m.learned_source.bias.detach()
    want = h + (h @ w.T + b - h @ r.T) @ r
    assert torch.allclose(m(h), want, atol=1e-5)
    # with W = R and b = 0 it is the identity
    with torch.no_grad():
        m.learned_source.weight.copy_(r)
    assert torch.allclose(m(h), h, atol=1e-5)


def test_direft_formula():
    m = DiReFT(8, rank=2, seed=0)
    h = torch.randn(4, 8)
    r, w, b = m.rotate.weight.detach(), m.learned_source.weight.detach(), m.learned_source.bias.detach()
    assert torch.allclose(m(h), h + (h @ w.T + b) @ r, atol=1e-6)


@pytest.mark.parametrize("cls", [LoReFT, DiReFT])
def test_parameter_count_is_2rd_plus_r(cls):
    assert n_trainable(cls(64, rank=4)) == 2 * 4 * 64 + 4


def test_orthogonality_survives_training_and_the_model_is_untouched():
    model = build("transformer", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reft = Reft([Site("blocks.0")], 64, "loreft", rank=2, positions="l1")
    ids = torch.randint(0, 64, (16, 8))
    target = torch.full((16,), 7)

    class Batch:
        inputs = {"input_ids": ids}
        labels = torch.full((16, 8), -100)
        prompt_start = torch.zeros(16, dtype=torch.long)
        prompt_len = torch.full((16,), 8)

    Batch.labels[:, -1] = target
    losses = train_reft(model, reft, lambda step: Batch, TrainRecipe(steps=60, lr=2e-2))
    assert losses[-1] < 0.25 * losses[0]  # it learns to emit token 7
    r = reft.interventions[0].rotate.weight.detach()
    assert torch.allclose(r @ r.T, torch.eye(2), atol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_save_and_load_round_trip(tmp_path):
    reft = Reft([Site("blocks.0", io="input"), Site("blocks.1")], 64, "direft", rank=3, positions="f1+l2", seed=4)
    path = tmp_path / "reft.safetensors"
    save_reft(path, reft)
    back = load_reft(path)
    assert back.kind == "direft" and back.rank == 3 and back.positions == "f1+l2" and back.sites == reft.sites
    h = torch.randn(2, 64)
    for a, b in zip(reft.interventions, back.interventions):
        assert torch.allclose(a(h), b(h))


def test_load_refuses_a_plain_tensor_file(tmp_path):
    from mechscope.core.checkpoint import save_tensors
    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(Exception, match="not a ReFT checkpoint|module checkpoint"):
        load_reft(tmp_path / "x.safetensors")


def test_positions():
    assert parse_positions("f2+l2") == (2, 2) and parse_positions("l3") == (0, 3) and parse_positions("f1") == (1, 0)
    idx = prompt_positions(torch.tensor([0, 3]), torch.tensor([6, 4]), "f2+l1")
    assert idx.tolist() == [[0, 1, 5], [3, 4, 6]]
    with pytest.raises(ReftError, match="shorter than the 4 positions"):
        prompt_positions(torch.tensor([0]), torch.tensor([3]), "f2+l2")
    with pytest.raises(ReftError, match="must look like"):
        parse_positions("first2")


def test_bad_configs():
    with pytest.raises(ReftError, match="rank must be in 1..8"):
        LoReFT(8, rank=9)
    with pytest.raises(ReftError, match="unknown ReFT kind"):
        Reft([Site("blocks.0")], 64, "lora")
    with pytest.raises(ReftError, match="built for width 8"):
        LoReFT(8)(torch.randn(2, 5))


@pytest.mark.parametrize("kind", ["loreft", "direft"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_the_edit_in_float32_rounded_once(kind, dtype):
    """A model run in bf16/fp16 (``--dtype``) feeds the intervention half-precision activations:
    it computes in its own float32 and returns the model's dtype (it used to fail on mixed
    dtypes)."""
    from mechscope.steer.reft import KINDS

    m = KINDS[kind](32, rank=4, seed=0)
    h = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = m(h)
    assert out.dtype == dtype and out.shape == h.shape
    assert torch.equal(out, m(h.float()).to(dtype))  # float32 all the way, rounded on the way back
