"""The suffix replay on Hugging Face models (the model's own forward on positions >= p with
its KV cache cut at p) and on any model whose blocks offer ``forward_from``: the numbers of
one full forward per cell, the path recorded, the user's structure overrides respected, and
every refusal said."""

import pytest
import torch
from torch import nn

from mechscope.circuits.cells import head_cells, resid_cells
from mechscope.circuits.patching import patch_cells, patch_one_by_one
from mechscope.core.replay import plan_tail
from mechscope.core.site import Site
from mechscope.core.structure import structure
from mechscope.core.suffix import plan_suffix
from mechscope.zoo import build

tf = pytest.importorskip("transformers")
V, T = 50, 10


def _models():
    return {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=48, vocab_size=V,
                                                            max_position_embeddings=64)),
        # sliding-window layers with a window (4) shorter than the sequence, and post-norms
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64)),
    }


@pytest.fixture(scope="module", params=list(_models()))
def hf(request):
    torch.manual_seed(0)
    model = _models()[request.param]().eval()
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (2, T), generator=gen), torch.randint(0, V, (2, T), generator=gen)
    target = torch.tensor([3, 4])

    def metric(logits):
        return logits[:, -1].gather(1, target[:, None]).mean()
    return model, clean, corrupt, metric


def _check(model, clean, corrupt, cells, metric, **kw):
    fast = patch_cells(model, clean, corrupt, cells, metric, **kw)
    ref = patch_one_by_one(model, clean, corrupt, cells, metric, **{k: v for k, v in kw.items() if k != "cells_per_forward"})
    assert torch.allclose(fast.values, ref.values, atol=1e-5), (fast.values - ref.values).abs().max()
    assert fast.clean == pytest.approx(ref.clean, abs=1e-6) and fast.corrupt == pytest.approx(ref.corrupt, abs=1e-6)
    return fast


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("readout", [None, [-1], [-1, 2]])
def test_kv_suffix_equals_one_forward_per_cell(hf, direction, readout):
    model, clean, corrupt, metric = hf
    n = structure(model).n_layers
    outs = [c for c in resid_cells(model, positions=[0, 5, T - 1])]
    post = [type(c)(Site(c.site.path, element=structure(model).element(c.site.path)), c.position) for c in outs]
    heads = head_cells(model, positions=[0, 4, T - 1])  # head cells replay their block from the position on too
    cells = resid_cells(model, positions=range(T)) + post + heads
    for kw in ({}, {"cells_per_forward": 3}):
        got = _check(model, clean, corrupt, cells, metric, direction=direction, readout=readout, **kw)
        assert got.extra["paths"] == {"suffix": n * T + len(post) + len(heads), "tail": 0, "forwards": 0}
        assert "fallback" not in got.extra
        assert (got.values[-len(heads):] - got.values[-len(heads):].mean()).abs().max() > 1e-5  # heads differ


def test_padding_masks_and_logits_to_keep(hf):
    model, clean, corrupt, metric = hf
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    cells = resid_cells(model, positions=range(T)) + head_cells(model, positions=[4, T - 1])
    for extra in ({"attention_mask": mask}, {"logits_to_keep": 1}, {"attention_mask": mask, "logits_to_keep": 2}):
        c, k = {"input_ids": clean, **extra}, {"input_ids": corrupt, **extra}
        for readout in (None, [-1]):
            got = _check(model, c, k, cells, metric, readout=readout)
            assert got.extra["paths"]["suffix"] == len(cells)


def test_a_tail_with_logits_to_keep_verifies():
    """The model returns the kept positions only: the tail replays the same ones (it used to
    fail its check against the model's logits and fall back to whole forwards unsaid)."""
    torch.manual_seed(0)
    model = _models()["llama"]().eval()
    ids = torch.randint(0, V, (2, T))
    inputs = {"input_ids": ids, "logits_to_keep": 1, "use_cache": False}
    state = plan_tail(model, Site("model.layers.1", io="input"), inputs).precompute(inputs)
    assert state.keep == (T - 1,) and state.replay(state.anchor, torch.arange(2)).shape == (2, 1, V)


def test_hooks_on_blocks_run_in_the_replay_or_it_is_refused_and_said(hf):
    """The replay is the model's own forward, so a hook on a block runs in it too (the same
    numbers); a hook whose effect depends on the whole sequence cannot be replayed on a
    suffix: refused by the check, said, and the numbers are still the same."""
    model, clean, corrupt, metric = hf
    cells = resid_cells(model, positions=range(0, T, 3))
    cells += [type(c)(Site(c.site.path, element=structure(model).element(c.site.path)), c.position) for c in cells[-2:]]
    block = model.get_submodule(structure(model).blocks[-1].path)
    handle = block.register_forward_hook(lambda m, args, out: out * 1.5)
    try:
        got = _check(model, clean, corrupt, cells, metric, readout=[-1])
    finally:
        handle.remove()
    assert got.extra["paths"]["suffix"] == len(cells)
    handle = block.register_forward_hook(lambda m, args, out: out + out.mean(1, keepdim=True))
    try:
        ref = patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1])
        with pytest.warns(UserWarning, match="did not use the suffix replay"):
            got = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
    finally:
        handle.remove()
    assert torch.allclose(got.values, ref.values, atol=1e-5)
    assert got.extra["paths"]["suffix"] == 0 and "differs from the model's own logits" in got.extra["fallback"]["suffix"]


class _Unembed(nn.Module):
    """An unembedding that is not an nn.Linear (as TransformerLens' is): detection misses it."""

    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.randn(d, vocab) / d ** 0.5)

    def forward(self, x):
        return x @ self.W_U


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        zoo = build("transformer", seed=3, n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, vocab=V, n_ctx=16)
        self.embed, self.pos, self.blocks, self.ln_final = zoo.embed, zoo.pos_embed, zoo.blocks, zoo.ln_final
        self.unembed = _Unembed(32, V)

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def test_structure_overrides_reach_the_replay():
    """The unembedding named by the user (structure(model, unembed=...)) is the one replayed."""
    model = _Custom().eval()
    gen = torch.Generator().manual_seed(1)
    clean, corrupt = torch.randint(0, V, (2, T), generator=gen), torch.randint(0, V, (2, T), generator=gen)

    def metric(logits):
        return logits[:, -1, 7].mean()
    cells = resid_cells(model, positions=range(T))
    if structure(model).unembed is None:
        based = plan_suffix(model, corrupt, [cells[0].site], [(0, cells[0].site)], [-1])
        assert based.suffix is None and "unembed" in based.reason
    structure(model, unembed="unembed")
    got = _check(model, clean, corrupt, cells, metric, readout=[-1])
    assert got.extra["paths"]["suffix"] == len(cells)
    assert plan_suffix(model, corrupt, [cells[0].site], [(0, cells[0].site)], [-1]).suffix.finals[-1] is model.unembed
