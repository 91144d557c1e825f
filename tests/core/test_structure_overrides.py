"""Structure overrides stay with the model: a later rebuild (another probe input, a tool that
probes with its own example, refresh) applies them again; only new overrides replace them."""

from __future__ import annotations

import torch

from mechscope.core import structure as structure_module
from mechscope.zoo import build


def test_a_rebuild_with_another_example_keeps_the_users_overrides(monkeypatch):
    model = build("transformer", seed=0)
    seen = []
    real = structure_module._build

    def spy(m, overrides, example):
        seen.append(dict(overrides))
        return real(m, overrides, example)

    monkeypatch.setattr(structure_module, "_build", spy)
    first = structure_module.structure(model, final_norm="ln_final", refresh=True)
    again = structure_module.structure(model, example=torch.tensor([[1, 2, 3]]))  # e.g. plan_tail's own probe
    structure_module.structure(model, refresh=True)
    assert seen == [{"final_norm": "ln_final"}] * 3 and again.final_norm == first.final_norm == "ln_final"
    structure_module.structure(model, unembed="unembed")  # new overrides replace the old ones
    assert seen[-1] == {"unembed": "unembed"}
