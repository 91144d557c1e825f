"""Structure detection and aliases on tiny random Hugging Face models and plain nn.Modules."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from mechscope.core.intervene import Replace, Zero
from mechscope.core.models import (
    StructureError, attn_out, embed, head_out, list_sites, mlp_hidden, mlp_out, resid_post, resid_pre, resolve,
    structure, unembed,
)
from mechscope.core.run import cache, run
from mechscope.core.site import Site

tf = pytest.importorskip("transformers")

V = 50  # vocab of every tiny model


def _families():
    """name -> (builder, expected (n_layers, n_heads, n_kv_heads, head_dim, d_mlp))."""
    small = dict(vocab_size=V, max_position_embeddings=64)
    return {
        "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)), (2, 4, 4, 8, 128)),
        "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, **small)), (2, 4, 4, 8, 64)),
        "llama_gqa": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, **small)), (3, 4, 2, 8, 48)),
        "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40, **small)), (2, 4, 2, 8, 40)),
        # head_dim 16 != d_model / n_heads, one key/value head
        "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16, intermediate_size=48, **small)), (2, 4, 1, 16, 48)),
        # no MLP module: fc1/fc2 sit in the block, and they see [batch * pos, d] activations
        "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, **small)), (2, 4, 4, 8, 64)),
        # block and attention return tuples; attention and MLP run in parallel
        "gptj": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64, rotary_dim=4)), (2, 4, 4, 8, 128)),
    }


FAMILIES = _families()
IDS = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf(request):
    torch.manual_seed(0)
    model = FAMILIES[request.param][0]().eval()
    return request.param, model


def _proj_in_out(module):
    """The projection's weight as [in, out] (nn.Linear stores [out, in]; HF's Conv1D [in, out])."""
    return module.weight.T if isinstance(module, nn.Linear) else module.weight


def test_structure_numbers_match_the_config(hf):
    name, model = hf
    s = structure(model)
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.d_mlp) == FAMILIES[name][1]
    assert s.d_model == 32 and s.probe_error is None
    assert model.get_submodule(s.embed) is model.get_input_embeddings()
    assert model.get_submodule(s.unembed) is model.get_output_embeddings()
    assert structure(model) is s  # cached per model object


def test_resid_post_is_the_hidden_state_and_the_last_one_is_normed(hf):
    _, model = hf
    s = structure(model)
    sites = [resid_post(model, layer) for layer in range(s.n_layers)] + [resid_pre(model, 0)]
    acts = cache(model, {"input_ids": IDS}, sites, stop_when_cached=False)
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states
    assert len(hidden) == s.n_layers + 1
    assert torch.equal(acts[resid_pre(model, 0)], hidden[0])
    for layer in range(s.n_layers - 1):
        assert torch.equal(acts[sites[layer]], hidden[layer + 1]), f"resid_post.{layer}"
    last = acts[sites[-2]]
    assert not torch.allclose(last, hidden[-1])  # HF applies the final norm to the last hidden state
    with torch.no_grad():
        assert torch.allclose(model.get_submodule(s.final_norm)(last), hidden[-1], atol=1e-6)
    assert sites[-2].name == f"resid_post.{s.n_layers - 1}" and resid_post(model, -1) == sites[-2]


def test_embed_and_unembed_are_the_embedding_and_the_logits(hf):
    _, model = hf
    out, acts = run(model, {"input_ids": IDS}, cache=[embed(model), unembed(model)])
    with torch.no_grad():
        assert torch.equal(acts[embed(model)], model.get_input_embeddings()(IDS))
    assert torch.equal(acts[unembed(model)], out.logits)


def test_nothing_intervened_leaves_the_logits_bit_identical(hf):
    _, model = hf
    s = structure(model)
    sites = [embed(model), unembed(model)] + [
        f(model, layer) for layer in range(s.n_layers) for f in (resid_pre, resid_post, attn_out, mlp_out, mlp_hidden)]
    sites += [head_out(model, layer, h) for layer in range(s.n_layers) for h in range(s.n_heads)]
    with torch.no_grad():
        plain = model(IDS).logits
        out, acts = run(model, {"input_ids": IDS}, cache=sites)
    assert torch.equal(out.logits, plain) and len(acts) == len(sites)


def test_heads_through_their_slice_of_the_output_projection_sum_to_attn_out(hf):
    _, model = hf
    s = structure(model)
    for layer in range(s.n_layers):
        heads = [head_out(model, layer, h) for h in range(s.n_heads)]
        acts = cache(model, {"input_ids": IDS}, heads + [attn_out(model, layer)], stop_when_cached=False)
        proj = model.get_submodule(s.blocks[layer].attn_out_proj)
        w = _proj_in_out(proj).detach()  # [n_heads * head_dim, d_model]
        total = sum(acts[site][..., 0, :] @ w[h * s.head_dim:(h + 1) * s.head_dim] for h, site in enumerate(heads))
        if proj.bias is not None:
            total = total + proj.bias.detach()
        assert total.shape[-1] == s.d_model
        assert torch.allclose(total, acts[attn_out(model, layer)], atol=1e-5)


def test_patching_every_head_equals_patching_the_whole_projection_input(hf):
    _, model = hf
    s = structure(model)
    base, source = {"input_ids": IDS}, {"input_ids": IDS.flip(1)}
    heads = [head_out(model, 0, h) for h in range(s.n_heads)]
    whole = Site(s.blocks[0].attn_out_proj, io="input")
    src = cache(model, source, heads + [whole], stop_when_cached=False)
    with torch.no_grad():
        by_heads, _ = run(model, base, [(site, Replace(src[site])) for site in heads])
        at_once, _ = run(model, base, [(whole, Replace(src[whole]))])
        clean = model(IDS).logits
    assert torch.equal(by_heads.logits, at_once.logits)
    assert not torch.allclose(by_heads.logits, clean)


def test_zeroing_one_head_zeroes_only_its_slice_and_changes_the_output(hf):
    _, model = hf
    s = structure(model)
    h, hd = 1, s.head_dim
    whole = Site(s.blocks[0].attn_out_proj, io="input")
    clean = cache(model, {"input_ids": IDS}, [whole])[whole]
    with torch.no_grad():
        out, acts = run(model, {"input_ids": IDS}, {head_out(model, 0, h): Zero()}, cache=[whole])
        plain = model(IDS).logits
    patched = acts[whole]
    assert torch.equal(patched[..., h * hd:(h + 1) * hd], torch.zeros_like(patched[..., :hd]))
    assert torch.equal(patched[..., :h * hd], clean[..., :h * hd])
    assert torch.equal(patched[..., (h + 1) * hd:], clean[..., (h + 1) * hd:])
    assert not torch.allclose(out.logits, plain)


def test_alias_widths_and_output_elements(hf):
    name, model = hf
    s = structure(model)
    sites = [attn_out(model, 0), mlp_out(model, 0), mlp_hidden(model, 0), resid_post(model, 0)]
    acts = cache(model, {"input_ids": IDS}, sites)
    widths = [acts[site].shape[-1] for site in sites]
    assert widths == [s.d_model, s.d_model, s.d_mlp, s.d_model]
    # HF attention returns (output, weights); where the block adds it through another module
    # (GPT-NeoX's post-attention dropout, Gemma 2's post-attention norm) the write is that module
    write = attn_out(model, 0)
    assert write.element == (0 if write.path == s.blocks[0].attn else None)
    # whether a block returns a tensor or a tuple changes between transformers releases
    # (GPT-J: a tuple in 5.23, a tensor in 5.24); the alias must follow what this one does
    seen = []
    block = model.get_submodule(s.blocks[0].path)
    handle = block.register_forward_hook(lambda m, a, out: seen.append(isinstance(out, tuple)))
    with torch.no_grad():
        model(torch.tensor([[0, 1]]))
    handle.remove()
    assert resid_post(model, 0).element == (0 if seen[0] else None)


def test_resolve_aliases_and_module_paths(hf):
    _, model = hf
    s = structure(model)
    assert resolve(model, "resid_post.-1") == resid_post(model, s.n_layers - 1)
    assert resolve(model, "head_out.0.2") == head_out(model, 0, 2) and str(head_out(model, 0, -2)) == "head_out.0.2"
    assert resolve(model, "embed", positions="last") == embed(model).replace(positions="last")
    assert resolve(model, s.blocks[0].attn) == Site(s.blocks[0].attn)
    assert resolve(model, f"{s.blocks[0].attn}[0]") == Site(s.blocks[0].attn, element=0)
    assert resolve(model, f"{s.blocks[0].mlp}:input") == Site(s.blocks[0].mlp, io="input")
    with pytest.raises(StructureError, match=rf"valid: 0..{s.n_layers - 1}"):
        resolve(model, f"resid_post.{s.n_layers}")
    with pytest.raises(StructureError, match=r"valid: 0..3"):
        head_out(model, 0, 4)
    with pytest.raises(StructureError, match="needs a layer"):
        resolve(model, "mlp_out")
    with pytest.raises(Exception, match="did you mean"):
        resolve(model, s.blocks[0].attn + "x")


def test_list_sites_has_every_alias_and_module(hf):
    _, model = hf
    s = structure(model)
    rows = list_sites(model)
    names = [r["name"] for r in rows if r["kind"] == "alias"]
    assert names[0] == "embed" and names[-1] == "unembed" and len(names) == 2 + 7 * s.n_layers
    modules = {r["path"]: r for r in rows if r["kind"] == "module"}
    assert set(modules) == {p for p, _ in model.named_modules()}
    assert modules[s.blocks[0].attn]["returns"].startswith("tuple(")
    head = next(r for r in rows if r["name"] == "head_out.0.<h>")
    assert head["heads"] == s.n_heads and head["head_dim"] == s.head_dim


def test_falcon_multi_query_heads_come_from_the_weights():
    cfg = tf.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=V)
    s = structure(tf.FalconForCausalLM(cfg))
    assert cfg.multi_query and cfg.num_kv_heads == 4  # the config's field says 4; the fused qkv holds one k/v head
    assert (s.n_heads, s.n_kv_heads, s.head_dim) == (4, 1, 8)


def test_importing_models_does_not_import_transformers():
    code = "import sys, mechscope.core.models; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- plain nn.Modules


class Attention(nn.Module):
    def __init__(self, d, n_heads, tuple_out=False):
        super().__init__()
        self.n_heads, self.tuple_out = n_heads, tuple_out
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        z = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.proj(z.transpose(1, 2).reshape(b, t, d))
        return (out, None) if self.tuple_out else out


class Block(nn.Module):
    def __init__(self, d, n_heads, tuple_out=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, tuple_out)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        a = self.attn(self.ln1(x))
        x = x + (a[0] if isinstance(a, tuple) else a)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A hand-written GPT: no config, no get_input_embeddings, a positional table next to the token one."""

    def __init__(self, vocab=20, d=16, n_heads=4, n_layers=2, tuple_out=False):
        super().__init__()
        self.pos = nn.Embedding(32, d)
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, tuple_out) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def test_hand_written_transformer_is_found_from_its_modules():
    model = TinyGPT()
    s = structure(model)
    assert (s.blocks_path, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_mlp) == ("blocks", 2, 16, 4, 4, 4, 64)
    assert (s.embed, s.final_norm, s.unembed) == ("tok", "ln_f", "unembed")
    b = s.blocks[1]
    assert (b.attn, b.attn_out_proj, b.mlp, b.mlp_down_proj) == ("blocks.1.attn", "blocks.1.attn.proj", "blocks.1.mlp", "blocks.1.mlp.2")
    ids = torch.randint(0, 20, (3, 7))
    out, acts = run(model, ids, cache=[resid_post(model, 1), unembed(model), mlp_hidden(model, 0), attn_out(model, 0)])
    assert torch.equal(acts[unembed(model)], out) and acts[mlp_hidden(model, 0)].shape == (3, 7, 64)
    heads = cache(model, ids, [head_out(model, 0, h) for h in range(4)])
    w = model.blocks[0].attn.proj.weight.detach().T
    total = sum(heads[head_out(model, 0, h)][..., 0, :] @ w[4 * h:4 * h + 4] for h in range(4)) + model.blocks[0].attn.proj.bias.detach()
    assert torch.allclose(total, acts[attn_out(model, 0)], atol=1e-6)


