"""Causal scrubbing (issue 21): known answers, the batched evaluation against one forward per
tree node, the built-in worlds, and bad input."""

import pytest
import torch

from mechscope.causal import scrub as sc
from mechscope.causal.scrub import Claim, ModelGraph, Node, ScrubError, ScrubHypothesis
from mechscope.core.intervene import Replace
from mechscope.core.run import run
from mechscope.core.site import Site
from mechscope.tasks import scrub_worlds
from mechscope.zoo.mlp import MLP

A, B = Site("acts.0", features=(0,)), Site("acts.0", features=(1,))


def two_branch() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """hidden = (x0, x1) (ReLU of non-negative inputs), logits = [0, 8 (h0 - 0.5)]: the label x0 reads branch A only."""
    net = MLP((2, 2, 2))
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.eye(2))
        net.layers[0].bias.zero_()
        net.readout.weight.copy_(torch.tensor([[0.0, 0.0], [8.0, 0.0]]))
        net.readout.bias.copy_(torch.tensor([0.0, -4.0]))
    x = torch.randint(0, 2, (400, 2), generator=torch.Generator().manual_seed(0)).float()
    return net.eval(), x, x[:, 0].long()


def ce(labels):
    return lambda logits, rows: torch.nn.functional.cross_entropy(logits, labels[rows], reduction="none")


GRAPH = ModelGraph((Node("A", A), Node("B", B)), ("A", "B"))


def test_the_true_path_recovers_all_of_the_loss_and_the_wrong_one_none():
    net, x, y = two_branch()
    right = sc.scrub(net, x, GRAPH, ScrubHypothesis("A carries x0", ("A",), {"A": Claim(key=y.bool())}), ce(y))
    assert right.recovered == pytest.approx(1.0) and right.loss_scrubbed == pytest.approx(right.loss_clean)
    assert right.loss_full_scrub > right.loss_clean + 1.0 and right.n == 400
    wrong = sc.scrub(net, x, GRAPH, ScrubHypothesis("B carries x1", ("B",), {"B": Claim(key=x[:, 1].long())}), ce(y))
    assert abs(wrong.recovered) < 0.15 and wrong.interval[0] < 0 < wrong.interval[1]
    assert "recovers 1.000" in right.summary() and right.to_dict()["forwards"] == right.forwards


def test_claiming_a_coarser_feature_than_the_node_carries_loses_loss():
    net, x, y = two_branch()
    # "A carries nothing": A resampled among all inputs (a constant key) -> the same as resampling it
    none = sc.scrub(net, x, GRAPH, ScrubHypothesis("A carries nothing", ("A",), {"A": Claim(key=torch.zeros(400))}),
                    ce(y))
    assert none.recovered < 0.15


def naive_scrub_losses(model, inputs, graph, root, clean, loss):
    """One forward per tree node (the definition), on the tree the batched evaluator runs."""
    def value(tree):
        plan = []
        for parent, sub in tree.patches:
            v = value(sub) if isinstance(sub, sc._Tree) else clean[parent][sub]
            plan.append((graph.node(parent).site, Replace(v)))
        if tree.node == sc.OUTPUT:
            out, _ = run(model, inputs[tree.rows], plan)
            return loss(out, tree.rows)
        site = graph.node(tree.node).site
        return run(model, inputs[tree.rows], plan, cache=[site])[1][site]
    return value(root)


@pytest.fixture(scope="module")
def induction():
    return scrub_worlds.induction_world(n=48)


def test_batched_levels_equal_one_forward_per_tree_node(induction):
    w = induction
    h = w.hypotheses["k_composition"]
    clean, _, _ = sc._clean(w.model, w.inputs, w.graph, w.loss, 4096)
    root, nodes, leaves = sc._treeify(w.graph, h, len(w.inputs), torch.Generator().manual_seed(5))
    ev = sc._Evaluator(w.model, w.inputs, w.graph, clean, w.loss, batch_size=100)  # chunks cut across trees
    batched = ev.evaluate(root)
    naive = naive_scrub_losses(w.model, w.inputs, w.graph, root, clean, w.loss)
    torch.testing.assert_close(batched, naive, rtol=1e-4, atol=1e-5)
    # 4 levels below the root; 48 copies of each tree node, in chunks of 100 rows
    assert nodes == 25 and leaves == 44 and ev.forwards < nodes


def test_induction_k_composition_recovers_the_loss_and_q_composition_does_not(induction):
    w = induction
    assert w.detail["induction_heads"] and w.detail["previous_token_heads"]
    k = sc.scrub(w.model, w.inputs, w.graph, w.hypotheses["k_composition"], w.loss, seed=1)
    q = sc.scrub(w.model, w.inputs, w.graph, w.hypotheses["q_composition"], w.loss, seed=1)
    assert k.recovered > 0.8 and q.recovered < 0.5 and k.interval[0] > q.interval[1]
    assert k.forwards == 5 and k.naive_forwards == 70
    assert k.loss_full_scrub == pytest.approx(q.loss_full_scrub, rel=0.1)


