"""The structure layer on 16 Hugging Face families (issue 15), plus five block variants.

Every family is a tiny random model from ``hf_families`` (no download) whose norm weights
and biases were moved off their init, so a read on the wrong side of a norm is caught.
What is checked, per family:

- the residual-stream identity ``resid_post(l) - resid_pre(l) == attn_out(l) + mlp_out(l)``
  (Gemma 2/3 and OLMo 2 normalise a sublayer's output before adding it; Falcon changes
  the MLP output in place; OPT's MLP runs on flattened rows), and that the aliases sit
  where the transformers source says;
- every alias view is ``[batch, pos, ...]``; attention patterns are causal, sum to 1 and
  honour sliding windows;
- directional ablation keeps the direction out of the stream at every layer and
  position, and the weight edit equals it, or refuses where no weight edit can
  (sandwich norms);
- head scores and the head-ablation sweep run on every family;
- with nothing intervened, a run is bit-identical to the model's own forward, and
  leaves no hook behind.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")

import hf_families as H  # noqa: E402  (tests/core is on sys.path: tests/conftest.py)

from mechscope.circuits.heads import attention_patterns, head_ablation_sweep, head_scores  # noqa: E402
from mechscope.core.aliases import attn_pattern  # noqa: E402
from mechscope.core.models import (  # noqa: E402
    StructureError,
    attn_out,
    embed,
    head_out,
    mlp_hidden,
    mlp_out,
    resid_post,
    resid_pre,
    structure,
    unembed,
)
from mechscope.core.run import cache, run  # noqa: E402
from mechscope.core.site import Site  # noqa: E402
from mechscope.steer.apply import SteeringError, ablate, ablation_interventions  # noqa: E402
from mechscope.steer.orthogonalize import orthogonalize_weights  # noqa: E402

IDS = H.IDS
INPUTS = {"input_ids": IDS}
B, T = IDS.shape
BUILDERS = {**H.FAMILIES, **H.EXTRA}
MAY_REFUSE = {"opt_project"}  # a weight edit is possible but not required (see the weight-edit test)


@dataclass
class Fam:
    name: str
    model: nn.Module
    sizes: dict
    truth: dict

    @property
    def n_layers(self) -> int:
        return self.sizes["n_layers"]

    def block(self, layer: int) -> str:
        return f"{self.truth['blocks']}.{layer}"


@pytest.fixture(scope="module", params=list(BUILDERS))
def fam(request) -> Fam:
    model = BUILDERS[request.param]()
    return Fam(request.param, model, H.sizes(model), H.TRUTH[request.param])


def _direction(d: int, seed: int = 7) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


@contextmanager
def _quiet():
    """Reading a pattern may switch a model to eager attention, with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- where things are


def test_sizes(fam):
    s = structure(fam.model)
    want = fam.sizes
    got = dict(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
               head_dim=s.head_dim, d_mlp=s.d_mlp)
    assert got == {k: want[k] for k in got}


def test_aliases_sit_where_the_source_says(fam):
    t = fam.truth
    assert embed(fam.model).path == t["embed"]
    assert unembed(fam.model).path == t["unembed"]
    for layer in range(fam.n_layers):
        blk = fam.block(layer)
        assert resid_pre(fam.model, layer).path == blk
        assert resid_post(fam.model, layer).path == blk
        rel = {name: site.path[len(blk) + 1:] if site.path.startswith(blk + ".") else site.path
               for name, site in (("attn_out", attn_out(fam.model, layer)), ("mlp_out", mlp_out(fam.model, layer)))}
        assert rel["attn_out"] in t["attn_write"], rel
        assert rel["mlp_out"] in t["mlp_write"], rel
        h = head_out(fam.model, layer, 0)
        assert (h.path, h.io) == (f"{blk}.{t['attn_out_proj']}", "input")
        m = mlp_hidden(fam.model, layer)
        assert (m.path, m.io) == (f"{blk}.{t['mlp_down_proj']}", "input")


# --------------------------------------------------------------------------- (a) the residual identity


