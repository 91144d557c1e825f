import math

import pytest

from mechscope.bench.registry import Registry, RegistryError, SelectionError, Threshold, as_threshold


def _noop(ctx):
    return 1.0


def _registry() -> Registry:
    reg = Registry()
    reg.register("toy_task", "das", "iia", (">=", 0.9), kind="check", run=_noop)
    reg.register("toy_task", "probe", "accuracy", (">=", 0.8), kind="check", run=_noop)
    reg.register("other_task", "sae", "mse", ("<=", 0.1), kind="check", run=_noop)
    reg.register("other_task", "sae", "l0", None, run=_noop, full_only=True)
    return reg


@pytest.mark.parametrize("task,method,metric", [
    ("ToyTask", "das", "iia"), ("toy-task", "das", "iia"), ("toy/task", "das", "iia"),
    ("toy_task", "DAS", "iia"), ("toy_task", "das", "iia__x"), ("1task", "das", "iia"),
    ("toy_task", "das", ""), ("toy_task", "das", "iia_"),
])
def test_names_must_be_lower_snake_case(task, method, metric):
    with pytest.raises(RegistryError, match="must be lower_snake_case"):
        Registry().register(task, method, metric, run=_noop)


@pytest.mark.parametrize("spec,message", [
    (("=>", 1.0), "op '=>' is not one of"),
    ((">=", math.nan), "finite number"),
    ((">=", "high"), "finite number"),
    ((">=",), r"\(op, value\)"),
])
def test_bad_thresholds_are_rejected(spec, message):
    with pytest.raises(RegistryError, match=message):
        Registry().register("t", "m", "x", spec, run=_noop)


@pytest.mark.parametrize("op,value,expected", [
    (">=", 0.5, True), (">=", 0.6, False), ("<=", 0.5, True), ("<", 0.5, False),
    (">", 0.4, True), ("==", 0.5, True), ("==", 0.4, False),
])
def test_threshold_ops(op, value, expected):
    assert Threshold(op, value).passes(0.5) is expected


def test_threshold_forms():
    assert as_threshold(None) is None
    assert as_threshold((">=", 1)) == Threshold(">=", 1)
    assert Threshold("<=", 0.25).to_dict() == {"op": "<=", "value": 0.25}


def test_duplicate_registration_is_an_error():
    reg = Registry()
    reg.register("t", "m", "x", run=_noop)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("t", "m", "x", run=lambda ctx: 0.0)
    reg.register("t", "m", "x", run=_noop)  # re-registering the same function is harmless
    assert len(reg) == 1


def test_decorator_returns_function_and_records_metadata():
    reg = Registry()

    @reg.check("t", "m", "x", ("<", 3), kind="finding", baselines={"random": "a random guess"},
               other_metrics={"y": (">", 0)})
    def my_check(ctx):
        """First line is the description.

        More text."""
        return 1.0

    assert my_check(None) == 1.0
    (chk,) = list(reg)
    assert chk.name == "t/m/x"
    assert chk.threshold == Threshold("<", 3)
    assert chk.thresholds["y"] == Threshold(">", 0)
    assert chk.baselines == {"random": "a random guess"}
    assert chk.description == "First line is the description."


def test_select_by_task_pair_and_full_only():
    reg = _registry()
    assert [c.name for c in reg.select()] == ["toy_task/das/iia", "toy_task/probe/accuracy",
                                              "other_task/sae/mse"]
    assert len(reg.select(full=True)) == 4
    assert [c.name for c in reg.select(["toy_task/probe"])] == ["toy_task/probe/accuracy"]
    assert [c.name for c in reg.select(["other_task", "toy_task/das"])] == [
        "toy_task/das/iia", "other_task/sae/mse"]


def test_select_unknown_lists_valid_names():
    with pytest.raises(SelectionError) as err:
        _registry().select(["toy_tsak", "nothing"])
    text = str(err.value)
    assert "'toy_tsak' (did you mean 'toy_task'?)" in text and "'nothing'" in text
    assert "tasks: other_task, toy_task" in text
    assert "task/method: other_task/sae, toy_task/das, toy_task/probe" in text
