"""The grokking phase detector on synthetic histories (one with the three phases, several
without) and on the shipped training histories."""

import math

import pytest

from mechscope.core.checkpoint import load_json
from mechscope.tasks import grokking
from mechscope.tasks import grokking_phases as gp

P = 113
CHANCE = math.log(P)
STEPS = list(range(0, 10_001, 250))  # 41 snapshots


def history(train, test, excluded):
    """A synthetic history: each loss a function of the step."""
    return {"step": STEPS, "train_loss": [train(s) for s in STEPS], "test_loss": [test(s) for s in STEPS],
            "excluded_loss": [excluded(s) for s in STEPS]}


def fall(start, end, at, width):
    """Log-linear from ``start`` to ``end`` between steps ``at`` and ``at + width``."""
    def f(s):
        t = min(max((s - at) / width, 0.0), 1.0)
        return math.exp(math.log(start) + t * (math.log(end) - math.log(start)))
    return f


def piecewise(*pieces):
    """``pieces``: (until_step, function) in order; the last applies to the end."""
    def f(s):
        return next((fn(s) for until, fn in pieces if s <= until), pieces[-1][1](s))
    return f


# memorised by 1000; excluded loss rises from 1000 to 6000; test loss crosses chance at 6250 and
# is two decades below it at 6500 (cleanup 250 steps, circuit formation 5250)
TRAIN = piecewise((1000, fall(CHANCE, 1e-6, 0, 1000)), (10_000, fall(1e-6, 3e-7, 1000, 9000)))
EXCLUDED = piecewise((1000, fall(CHANCE, 1e-4, 0, 1000)), (6000, fall(1e-4, 8.0, 1000, 5000)),
                     (10_000, lambda s: 8.0))
TEST = piecewise((1000, fall(CHANCE + 0.01, 20.0, 0, 1000)), (6000, fall(20.0, CHANCE + 0.1, 1000, 5000)),
                 (10_000, fall(CHANCE + 0.1, 1e-5, 6000, 1000)))


def test_three_phases_in_order():
    found = gp.detect(**history(TRAIN, TEST, EXCLUDED), p=P)
    assert found["found"] == 3 and found["why"] == []
    assert found["boundaries"] == {"memorisation_end": 1000, "circuit_formation_end": 6250, "cleanup_end": 6500}
    assert found["phases"] == {"memorisation": [0, 1000], "circuit_formation": [1000, 6250],
                               "cleanup": [6250, 6500]}


def test_a_model_that_never_trains_has_no_phase():
    flat = gp.untrained_series(history(TRAIN, TEST, EXCLUDED))
    assert flat["step"] == STEPS and set(flat["train_loss"]) == {CHANCE}
    found = gp.detect_series(flat, P)
    assert found["found"] == 0 and "never falls below its first value" in found["why"][0]


def test_memorisation_without_generalisation_is_one_phase():
    """No weight decay: the model memorises (excluded loss falls with the train loss) and the
    test loss never comes down."""
    found = gp.detect(**history(TRAIN, lambda s: 20.0, fall(CHANCE, 1e-6, 0, 1000)), p=P)
    assert found["found"] == 1 and found["phases"] == {"memorisation": [0, 1000]}
    assert "never falls below chance" in found["why"][0]


def test_generalising_without_memorising_is_no_phase():
    """Train and test loss fall together; the excluded loss never gets low (the key frequencies
    carry the fit from the start)."""
    both = fall(CHANCE, 1e-6, 0, 3000)
    found = gp.detect(**history(both, both, lambda s: CHANCE + 2.0), p=P)
    assert found["found"] == 0 and "never falls below its first value" in found["why"][0]


def test_test_loss_falling_below_chance_without_the_circuit_is_one_phase():
    """The test loss comes down but the excluded loss stays low: whatever generalised, it was
    not the key-frequency circuit."""
    found = gp.detect(**history(TRAIN, TEST, piecewise((1000, fall(CHANCE, 1e-4, 0, 1000)),
                                                       (10_000, lambda s: 2e-4))), p=P)
    assert found["found"] == 1 and "excluded loss x2" in found["why"][0]


def test_train_loss_that_moves_is_not_circuit_formation():
    moving = piecewise((1000, fall(CHANCE, 1e-6, 0, 1000)), (10_000, fall(1e-6, 1e-3, 1000, 5000)))
    found = gp.detect(**history(moving, TEST, EXCLUDED), p=P)
    assert found["found"] == 1 and "train loss moved" in found["why"][0]


def test_slow_cleanup_is_two_phases():
    """The test loss takes longer to fall from chance than the circuit took to form."""
    test = piecewise((1000, fall(CHANCE + 0.01, 20.0, 0, 1000)), (3000, fall(20.0, CHANCE + 0.1, 1000, 2000)),
                     (10_000, fall(CHANCE + 0.1, 1e-3, 3000, 6000)))
    excluded = piecewise((1000, fall(CHANCE, 1e-4, 0, 1000)), (10_000, fall(1e-4, 8.0, 1000, 2000)))
    found = gp.detect(**history(TRAIN, test, excluded), p=P)
    assert found["found"] == 2 and set(found["phases"]) == {"memorisation", "circuit_formation"}
    assert "not fewer than circuit formation" in found["why"][0]


def test_no_excluded_loss_and_bad_histories():
    below = gp.detect(**history(TRAIN, lambda s: 1.0, EXCLUDED), p=P)
    assert below["found"] == 0 and "below chance from the start" in below["why"][0]
    assert gp.detect_series({"step": [0, 1], "train_loss": [1.0, 0.5], "test_loss": [1.0, 1.0]}, P)["found"] == 0
    with pytest.raises(ValueError, match="equal-length"):
        gp.detect([0, 1], [1.0], [1.0, 1.0], [1.0, 1.0], P)
    with pytest.raises(ValueError, match="finite and positive"):
        gp.detect([0, 1], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], P)
    with pytest.raises(ValueError, match="steps must increase"):
        gp.detect([0, 0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], P)


def test_shipped_histories():
    """p = 113 (the registered run) shows the three phases; the p = 53 test variant, trained on
    half the pairs, fits them with the key frequencies from early on (its excluded loss never
    falls below 1.6), so no memorisation phase is found."""
    record = load_json(grokking.HISTORY, "grokking training history")
    found = gp.detect_series(record["progress"], record["config"]["p"])
    assert found["found"] == 3
    assert found["boundaries"] == {"memorisation_end": 1200, "circuit_formation_end": 4800, "cleanup_end": 5500}
    quick = load_json(grokking.CHECKPOINT.with_name("grokking_p53.json"), "grokking training history")
    found = gp.detect_series(quick["progress"], quick["config"]["p"])
    assert found["found"] == 0 and "excluded 1.65" in found["why"][0]