def test_resid_post_minus_resid_pre_is_attn_out_plus_mlp_out(fam):
    model, L, d = fam.model, fam.n_layers, fam.sizes["d_model"]
    fns = (resid_pre, resid_post, attn_out, mlp_out)
    sites = {(fn.__name__, layer): fn(model, layer) for layer in range(L) for fn in fns}
    acts = cache(model, INPUTS, list(sites.values()), stop_when_cached=False)
    a = {key: acts[site] for key, site in sites.items()}
    hs = H.hidden_states(model)
    for layer in range(L):
        for fn in fns:
            assert tuple(a[fn.__name__, layer].shape) == (B, T, d), (fn.__name__, layer)
        pre, post = a["resid_pre", layer].double(), a["resid_post", layer].double()
        writes = a["attn_out", layer].double() + a["mlp_out", layer].double()
        scale = float(post.abs().max())
        assert torch.allclose(post - pre, writes, rtol=0, atol=1e-5 * scale), \
            f"layer {layer}: max |(post - pre) - (attn + mlp)| = {float((post - pre - writes).abs().max()):.3g}"
        # the stream the model itself reports
        assert torch.equal(a["resid_pre", layer], hs[layer])
        if layer + 1 < L:
            assert torch.equal(a["resid_post", layer], a["resid_pre", layer + 1])
    with torch.no_grad():
        last = model.get_submodule(fam.truth["final_norm"])(a["resid_post", L - 1])
        project_out = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
        if project_out is not None:  # OPT-350m style: the model reports the stream after project_out
            last = project_out(last)
        assert torch.allclose(last, hs[-1], atol=1e-6)


# --------------------------------------------------------------------------- (b) views are [batch, pos, ...]


def _windows(model: nn.Module) -> dict[int, int]:
    """Layers with a sliding window, and its width (keys q - w + 1 .. q)."""
    c = model.config
    w = getattr(c, "sliding_window", None)
    if not w or (hasattr(c, "use_sliding_window") and not c.use_sliding_window):
        return {}
    types = getattr(c, "layer_types", None)
    if types is None:
        return {layer: w for layer in range(c.num_hidden_layers)}
    return {layer: w for layer, kind in enumerate(types) if kind == "sliding_attention"}


def test_every_alias_view_is_batch_pos_first(fam):
    model, s = fam.model, fam.sizes
    L, d, n_heads = fam.n_layers, s["d_model"], s["n_heads"]
    with _quiet():
        sites = {"embed": embed(model), "unembed": unembed(model)}
        for layer in range(L):
            for fn in (resid_pre, resid_post, attn_out, mlp_out, mlp_hidden, attn_pattern):
                sites[fn.__name__, layer] = fn(model, layer)
            for h in range(n_heads):
                sites["head_out", layer, h] = head_out(model, layer, h)
            sites["o_in", layer] = Site(f"{fam.block(layer)}.{fam.truth['attn_out_proj']}", io="input")
        acts = cache(model, INPUTS, list(sites.values()), stop_when_cached=False)
    a = {key: acts[site] for key, site in sites.items()}
    assert tuple(a["embed"].shape) == (B, T, model.get_input_embeddings().embedding_dim)
    assert tuple(a["unembed"].shape) == (B, T, s["vocab"])
    windows = _windows(model)
    for layer in range(L):
        for name in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            assert tuple(a[name, layer].shape) == (B, T, d), (name, layer)
        assert tuple(a["mlp_hidden", layer].shape) == (B, T, s["d_mlp"])
        heads = [a["head_out", layer, h] for h in range(n_heads)]
        assert all(tuple(x.shape) == (B, T, 1, s["head_dim"]) for x in heads)
        # the heads, side by side, are the output projection's input
        assert torch.equal(torch.cat(heads, dim=2).flatten(2), a["o_in", layer].reshape(B, T, -1))
        p = a["attn_pattern", layer]
        assert tuple(p.shape) == (B, n_heads, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(B, n_heads, T), atol=1e-5)
        assert float(p.triu(1).abs().max()) == 0.0, "attention to later positions"
        assert float(p.min()) >= 0.0
        if layer in windows:
            assert float(p.tril(-windows[layer]).abs().max()) == 0.0, f"layer {layer} attends past its window"


# --------------------------------------------------------------------------- (c) directional ablation


def test_directional_ablation_keeps_the_direction_out_of_the_stream(fam):
    model, L = fam.model, fam.n_layers
    v = _direction(fam.sizes["d_model"])
    sites = [fn(model, layer) for layer in range(L) for fn in (resid_pre, resid_post)]
    out, acts = run(model, INPUTS, ablation_interventions(model, v), cache=sites)
    for site in sites:
        x = acts[site].double()
        assert tuple(x.shape) == (B, T, fam.sizes["d_model"])
        cos = (x @ v.double()).abs() / x.norm(dim=-1)
        assert float(cos.max()) <= 1e-5, f"{site}: |<x, v>| / |x| up to {float(cos.max()):.3g}"
    with torch.no_grad():
        assert not torch.allclose(out.logits, model(input_ids=IDS).logits), "the ablation changed nothing"


# --------------------------------------------------------------------------- (d) weight edit