def test_tuple_returning_attention_gets_element_zero():
    model = TinyGPT(tuple_out=True)
    assert attn_out(model, 0).element == 0 and resid_post(model, 0).element is None
    assert cache(model, torch.randint(0, 20, (2, 5)), [attn_out(model, 0)])[attn_out(model, 0)].shape == (2, 5, 16)


def test_plain_mlp_has_no_transformer_aliases_and_says_so():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    s = structure(model)
    assert s.n_layers == 0 and s.embed is None and s.unembed is None
    with pytest.raises(StructureError, match=r"structure\(model, blocks="):
        resid_post(model, 0)
    with pytest.raises(StructureError, match=r"token embedding.*structure\(model, embed="):
        embed(model)
    assert resolve(model, "2") == Site("2")
    assert [r["name"] for r in list_sites(model)] == ["", "0", "1", "2"]


class Mixer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(d, d), nn.Linear(d, d)
        self.heads = 2

    def forward(self, x):
        return self.w_out(torch.tanh(self.w_in(x)))


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mix, self.ff = Mixer(d), nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.ff(x)


class Odd(nn.Module):
    """Nothing here is named or shaped like attention: detection must fail and overrides must work."""

    def __init__(self, d=8):
        super().__init__()
        self.stack = nn.ModuleList(Layer(d) for _ in range(3))

    def forward(self, x):
        for layer in self.stack:
            x = layer(x)
        return x


