"""The circuit tools on tiny random Hugging Face models (built in-process, no download)."""

import copy

import pytest
import torch

from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import attn_cells, head_cells, mlp_cells, resid_cells
from mechscope.circuits.logit_lens import direct_logit_attribution, logit_lens
from mechscope.circuits.patching import patch_cells, patch_one_by_one

tf = pytest.importorskip("transformers")
V = 50


def _models():
    small = dict(vocab_size=V, max_position_embeddings=64)
    return {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=48, **small)),
    }


@pytest.fixture(scope="module", params=list(_models()))
def hf(request):
    torch.manual_seed(0)
    model = _models()[request.param]().eval()
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (2, 6), generator=gen), torch.randint(0, V, (2, 6), generator=gen)
    target = torch.tensor([3, 4])

    def metric(logits):
        return logits[:, -1].gather(1, target[:, None]).mean()
    return model, clean, corrupt, target, metric


def test_batched_patching_equals_per_cell(hf):
    model, clean, corrupt, _, metric = hf
    cells = resid_cells(model, positions=range(6)) + attn_cells(model) + mlp_cells(model) + head_cells(model, positions=[5])
    batched = patch_cells(model, clean, corrupt, cells, metric)
    single = patch_one_by_one(model, clean, corrupt, cells, metric)
    assert torch.allclose(batched.values, single.values, atol=1e-5)
    whole = resid_cells(model, layers=[0])
    assert patch_cells(model, clean, corrupt, whole, metric).scores[0].item() == pytest.approx(1.0, abs=1e-5)


def test_readout_on_hugging_face_models(hf):
    """With a readout, residual and head cells take the suffix replay (the model's own forward
    from the patched position on, with its KV cache, unembedding the readout only; a head's
    slice written into its block's output projection), and attribution the final norm +
    unembedding at the readout; same numbers."""
    model, clean, corrupt, _, metric = hf
    resid = resid_cells(model, positions=range(6))
    cells = resid + head_cells(model, positions=[5])
    fast = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
    ref = patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1])
    assert torch.allclose(fast.values, ref.values, atol=1e-5)
    assert fast.extra["paths"] == {"suffix": len(cells), "tail": 0, "forwards": 0}
    full = attribution_patching(model, clean, corrupt, cells, lambda lg: metric(lg[:, -1:]))
    read = attribution_patching(model, clean, corrupt, cells, metric, readout=[-1])
    assert torch.allclose(read.values, full.values, atol=1e-5)


def test_attribution_is_the_first_order_effect(hf):
    """With a corrupt input a small step from the clean one, the estimate must match the
    real patches to first order (this checks the gradients reach every site through HF code)."""
    model, _, _, _, metric = hf
    model = copy.deepcopy(model).double()  # float64, so that rounding does not swamp a small step
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(2, 6, 32, generator=gen, dtype=torch.float64)
    step = 1e-3 * torch.randn(2, 6, 32, generator=gen, dtype=torch.float64)
    clean, corrupt = {"inputs_embeds": e}, {"inputs_embeds": e + step}
    cells = resid_cells(model, positions=range(6)) + head_cells(model)
    est = attribution_patching(model, clean, corrupt, cells, metric, direction="denoise")
    real = patch_cells(model, clean, corrupt, cells, metric, direction="denoise")
    moved = (real.values - real.corrupt).abs().max()
    assert moved > 0 and (est.values - real.values).abs().max() < 0.02 * moved


def test_logit_lens_and_direct_logit_attribution(hf):
    model, clean, _, target, _ = hf
    lens = logit_lens(model, clean)
    with torch.no_grad():
        logits = model(clean).logits[:, -1]
    assert lens.shape == (2, 2, V) and torch.allclose(lens[-1], logits, atol=1e-5)
    dla = direct_logit_attribution(model, clean, target)
    assert dla["labels"] == ["embed", "attn_out.0", "mlp_out.0", "attn_out.1", "mlp_out.1"]
    assert torch.allclose(dla["contributions"].sum(0) + dla["rest"], dla["logits"], atol=1e-4)


def test_path_patching_with_receivers_from_structure(hf):
    """head_in names a head's query/key/value from structure() (grouped-query key heads mapped
    to the query heads they serve), so path patching runs unchanged on Hugging Face models;
    GPT-2's fused c_attn is refused with a message saying how to give the receiver."""
    from mechscope.core.aliases import head_in, head_out
    from mechscope.core.models import StructureError, structure
    from mechscope.circuits.patching import path_patch

    model, clean, corrupt, _, metric = hf
    s = structure(model)
    if s.blocks[1].qkv is None:
        with pytest.raises(StructureError, match="fused"):
            head_in(model, 1, 0, "k")
        return
    k = head_in(model, 1, 3, "k")
    assert k.path.endswith("k_proj") and k.heads == (3 // (s.n_heads // s.n_kv_heads),) and k.head_dim == s.head_dim
    score = path_patch(model, clean, corrupt, head_out(model, 0, 1), head_in(model, 1, 2, "q"), metric)
    assert 0 < abs(score) < 10  # a real, finite effect through one path
    with pytest.raises(StructureError, match="part must be"):
        head_in(model, 1, 0, "o")
