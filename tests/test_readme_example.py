"""The README's Python API example, run on a tiny random GPT-2 (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


def test_readme_example_runs_on_a_tiny_gpt2():
    from mechscope import Add, FeatureInterchange, ProjectOut, Site, Subspace, Zero, cache, collate, interchange, run
    from mechscope.core import aliases

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=50, n_positions=32)).eval()
    site = aliases.resid_post(model, 3)
    assert site == Site("transformer.h.3")
    head = aliases.head_out(model, 3, 2)
    base = collate([[5, 6, 7], [1, 2, 3, 4]], side="left")
    source = collate([[9, 9], [8, 7, 6]], side="right")
    plain = model(**base).logits
    acts = cache(model, base, [site])
    assert acts[site].shape == (2, 4, 32)
    last = Site(site.path, positions="last")
    patched = interchange(model, base, source, [last])
    # patching the last block's output at the last token sets the last logits to the source's
    src_logits = model(**source).logits
    assert torch.allclose(patched.logits[0, -1], src_logits[0, 1], atol=1e-4)
    assert torch.allclose(patched.logits[1, -1], src_logits[1, 2], atol=1e-4)
    ablated, _ = run(model, base, {head: Zero()})
    direction, directions = torch.randn(32), torch.randn(3, 32)
    steered, _ = run(model, base, {site: Add(direction, coeff=4.0)})
    projected, _ = run(model, base, {site: ProjectOut(directions)})
    for out in (ablated, steered, projected):
        assert not torch.allclose(out.logits, plain)
    W = Subspace(d=32, k=8)
    src = cache(model, source, [last])[last]
    out, _ = run(model, base, {last: FeatureInterchange(W, src, features=range(8))})
    out.logits.sum().backward()
    assert all(p.grad is not None for p in W.parameters())


def test_readme_circuit_example_runs_on_a_tiny_gemma3():
    """The README's Hugging Face circuit example: every tool runs, with shapes from structure()."""
    import warnings

    from mechscope.circuits.cells import resid_cells
    from mechscope.circuits.composition import composition_scores
    from mechscope.circuits.heads import head_ablation_sweep, head_scores
    from mechscope.circuits.patching import patch_cells
    from mechscope.core import aliases
    from mechscope.steer.apply import ablate

    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_size=128, vocab_size=100, sliding_window=8)).eval()
    seq = torch.randint(1, 100, (8, 10))
    tokens = torch.cat([torch.full((8, 1), 2), seq, seq], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aliases.attn_pattern(model, 1)
    assert any("eager" in str(w.message) for w in caught)
    scores = head_scores(model, tokens, period=10)
    assert all(v.shape == (2, 4) for v in scores.values())

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 5].mean()
    assert head_ablation_sweep(model, tokens, metric).values.shape == (2, 4)
    res = patch_cells(model, tokens, tokens.flip(1), resid_cells(model, positions=range(21)), metric)
    assert res.scores.shape == (2 * 21,)
    k_comp = composition_scores(model, kind="k")
    assert k_comp.scores.shape == (2, 4, 2, 4) and any("rotary" in c for c in k_comp.caveats)
    assert ablate(model, tokens, torch.randn(64)).logits.shape == (8, 21, 100)