def test_weight_edit_equals_hooked_ablation_or_refuses(fam):
    model = fam.model
    v = _direction(fam.sizes["d_model"], seed=11)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    if fam.name in H.SANDWICH:
        with pytest.raises(StructureError, match="ablate"):
            orthogonalize_weights(model, v)
    else:
        try:
            edited = orthogonalize_weights(model, v)
        except StructureError as e:
            # OPT-350m's project_in sits between the token embedding and block 0: editing
            # project_in (and embed_positions) would do, but refusing is allowed if it says how
            if fam.name not in MAY_REFUSE or "ablate" not in str(e):
                raise
            return
        assert edited is not model
        with torch.no_grad():
            got = edited(input_ids=IDS).logits
        want = ablate(model, INPUTS, v).logits
        assert torch.allclose(got, want, atol=1e-4), f"max diff {float((got - want).abs().max()):.3g}"
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before), "the original model was changed"


# --------------------------------------------------------------------------- (e) head tools


def test_head_scores_and_sweep(fam):
    model, L, n_heads = fam.model, fam.n_layers, fam.sizes["n_heads"]
    period = 5
    seq = torch.randint(3, H.VOCAB_MIN, (2, period), generator=torch.Generator().manual_seed(3))
    tokens = torch.cat([torch.full((2, 1), H.BOS), seq, seq], dim=1)
    with _quiet():
        scores = head_scores(model, tokens, period)
        patterns = attention_patterns(model, INPUTS)
    for value in scores.values():
        assert tuple(value.shape) == (L, n_heads)
        assert bool(torch.isfinite(value).all())
        assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0 + 1e-6
    assert tuple(patterns.shape) == (L, B, n_heads, T, T)

    values = head_ablation_sweep(model, INPUTS, lambda logits: logits[:, -1, 5].mean()).values
    assert tuple(values.shape) == (L, n_heads)
    assert bool(torch.isfinite(values).all())
    with torch.no_grad():
        base = float(model(input_ids=IDS).logits[:, -1, 5].mean())
    assert float((values - base).abs().max()) > 0, "ablating a head never changed the metric"


# --------------------------------------------------------------------------- (f) nothing intervened


def test_plain_run_is_bit_identical_and_leaves_no_hooks(fam):
    model = fam.model
    hooks = _hook_count(model)
    out, _ = run(model, INPUTS)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    assert torch.equal(out.logits, want)
    # reading (not writing) every alias leaves the output alone too
    sites = [fn(model, layer) for layer in range(fam.n_layers)
             for fn in (resid_pre, resid_post, attn_out, mlp_out, mlp_hidden)]
    sites += [head_out(model, 0, 0), embed(model), unembed(model)]
    out, acts = run(model, INPUTS, cache=sites)
    assert torch.equal(out.logits, want)
    logits = acts[unembed(model)]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2: lm_head's output is capped after it, in the CausalLM's forward
        logits = torch.tanh(logits / cap) * cap
    assert torch.equal(logits, want)
    assert _hook_count(model) == hooks, "a hook was left on the model"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_unknown_write_path_is_a_structure_error(name):
    model = H.FAMILIES[name]()  # fresh: an override replaces the model's cached structure
    with pytest.raises(StructureError):
        structure(model, attn_write="nope")


def test_writes_that_do_not_add_up_or_never_run_are_refused():
    model = H.FAMILIES["gemma2"]()
    # the attention module's own output is not what a Gemma 2 block adds (the post-norm's is)
    with pytest.raises(StructureError, match="do not add up: .* differ by"):
        structure(model, attn_write="self_attn", mlp_write="mlp")
    opt = H.FAMILIES["opt"]()
    with pytest.raises(StructureError, match="never runs"):  # OPT's CausalLM calls model.decoder, never model
        structure(opt, blocks="model.decoder.layers", attn_write="self_attn", mlp_write="fc2", final_norm="model")
    s = structure(opt, attn_write="self_attn", mlp_write="fc2", refresh=True)  # the right ones are accepted
    assert s.blocks[1].mlp_write.flat and s.blocks[1].mlp_write.path == "model.decoder.layers.1.fc2"


def test_a_pattern_from_a_model_that_cannot_switch_is_a_clear_error():
    model = H.FAMILIES["llama"]()
    model.set_attn_implementation("sdpa")
    site = attn_pattern(structure(model), 0)  # from the structure alone: nothing is switched
    with pytest.raises(Exception, match="eager"):
        cache(model, INPUTS, [site])
    model.set_attn_implementation = None  # a model that cannot be switched
    with pytest.raises(StructureError, match="attn_implementation='eager'"):
        attn_pattern(model, 0)


def test_direction_of_the_wrong_width_is_refused(fam):
    d = fam.sizes["d_model"]
    wrong = _direction(d + 1)
    with pytest.raises(SteeringError):
        ablation_interventions(fam.model, wrong)
    with pytest.raises(SteeringError):
        ablate(fam.model, INPUTS, wrong)


def test_head_and_layer_out_of_range(fam):
    with pytest.raises(StructureError):
        head_out(fam.model, 0, fam.sizes["n_heads"])
    with pytest.raises(StructureError):
        resid_pre(fam.model, fam.n_layers)
