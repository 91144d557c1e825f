import pytest
import torch

from mechscope.causal.model import CausalModel, CausalModelError, Variable


def equality_model(**kw):
    return CausalModel([
        Variable("W"), Variable("X"), Variable("Y"), Variable("Z"),
        Variable("WX", (False, True), ("W", "X"), lambda a, b: a == b),
        Variable("YZ", (False, True), ("Y", "Z"), lambda a, b: a == b),
        Variable("O", (False, True), ("WX", "YZ"), lambda a, b: a == b),
    ], output="O", **kw)


def test_solves_forward_in_topological_order():
    m = equality_model()
    values = m.solve({"W": 1, "X": 1, "Y": 2, "Z": 3})
    assert values == {"W": 1, "X": 1, "Y": 2, "Z": 3, "WX": True, "YZ": False, "O": False}
    assert m.order.index("WX") > m.order.index("W") and m.order[-1] == "O"
    assert m.inputs == ("W", "X", "Y", "Z")


def test_intervention_holds_a_variable_whatever_its_parents():
    m = equality_model()
    assert m.run({"W": 1, "X": 1, "Y": 2, "Z": 3}, {"YZ": True}) is True
    assert m.run({"W": 1, "X": 2, "Y": 2, "Z": 3}, {"WX": True}) is False


def test_interchange_takes_each_variable_from_its_own_source():
    m = equality_model()
    base = {"W": 1, "X": 2, "Y": 3, "Z": 4}  # WX F, YZ F -> O True
    s_wx = {"W": 5, "X": 5, "Y": 0, "Z": 1}  # WX True
    s_yz = {"W": 0, "X": 1, "Y": 7, "Z": 7}  # YZ True
    assert m.interchange(base, {"WX": s_wx})["O"] is False  # WX<-T, YZ F
    assert m.interchange(base, {"WX": s_wx, "YZ": s_yz})["O"] is True  # T == T
    assert m.interchange(base, {"YZ": base})["O"] is True  # a source equal to the base changes nothing


def test_batched_tensors_solve_vectorised():
    m = equality_model()
    w = torch.tensor([1, 1, 2]); x = torch.tensor([1, 2, 2])
    out = m.solve({"W": w, "X": x, "Y": torch.tensor([0, 0, 0]), "Z": torch.tensor([0, 1, 0])})
    assert out["WX"].tolist() == [True, False, True]
    assert out["O"].tolist() == [True, True, True]


def test_per_example_mechanisms_loop_over_the_batch():
    m = CausalModel([Variable("A", (0, 1)), Variable("B", (0, 1)),
                     Variable("O", (0, 1), ("A", "B"), lambda a, b: int(bool(a) and bool(b)))],  # scalars only
                    output="O", vectorized=False)
    out = m.solve({"A": torch.tensor([0, 1, 1]), "B": torch.tensor([1, 1, 0])})
    assert out["O"].tolist() == [0, 1, 0]


def test_cycle_is_an_error_naming_the_variables():
    with pytest.raises(CausalModelError, match=r"cycle through \['P', 'Q'\]"):
        CausalModel([Variable("A"), Variable("P", None, ("A", "Q"), lambda a, q: a),
                     Variable("Q", None, ("P",), lambda p: p)], output="Q")


def test_mechanism_value_outside_its_set_is_an_error():
    m = CausalModel([Variable("A", (0, 1)), Variable("B", (0, 1), ("A",), lambda a: a + 1)], output="B")
    assert m.run({"A": 0}) == 1
    with pytest.raises(CausalModelError, match=r"variable 'B': value 2 returned by its mechanism is outside its value set \[0, 1\]"):
        m.run({"A": 1})
    with pytest.raises(CausalModelError, match=r"value\(s\) \[2\] returned by its mechanism"):
        m.run({"A": torch.tensor([0, 1])})
    with pytest.raises(CausalModelError, match="given as input"):
        m.run({"A": 5})


def test_intervention_on_unknown_variable_is_an_error():
    m = equality_model()
    with pytest.raises(CausalModelError, match=r"an intervention names unknown variable 'WY' \(did you mean"):
        m.run({"W": 1, "X": 1, "Y": 1, "Z": 1}, {"WY": True})
    with pytest.raises(CausalModelError, match="unknown variable 'Q'"):
        m.interchange({"W": 1, "X": 1, "Y": 1, "Z": 1}, {"Q": {}})


def test_malformed_models_are_errors():
    with pytest.raises(CausalModelError, match="unknown parent 'C'"):
        CausalModel([Variable("A"), Variable("B", None, ("C",), lambda c: c)], output="B")
    with pytest.raises(CausalModelError, match="output 'Z' is not a variable"):
        CausalModel([Variable("A")], output="Z")
    with pytest.raises(CausalModelError, match="no mechanism"):
        Variable("B", None, ("A",))
    with pytest.raises(CausalModelError, match="unique"):
        CausalModel([Variable("A"), Variable("A")], output="A")
    with pytest.raises(CausalModelError, match=r"inputs \['Z'\] are missing"):
        equality_model().solve({"W": 1, "X": 1, "Y": 1})
