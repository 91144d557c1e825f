"""One lazy-export helper for the package ``__init__``s."""

import subprocess
import sys
import types

import pytest

from mechscope.core.lazy import lazy_exports


def test_names_load_on_first_use_and_stay(monkeypatch):
    pkg = types.ModuleType("fake_pkg")
    monkeypatch.setitem(sys.modules, "fake_pkg", pkg)
    pkg.__getattr__, pkg.__dir__ = lazy_exports("fake_pkg", {"dumps": "json", "Path": "pathlib"})
    import json

    assert "dumps" not in vars(pkg)
    assert pkg.dumps is json.dumps and vars(pkg)["dumps"] is json.dumps  # kept after the first access
    assert {"dumps", "Path"} <= set(dir(pkg))
    with pytest.raises(AttributeError, match="module 'fake_pkg' has no attribute 'nothing'"):
        pkg.nothing


def test_package_exports_resolve_and_importing_mechscope_stays_cheap():
    import mechscope
    import mechscope.causal
    import mechscope.spd

    assert mechscope.LinearFeaturizer.__name__ == "LinearFeaturizer"
    assert mechscope.causal.Alignment.__module__ == "mechscope.causal.alignment"
    assert mechscope.spd.SPDConfig.__module__ == "mechscope.spd.config"
    assert "Site" in dir(mechscope) and "make_counterfactuals" in dir(mechscope.causal)
    code = "import sys, mechscope; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'mechscope' in m)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout == "" and out.stderr == ""