def test_hierarchical_equality_the_causal_models_claim_beats_half_of_it():
    w = scrub_worlds.equality_world(n=600)
    full = sc.scrub(w.model, w.inputs, w.graph, w.hypotheses["wx_and_yz"], w.loss)
    half = sc.scrub(w.model, w.inputs, w.graph, w.hypotheses["wx_only"], w.loss)
    assert full.recovered > 0.95 and half.recovered < 0.5


# -- bad input ----------------------------------------------------------------------------
def test_a_hypothesis_whose_graph_is_not_a_subgraph_of_the_models():
    net, x, y = two_branch()
    with pytest.raises(ScrubError, match=r"claims the edges \['B'\] -> A, which the model graph does not have "
                                         r"\(A reads \[\] there\)"):
        sc.scrub(net, x, GRAPH, ScrubHypothesis("h", ("A",), {"A": Claim(("B",)), "B": Claim()}), ce(y))
    with pytest.raises(ScrubError, match=r"claims node 'C', which the model graph does not have"):
        sc.scrub(net, x, GRAPH, ScrubHypothesis("h", ("A",), {"A": Claim(), "C": Claim()}), ce(y))
    with pytest.raises(ScrubError, match=r"claims the edges \['C'\] -> output"):
        sc.scrub(net, x, GRAPH, ScrubHypothesis("h", ("C",), {}), ce(y))


def test_incomplete_or_stray_claims_and_bad_keys():
    net, x, y = two_branch()
    with pytest.raises(ScrubError, match=r"claims a path through 'A' but says nothing of what it carries"):
        sc.scrub(net, x, GRAPH, ScrubHypothesis("h", ("A",), {}), ce(y))
    with pytest.raises(ScrubError, match=r"claims \['B'\], which no claimed path from the output reaches"):
        sc.scrub(net, x, GRAPH, ScrubHypothesis("h", ("A",), {"A": Claim(), "B": Claim()}), ce(y))
    with pytest.raises(ScrubError, match=r"key of 'A' in 'h' has shape \[3\]; it needs one value per input of the "
                                         r"pool, \[400\]"):
        sc.scrub(net, x, GRAPH, ScrubHypothesis("h", ("A",), {"A": Claim(key=torch.zeros(3))}), ce(y))


def test_bad_graphs_pools_and_losses():
    net, x, y = two_branch()
    with pytest.raises(ScrubError, match=r"graph node 'B' reads \['C'\], which are not nodes listed before it"):
        ModelGraph((Node("B", B, ("C",)), Node("C", A)), ("B",))
    with pytest.raises(ScrubError, match=r"graph nodes 'A' and 'A2' are both at site"):
        ModelGraph((Node("A", A), Node("A2", A)), ("A",))
    with pytest.raises(ScrubError, match=r"name 'output' is reserved"):
        ModelGraph((Node("output", A),), ("output",))
    far = ModelGraph((Node("A", Site("acts.3")),), ("A",))
    with pytest.raises(ScrubError, match=r"graph node 'A' is at acts.3:output, a site MLP does not have"):
        sc.scrub(net, x, far, ScrubHypothesis("h", ("A",), {"A": Claim()}), ce(y))
    with pytest.raises(ScrubError, match=r"pool of inputs, which has 1; give at least 2"):
        sc.scrub(net, x[:1], GRAPH, ScrubHypothesis("h", ("A",), {"A": Claim()}), ce(y))
    only_b = ModelGraph((Node("B", B),), ("B",))  # the output does not read B: nothing to recover
    with pytest.raises(ScrubError, match=r"resampling every node of the graph does not raise the loss"):
        sc.scrub(net, x, only_b, ScrubHypothesis("h", ("B",), {"B": Claim()}), ce(y))


def test_a_graph_whose_edges_run_against_the_forward():
    net, x, y = two_branch()
    backwards = ModelGraph((Node("out", Site("readout")), Node("h", Site("acts.0"), ("out",))), ("h",))
    with pytest.raises(ScrubError, match=r"graph node 'h' \(acts.0:output\) reads 'out' \(readout:output\), which the "
                                         r"model computes after it"):
        sc.scrub(net, x, backwards, ScrubHypothesis("h", ("h",), {"h": Claim()}), ce(y))
    same = ModelGraph((Node("A", A), Node("B", B, ("A",))), ("B",))
    with pytest.raises(ScrubError, match=r"'B' reads 'A', but both are views of one activation \(acts.0\)"):
        sc.scrub(net, x, same, ScrubHypothesis("h", ("B",), {"B": Claim()}), ce(y))


def test_resampled_inputs_agree_on_the_key_and_are_drawn_among_all_that_do():
    key = torch.tensor([0, 1, 0, 2, 1, 0])
    rows = torch.arange(6).repeat(500)  # [3000]
    drawn = sc._agreeing(key, rows, torch.Generator().manual_seed(0))
    assert torch.equal(key[drawn], key[rows])
    for r in range(6):  # uniform over the inputs that share the key (itself included)
        mates = (key == key[r]).nonzero().flatten()
        counts = torch.bincount(drawn[rows == r], minlength=6)[mates].double()
        assert counts.sum() == 500 and counts.min() > 500 / len(mates) * 0.7
    assert torch.equal(sc._agreeing(None, rows, torch.Generator()), rows)
