import json

import pytest
import torch

from mechscope.core.site import BatchInfo, Site, SiteError, register_position_fn


def test_sites_are_values_that_compare_hash_and_print():
    a = Site("blocks.1", positions=-1, heads=[2], head_dim=16, features=range(4))
    b = Site("blocks.1", positions=-1, heads=(2,), head_dim=16, features=(0, 1, 2, 3), name="label")
    assert a == b and hash(a) == hash(b)  # name is a label, not identity
    assert len({a, b, Site("blocks.1")}) == 2
    assert str(b) == "label"
    assert "blocks.1:output" in str(a) and "heads=[2]" in str(a)
    with pytest.raises(Exception):
        a.path = "x"  # frozen


@pytest.mark.parametrize(
    "positions",
    [None, 3, -1, slice(1, 5), slice(-3, None), [0, 2], torch.tensor([[0, 1], [2, 3]]), "last"],
)
def test_json_round_trip(positions):
    s = Site("h.0.attn", io="input", element="hidden_states", positions=positions, features=[1, 5], name="x")
    text = s.to_json()
    json.loads(text)
    back = Site.from_json(text)
    assert back == s and back.name == "x"


def test_unnamed_position_function_cannot_serialise_but_named_can():
    s = Site("a", positions=lambda lengths, starts, seq: starts[:, None])
    with pytest.raises(SiteError, match="register_position_fn"):
        s.to_json()

    @register_position_fn("second_token")
    def second(lengths, starts, seq):
        return (starts + 1)[:, None]

    assert Site.from_json(Site("a", positions=second).to_json()).positions == "second_token"


def test_bad_specs_are_clear_errors():
    with pytest.raises(SiteError, match="'output' or 'input'"):
        Site("a", io="out")
    with pytest.raises(SiteError, match="head_dim"):
        Site("a", heads=[0])
    with pytest.raises(SiteError, match="repeated"):
        Site("a", features=[1, 1])
    with pytest.raises(SiteError, match="unknown named positions"):
        Site("a", positions="middle")
    with pytest.raises(SiteError, match="unknown site field"):
        Site.from_dict({"path": "a", "layer": 3})


def test_positions_count_real_tokens_under_left_and_right_padding():
    act = torch.arange(2 * 5).float().view(2, 5, 1)
    right = BatchInfo(5, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    left = BatchInfo(5, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert Site("a", positions="last").resolve_positions(act, right).tolist() == [[2], [4]]
    assert Site("a", positions="last").resolve_positions(act, left).tolist() == [[4], [4]]
    assert Site("a", positions=0).resolve_positions(act, left).tolist() == [[2], [0]]
    assert Site("a", positions=slice(-2, None)).resolve_positions(act, left).tolist() == [[3, 4], [3, 4]]
    assert Site("a", positions=slice(-2, None)).resolve_positions(act, right).tolist() == [[1, 2], [3, 4]]
    assert Site("a", positions=slice(0, 2)).resolve_positions(act, left).tolist() == [[2, 3], [0, 1]]


def test_positions_outside_the_sequence_are_errors():
    act = torch.zeros(2, 4, 3)
    with pytest.raises(SiteError, match="outside example 0, which has 4 real tokens"):
        Site("a", positions=7).resolve_positions(act, None)
    with pytest.raises(SiteError, match="outside the sequence of length 4"):
        Site("a", positions=torch.tensor([[0], [9]])).resolve_positions(act, None)
    with pytest.raises(SiteError, match="no position dimension"):
        Site("a", positions=0).resolve_positions(torch.zeros(2, 3), None)
    short = BatchInfo(4, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(SiteError, match="2 real tokens"):
        Site("a", positions=[0, 3]).resolve_positions(act, short)


def test_select_and_scatter_are_inverse_for_heads_features_positions():
    act = torch.randn(2, 5, 12)  # 3 heads of width 4
    site = Site("a", positions=[1, 3], heads=[2], head_dim=4, features=[0, 3])
    idx = site.resolve_positions(act, None)
    view = site.select(act, idx)
    assert view.shape == (2, 2, 1, 2)
    assert torch.equal(view[:, :, 0, :], act[:, [1, 3]][..., [8, 11]])
    new = site.scatter(act, idx, torch.zeros_like(view))
    changed = (new != act).nonzero()[:, 1:].unique(dim=0).tolist()
    assert {(p, f) for p, f in changed} <= {(1, 8), (1, 11), (3, 8), (3, 11)}
    assert torch.equal(new[:, [1, 3]][..., [8, 11]], torch.zeros(2, 2, 2))
    with pytest.raises(SiteError, match="heads \\[5\\] out of range"):
        Site("a", heads=[5], head_dim=4).select(act, None)
    with pytest.raises(SiteError, match="does not split"):
        Site("a", heads=[0], head_dim=5).select(act, None)
    with pytest.raises(SiteError, match="outside a last dimension"):
        Site("a", features=[12]).select(act, None)


def test_a_range_of_positions_is_the_list_it_enumerates():
    act = torch.arange(2 * 5).float().view(2, 5, 1)
    site = Site("a", positions=range(1, 4))
    assert site == Site("a", positions=[1, 2, 3])
    assert site.resolve_positions(act, None).tolist() == [[1, 2, 3], [1, 2, 3]]
    assert Site.from_json(site.to_json()) == site
    assert Site("a", positions=range(-2, 0)) == Site("a", positions=[-2, -1])
    with pytest.raises(SiteError, match="is empty"):
        Site("a", positions=range(3, 3))
