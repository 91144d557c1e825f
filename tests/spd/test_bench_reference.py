"""The benchmark's frozen copy of the SPD step (benchmarks/_spd_today.py) computes what the
library's float32 step computes, so that bench_spd.py compares the same work."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _spd_today  # noqa: E402

from mechscope.spd.decomposition import Decomposition  # noqa: E402
from mechscope.spd.objective import SPDObjective  # noqa: E402
from mechscope.tasks.spd_targets import data_fn, load_target, target  # noqa: E402


@pytest.mark.parametrize("name", ["tms_5_2", "resid_mlp"])
def test_frozen_step_equals_the_library_step(name):
    model = load_target(name).requires_grad_(False)
    dec = Decomposition(model, target(name).spd.replace(batch_size=128))
    x = data_fn(name)(128, torch.Generator().manual_seed(1))
    ours = SPDObjective(dec)(x, 0.5, torch.Generator().manual_seed(2))
    ours["total"].backward()
    g_ours = [p.grad.clone() for p in dec.parameters()]
    dec.zero_grad(set_to_none=True)
    frozen = _spd_today.objective(dec, x, 0.5, torch.Generator().manual_seed(2))
    frozen["total"].backward()
    for key in ("total", "stochastic", "layerwise", "importance"):
        assert float(frozen[key].detach()) == pytest.approx(float(ours[key].detach()), rel=1e-5), key
    for a, b in zip(g_ours, (p.grad for p in dec.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
