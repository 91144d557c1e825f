import pytest
import torch
from torch import nn

from mechscope.core.replay import ReplayError as TailError
from mechscope.core.replay import plan_tail
from mechscope.core.site import Site
from mechscope.zoo import build


def replay_matches(model, anchor, inputs):
    plan = plan_tail(model, anchor, inputs)
    state = plan.precompute(inputs)  # verifies the replay on unmodified activations
    idx = torch.tensor([2, 0])
    got = state.replay(state.anchor[idx], idx)
    with torch.no_grad():
        want = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    want = getattr(want, "logits", want)
    return plan, float((got - want[idx]).detach().abs().max())


def test_sequential_and_zoo_mlp_are_chains():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3)).eval()
    plan, err = replay_matches(seq, Site("1"), torch.randn(5, 4))
    assert plan.kind == "chain" and [p for p, _ in plan.modules] == ["2.0", "2.1", "3"] and err < 1e-6
    plan, err = replay_matches(seq, Site("2"), torch.randn(5, 4))  # a container's output: after its last leaf
    assert [p for p, _ in plan.modules] == ["3"] and err < 1e-6
    plan, err = replay_matches(seq, Site("2.0", io="input"), torch.randn(5, 4))
    assert [p for p, _ in plan.modules] == ["2.0", "2.1", "3"] and err < 1e-6
    mlp = build("mlp")
    plan, err = replay_matches(mlp, Site("acts.1"), torch.randn(5, 16))
    assert [p for p, _ in plan.modules] == ["layers.2", "acts.2", "readout"] and err < 1e-6


def test_zoo_transformer_replays_later_blocks_with_their_mask():
    tf = build("transformer")
    ids = torch.randint(0, 64, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the recorded mask must travel with its rows
    plan, err = replay_matches(tf, Site("blocks.0"), {"input_ids": ids, "attention_mask": mask})
    assert plan.kind == "blocks" and [p for p, _ in plan.modules] == ["blocks.1"]
    assert [p for p, _ in plan.finals] == ["ln_final", "unembed"] and err < 1e-5


def test_hugging_face_gpt2_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=16, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (3, 6))
    plan, err = replay_matches(model, Site("transformer.h.0"), {"input_ids": ids})
    assert [p for p, _ in plan.modules] == ["transformer.h.1", "transformer.h.2"] and err < 1e-5
    assert [p for p, _ in plan.finals] == ["transformer.ln_f", "lm_head"]


class Skip(nn.Module):
    """A residual connection in forward: not a chain, and no block list."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + x)


def test_a_model_that_is_neither_is_an_error_and_iia_falls_back_to_full_forwards():
    with pytest.raises(TailError, match="not a chain .* and not a block stack"):
        plan_tail(Skip(), Site("a"), torch.randn(3, 4))
    with pytest.raises(TailError, match="whole activation"):
        plan_tail(Skip(), Site("a", positions=0), torch.randn(3, 4, 4))


class Scaled(nn.Module):
    """The hand-built network with a functional op on its output: not a chain."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1.0


def test_auto_engine_falls_back_to_full_forwards_with_the_same_iia():
    import handbuilt as hb
    from test_iia import true_alignment

    from mechscope.causal.alignment import Alignment, Place
    from mechscope.causal.engine import make_engine
    from mechscope.causal.iia import iia

    model, d = Scaled(hb.network()), hb.data(["P"], n=100)
    assert make_engine(model, d, {"P": Site("net.acts.0")}).kind == "full"
    with pytest.raises(TailError):
        make_engine(model, d, {"P": Site("net.acts.0")}, kind="tail")
    place = true_alignment()["P"]
    al = Alignment({"P": Place(Site("net.acts.0"), place.featurizer, place.features)})
    assert iia(model, d, al).value == 1.0