def test_overrides_supply_what_detection_cannot_find():
    model = Odd()
    s = structure(model)
    assert s.blocks_path == "stack" and s.blocks[0].attn is None and s.blocks[0].mlp == "stack.0.ff"
    with pytest.raises(StructureError, match=r"not stack.0.ff: they differ by .*% .*attn_write="):
        attn_out(model, 0)  # the mixer's write is missing from the sum, so the writes are refused
    s = structure(model, attn="mix", attn_out_proj="mix.w_out", n_heads=2)
    assert structure(model) is s  # the overrides stay with the model
    assert (s.head_dim, s.blocks[2].attn_out_proj) == (4, "stack.2.mix.w_out")
    acts = cache(model, torch.randn(2, 3, 8), [attn_out(model, 2), head_out(model, 2, 1)])
    assert acts[head_out(model, 2, 1)].shape == (2, 3, 1, 4)
    with pytest.raises(StructureError, match="relative to block"):
        structure(model, attn="nope")
    with pytest.raises(StructureError, match="not a module path"):
        structure(model, blocks="stak")


def test_functional_output_projection_is_reported_not_silently_unhooked():
    class MHABlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.mlp(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.layers = nn.ModuleList([MHABlock(), MHABlock()])

        def forward(self, ids):
            x = self.emb(ids)
            for layer in self.layers:
                x = layer(x)
            return x

    model = Net()
    s = structure(model)
    assert (s.n_heads, s.head_dim, s.n_kv_heads, s.blocks[0].attn_out_proj) == (4, 4, 4, "layers.0.attn.out_proj")
    assert attn_out(model, 1).element == 0
    with pytest.raises(StructureError, match="never called"):
        head_out(model, 0, 0)


def test_probe_leaves_no_trace():
    model = TinyGPT().train()
    model.blocks[0].eval()
    rng = torch.get_rng_state()
    structure(model, refresh=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(not m._forward_hooks for m in model.modules())


def test_blocks_at_the_root_and_a_probe_that_needs_an_example():
    class TwoInputs(nn.Module):
        """Blocks straight in an nn.Sequential-like root; forward needs two inputs the probe cannot guess."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(Block(16, 4), Block(16, 4))

        def forward(self, x, scale):
            return self.body(x * scale)

    model = TwoInputs()
    s = structure(model)
    assert s.blocks_path == "body" and s.probe_error is not None
    with pytest.raises(StructureError, match=r"tensor or a tuple.*example="):
        resid_post(model, 0)
    assert resid_pre(model, 0) == Site("body.0", io="input")  # an input site needs no probe
    x = torch.randn(2, 3, 16)
    structure(model, example=(x, 2.0))
    assert resid_post(model, 1) == Site("body.1") and attn_out(model, 0).element is None
    root = nn.Sequential(Block(16, 4), Block(16, 4), Block(16, 4))
    assert structure(root).blocks_path == "" and resid_post(root, -1) == Site("2")
    assert torch.equal(cache(root, x, [resid_post(root, 2)])[resid_post(root, 2)], root(x))


def test_module_paths_that_look_like_aliases_still_resolve():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
            self.out = nn.Linear(8, 10)

        def forward(self, ids):
            return self.out(self.embed(ids))

    model = Net()
    assert resolve(model, "embed.1") == Site("embed.1")  # not the alias "embed" with a layer
    assert resolve(model, "embed") == Site("embed.0", name="embed")  # the alias: the token table
    with pytest.raises(StructureError, match="takes no layer"):
        resolve(model, "embed.7")
