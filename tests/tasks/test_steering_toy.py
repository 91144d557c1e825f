"""The steering toy: its language, and the shipped model's planted behaviour."""

import pytest
import torch

from mechscope.core.site import Site
from mechscope.core.collect import activations
from mechscope.steer.apply import ablate, steer
from mechscope.steer.directions import cosine, diff_of_means
from mechscope.tasks import steering_toy as st


def test_language():
    b = st.sample(500, seed=0)
    content = b.ids[:, 1:st.LENGTH + 1]
    assert bool((b.ids[:, 0] == st.BOS).all()) and bool((b.ids[:, st.QUERY_POS] == st.Q).all())
    marked = content >= st.N_SYMBOLS
    assert torch.equal(marked.any(1), b.concept)  # the concept is exactly "some token is marked"
    assert bool((marked.sum(1)[b.concept] <= 3).all())
    assert torch.equal(content % st.N_SYMBOLS, b.symbols)
    t = st.targets(b)
    assert torch.equal(t[:, st.QUERY_POS], torch.where(b.concept, st.R, st.N))
    assert torch.equal(t[:, :st.LENGTH], b.symbols)


def test_pairs_differ_only_by_marks():
    marked, plain = st.pairs(100, seed=1)
    content = slice(1, st.LENGTH + 1)
    assert torch.equal(marked[:, content] % st.N_SYMBOLS, plain[:, content])  # same symbols
    assert bool((plain[:, content] < st.N_SYMBOLS).all())  # plain has no marks
    assert bool(((marked != plain).sum(1) >= 1).all()) and bool(((marked != plain).sum(1) <= 3).all())


def test_training_runs_and_lowers_the_loss():
    losses = []
    st.train(st.Recipe(steps=40, batch=32), log=lambda s: losses.append(float(s.split()[-1])))
    assert losses[-1] < losses[0]


@pytest.fixture(scope="module")
def model():
    return st.load()


def test_shipped_model_emits_r_exactly_with_the_concept(model):
    with torch.no_grad():
        assert st.r_rate(model(st.sample(300, 5, concept=True).ids))["argmax_r"] == 1.0
        assert st.r_rate(model(st.sample(300, 6, concept=False).ids))["argmax_r"] == 0.0


def test_difference_of_means_matches_the_planted_direction(model):
    site = Site("blocks.1", positions=[st.QUERY_POS])
    dm = diff_of_means(activations(model, st.sample(300, 1, concept=True).ids, site),
                       activations(model, st.sample(300, 2, concept=False).ids, site))
    assert cosine(dm, st.concept_direction(model, site, n=300)) > 0.9
    with torch.no_grad():  # and it is causal: ablating removes R, adding induces it
        assert st.r_rate(ablate(model, st.sample(300, 3, concept=True).ids, dm))["argmax_r"] < 0.05
        assert st.r_rate(steer(model, st.sample(300, 4, concept=False).ids, dm, Site("blocks.1"), 1.0))["argmax_r"] > 0.9


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="mechscope train steering_toy"):
        st.load(tmp_path / "nope.safetensors")
