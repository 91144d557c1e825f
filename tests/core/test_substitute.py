import pytest
import torch
from torch import nn

from mechscope.core.intervene import Zero
from mechscope.core.run import run
from mechscope.core.site import Site, SiteError
from mechscope.core.substitute import substituting


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_the_substitute_runs_instead_of_the_module_and_the_module_is_restored():
    model, x = _model(), torch.randn(5, 4)
    plain = model(x)
    calls = []

    def double(original, a):
        calls.append(a.shape)
        return 2 * original(a)  # the module's own forward is still reachable

    with substituting(model, {"0": double}):
        got = model(x)
    want = model[2](model[1](2 * model[0](x)))
    assert torch.allclose(got, want) and calls == [(5, 4)]
    assert "forward" not in vars(model[0])
    assert torch.equal(model(x), plain)


def test_the_module_does_not_compute_when_the_substitute_does_not_call_it():
    model, x = _model(), torch.randn(5, 4)
    ran = []
    model[2].register_forward_pre_hook(lambda m, a: ran.append("pre"))
    handle = model[2].register_forward_hook(lambda m, a, out: ran.append("post"))
    known = torch.ones(5, 3)
    with substituting(model, {"2": lambda original, a: known}):
        out = model(x)
    handle.remove()
    assert torch.equal(out, known)
    assert ran == ["pre", "post"]  # hooks still run around the substitute


def test_sites_at_a_substituted_module_still_work():
    model, x = _model(), torch.randn(5, 4)
    with substituting(model, {"0": lambda original, a: original(a) + 1.0}):
        out, acts = run(model, x, {Site("2"): Zero()}, cache=[Site("0")])
    assert torch.allclose(acts[Site("0")], model[0](x) + 1.0)
    assert torch.equal(out, torch.zeros(5, 3))


def test_restored_when_the_body_raises():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with substituting(model, {"0": lambda original, a: a}):
            raise RuntimeError("boom")
    assert "forward" not in vars(model[0])


def test_bad_substitutions_are_clear_errors_and_leave_nothing_behind():
    model = _model()
    with pytest.raises(SiteError, match="no module at path 'layers.9'"):
        with substituting(model, {"0": lambda original, a: a, "layers.9": lambda original, a: a}):
            pass
    assert "forward" not in vars(model[0])
    with pytest.raises(TypeError, match="not callable"):
        with substituting(model, {"0": 3}):
            pass
    with substituting(model, {"0": lambda original, a: a}):
        with pytest.raises(SiteError, match="do not nest"):
            with substituting(model, {"0": lambda original, a: a}):
                pass
        assert "forward" in vars(model[0])  # the outer substitution is still active
    assert "forward" not in vars(model[0])
