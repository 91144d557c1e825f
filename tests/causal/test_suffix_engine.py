"""The suffix engine: DAS and IIA on a causal language model intervened at fixed positions, with
only the positions from the first intervened one replayed (the base run's keys and values for
the rest): the same logits and gradients as whole forwards through hooks."""

import pytest
import torch

from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.das import FitConfig, das
from mechscope.causal.engine import FullEngine, SuffixEngine, make_engine
from mechscope.causal.iia import iia
from mechscope.core.replay import ReplayError
from mechscope.core.site import Site
from mechscope.core.structure import structure

tf = pytest.importorskip("transformers")
V, T, N = 40, 8, 12


def _models():
    return {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=V, n_positions=32)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=32)),
    }


@pytest.fixture(scope="module", params=list(_models()))
def setup(request):
    torch.manual_seed(0)
    model = _models()[request.param]().eval()
    gen = torch.Generator().manual_seed(1)
    ids = lambda: torch.randint(0, V, (N, T), generator=gen)  # noqa: E731
    base, source = ids(), ids()
    data = CounterfactualData(variables=("X",), base={"input_ids": base, "attention_mask": torch.ones_like(base)},
                              sources={"X": {"input_ids": source, "attention_mask": torch.ones_like(source)}},
                              labels=torch.randint(0, 5, (N,), generator=gen),
                              base_labels=torch.zeros(N, dtype=torch.long),
                              source_labels={"X": torch.zeros(N, dtype=torch.long)},
                              active={"X": torch.ones(N, dtype=torch.bool)})
    block = structure(model).blocks[1].path
    return model, data, block


def readout(logits):
    return logits[:, -1, :5]


def _mix(v, base, source):  # swap the first 8 features: a fixed, non-trivial interchange
    return torch.cat([source[..., :8], base[..., 8:]], -1)


@pytest.mark.parametrize("positions", [(T - 1,), (T - 3, T - 1)])
def test_logits_equal_whole_forwards(setup, positions):
    model, data, block = setup
    site = Site(block, positions=positions)
    idx = torch.tensor([5, 0, 7, 3])
    fast = SuffixEngine(model, data, {"X": site}, readout)
    slow = FullEngine(model, data, {"X": site}, readout)
    with torch.no_grad():
        got, want = fast.logits(idx, _mix), slow.logits(idx, _mix)
    assert got.shape == want.shape == (4, 5)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.base_views(site, idx), slow.base_views(site, idx))


def test_gradients_reach_the_alignment_and_training_matches(setup):
    model, data, block = setup
    site = Site(block, positions=(T - 1,))
    cfg = dict(epochs=2, batch_size=6, lr=1e-2, seed=0)
    a_fast, r_fast = das(model, data, site, 2, readout, cfg=FitConfig(engine="suffix", **cfg))
    a_slow, r_slow = das(model, data, site, 2, readout, cfg=FitConfig(engine="full", **cfg))
    assert r_fast.engine == "suffix" and r_slow.engine == "full"
    assert torch.allclose(torch.tensor(r_fast.losses), torch.tensor(r_slow.losses), atol=1e-4)
    fast = iia(model, data, a_fast, readout, engine="suffix", filter_correct=False)
    assert fast.engine == "suffix"
    assert fast.value == iia(model, data, a_slow, readout, engine="full", filter_correct=False).value


def test_refusals_say_why(setup):
    model, data, block = setup
    with pytest.raises(ReplayError, match="fixed positions"):
        SuffixEngine(model, data, {"X": Site(block)}, readout)
    with pytest.raises(ReplayError, match="not a block's input or output"):
        SuffixEngine(model, data, {"X": Site(f"{block}.mlp", positions=(T - 1,))}, readout)
    assert make_engine(model, data, {"X": Site(block, positions=(T - 1,))}, readout, "suffix").kind == "suffix"
