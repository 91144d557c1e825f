"""The precision option of SPD: bf16 autocast of a step's matrix multiplies, refused where
the hardware cannot multiply bf16, and float32 left as it was."""

import pytest
import torch

from mechscope.cli import main
from mechscope.spd import precision
from mechscope.spd.checkpoint import fingerprint_of
from mechscope.spd.components import SPDError
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.objective import SPDObjective
from mechscope.tasks.spd_targets import data_fn, load_target, target

needs_bf16 = pytest.mark.skipif(not precision.bf16_supported("cpu"), reason="this CPU has no hardware bf16")


def _loss_and_grads(name: str, dtype: str) -> tuple[dict, torch.Tensor]:
    model = load_target(name).requires_grad_(False)
    cfg = target(name).spd.replace(dtype=dtype, batch_size=256)
    dec = Decomposition(model, cfg)
    out = SPDObjective(dec)(data_fn(name)(cfg.batch_size, torch.Generator().manual_seed(1)), 0.5,
                            torch.Generator().manual_seed(2))
    out["total"].backward()
    grads = torch.cat([p.grad.flatten() for p in dec.parameters() if p.grad is not None])
    return {k: float(out[k].detach()) for k in ("total", "stochastic", "layerwise", "importance")}, grads


@needs_bf16
@pytest.mark.parametrize("name", ["tms_5_2", "resid_mlp"])
def test_bf16_step_matches_float32_to_bf16_precision(name):
    f32, g32 = _loss_and_grads(name, "float32")
    bf16, g16 = _loss_and_grads(name, "bfloat16")
    for key, value in f32.items():  # bf16 keeps 8 bits of mantissa: ~0.4 % per product
        assert bf16[key] == pytest.approx(value, rel=2e-2), key
    assert torch.nn.functional.cosine_similarity(g32, g16, 0) > 0.99
    assert float((g32 - g16).norm() / g32.norm()) < 0.1


@needs_bf16
def test_bf16_step_keeps_parameters_and_losses_in_float32():
    model = load_target("tms_5_2").requires_grad_(False)
    dec = Decomposition(model, target("tms_5_2").spd.replace(dtype="bfloat16", batch_size=64))
    out = SPDObjective(dec)(data_fn("tms_5_2")(64, torch.Generator().manual_seed(0)), 0.0)
    out["total"].backward()
    assert out["total"].dtype == torch.float32
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in dec.parameters())


def test_bf16_is_refused_without_hardware_support(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    model = load_target("tms_5_2")
    dec = Decomposition(model, target("tms_5_2").spd.replace(dtype="bfloat16"))
    with pytest.raises(SPDError, match="needs hardware bf16.*use dtype float32"):
        SPDObjective(dec)
    with pytest.raises(SPDError, match="unknown SPD dtype 'float16'"):
        precision.check_dtype("float16")


def test_cli_dtype_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    args = ["spd", "train", "--target", "tms_5_2", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size",
            "16", "--warmup-steps", "1", "--C", "4", "--dtype", "bfloat16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs hardware bf16" in err
    assert main([*args[:-1], "float16"]) == 2  # not a choice
    monkeypatch.undo()
    if precision.bf16_supported("cpu"):
        assert main(args) == 0


def test_float32_fingerprint_is_the_one_from_before_the_option():
    cfg = SPDConfig(sites=("encoder",))
    assert "dtype" not in fingerprint_of(cfg)  # runs written before the option still resume
    assert fingerprint_of(cfg.replace(dtype="bfloat16"))["dtype"] == "bfloat16"
