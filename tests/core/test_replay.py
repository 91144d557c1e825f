"""The recording forward and the replays of core: what DAS tails, patching and SPD prefixes stand on."""

import ast
from pathlib import Path

import torch
from torch import nn

from mechscope.core.intervene import Zero
from mechscope.core.recording import Call, ReplayError, prefix_before, record, recording, repeated
from mechscope.core.replay import plan_tail
from mechscope.core.run import run
from mechscope.core.site import Site
from mechscope.core.substitute import substituting
from mechscope.zoo import build


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 3)).eval()


def test_record_keeps_every_call_in_finish_order_with_nesting_ticks_and_changes_nothing():
    model, x = _model(), torch.randn(5, 4)
    out, calls = record(model, x, ["0", "1", "1.1", "2"])
    assert torch.equal(out, model(x))
    assert [c.path for c in calls] == ["0", "1.1", "1", "2"]  # "1" finishes after its child
    by = {c.path: c for c in calls}
    assert by["1"].start < by["1.1"].start < by["1.1"].end < by["1"].end < by["2"].start
    assert by["2"].args[0] is by["1"].output and by["1"].args[0] is by["0"].output  # the objects themselves
    assert all("forward" not in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sites_and_interventions_keep_working_inside_a_recording():
    model, x = _model(), torch.randn(5, 4)
    with recording(model, ["1.1"]) as calls:
        out, acts = run(model, x, {Site("0"): Zero()}, cache=[Site("1.1")])
    assert torch.equal(calls[0].output, acts[Site("1.1")])
    assert torch.equal(calls[0].args[0], torch.zeros(5, 8))  # the intervention ran before the recorded call


def test_prefix_before_takes_the_outermost_modules_called_once_with_batch_rows():
    model, x = _model(), torch.randn(5, 4)
    _, calls = record(model, x, ["0", "1", "1.0", "1.1", "2"])
    third = next(c for c in calls if c.path == "2")
    assert prefix_before(calls, third.start, rows=5) == ("0", "1")
    assert prefix_before(calls, third.start, rows=4) == ()  # outputs that are not per-example
    twice = calls + [Call("0", model[0], (x,), {}, calls[0].output, 100, 101)]
    assert prefix_before(twice, third.start, rows=5) == ("1",)


def test_repeated_outputs_stand_in_for_the_prefix_over_stacked_copies():
    model, x = _model(), torch.randn(5, 4)
    _, calls = record(model, x, ["1"])
    with substituting(model, repeated({"1": calls[0].output}, 3)):
        got = model(x.repeat(3, 1))
    assert torch.allclose(got, model(x).repeat(3, 1))


def test_a_later_block_replay_equals_its_own_precompute():
    model = build("transformer", n_layers=3)
    ids = torch.randint(0, 64, (4, 7))
    first = plan_tail(model, Site("blocks.0"), ids).precompute(ids)
    site = Site("blocks.1", io="input")
    fresh = plan_tail(model, site, ids).precompute(ids)
    later = first.later(site, fresh.anchor)
    assert [p for p, _ in later.plan.modules] == [p for p, _ in fresh.plan.modules] == ["blocks.1", "blocks.2"]
    idx = torch.tensor([3, 1])
    x = fresh.anchor[idx] + 0.1
    assert torch.allclose(later.replay(x, idx), fresh.replay(x, idx), atol=1e-6)
    assert torch.allclose(later.replay(x, idx, readout=[-1]), fresh.replay(x, idx)[:, [-1]], atol=1e-5)


def test_no_method_registers_hooks():
    """Methods record and replay through core (core.run, core.substitute, core.recording,
    core.replay), and within core only core.run hooks a module (the structure probe records)."""
    root = Path(__file__).resolve().parents[2] / "src" / "mechscope"
    found = []
    for pkg in ("causal", "circuits", "spd", "probe", "steer", "sae", "core"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path == root / "core" / "run.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr.startswith("register_") and "hook" in node.attr:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.attr}")
    assert not found, found


def test_a_module_whose_forward_is_already_replaced_is_refused_and_tails_fall_back():
    import pytest

    from mechscope.core.replay import ReplayError

    model, x = _model(), torch.randn(5, 4)
    with substituting(model, {"2": lambda original, a: original(a)}):  # as accelerate's dispatch hooks do
        with pytest.raises(ReplayError, match="already have their forward replaced"):
            record(model, x, ["2"])
        with pytest.raises(ReplayError, match="not a chain"):
            plan_tail(model, Site("0"), x)
    assert plan_tail(model, Site("0"), x).kind == "chain"


def test_the_structure_probe_records_through_forwards_accelerate_has_wrapped():
    """accelerate's dispatch replaces a module's forward on the instance; the probe wraps it
    (and puts it back) where the replay's recording refuses."""
    import pytest

    hooks = pytest.importorskip("accelerate.hooks")
    from mechscope.core import structure as structure_module
    from mechscope.core.trace import default_inputs, probe

    model = build("transformer", n_layers=2)
    plain = probe(model, default_inputs(model))
    for m in model.modules():
        hooks.add_hook_to_module(m, hooks.ModelHook())
    wrapped = {m: vars(m)["forward"] for m in model.modules()}
    traced = probe(model, default_inputs(model))
    assert traced.error is None and list(traced.outputs) == list(plain.outputs)
    assert traced.calls == plain.calls
    assert all(torch.equal(traced.values[p], v) for p, v in plain.values.items())
    assert all(torch.equal(traced.inputs[p], v) for p, v in plain.inputs.items())
    assert all(vars(m)["forward"] is f for m, f in wrapped.items())  # accelerate's forwards are back
    assert structure_module.structure(model).n_layers == 2
    with pytest.raises(ReplayError, match="already have their forward replaced"):
        record(model, torch.randint(0, 64, (1, 3)), ["blocks.0"])


def test_the_structure_probe_sees_outputs_before_user_hooks():
    from mechscope.core.trace import default_inputs, probe

    model = build("transformer", n_layers=2)
    plain = probe(model, default_inputs(model))
    handle = model.blocks[0].register_forward_hook(lambda m, a, out: out * 0 + 7)
    try:
        hooked = probe(model, default_inputs(model))
    finally:
        handle.remove()
    assert torch.equal(hooked.values["blocks.0"], plain.values["blocks.0"])
    assert (hooked.inputs["blocks.1"] == 7).all()  # the next block is called on what the hook returned
