"""Left vs right padding: the last real token's activation is the same, and equals the unpadded run."""

import pytest
import torch

from mechscope.core.batch import collate
from mechscope.core.models import attn_out, head_out, resid_post, structure
from mechscope.core.run import cache

tf = pytest.importorskip("transformers")

SEQS = [[5, 3, 8, 1, 9, 2], [7, 4], [6, 6, 1, 3]]
SMALL = dict(vocab_size=20, max_position_embeddings=64)
FAMILIES = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=20, n_positions=64)),
    "llama_gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, **SMALL)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, **SMALL)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40, **SMALL)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]().eval()


def _last(model, batch, alias):
    site = alias.replace(positions="last")
    return cache(model, batch, [site])[site]  # [batch, 1, ...]


@pytest.mark.parametrize("alias", ["resid_post", "attn_out", "head_out"])
def test_last_token_is_the_same_under_left_and_right_padding(model, alias):
    s = structure(model)
    site = {"resid_post": resid_post(model, -1), "attn_out": attn_out(model, -1), "head_out": head_out(model, -1, 3)}[alias]
    left = _last(model, collate(SEQS, side="left"), site)
    right = _last(model, collate(SEQS, side="right"), site)
    assert left.shape[:2] == (len(SEQS), 1) and left.shape[-1] == (s.head_dim if alias == "head_out" else s.d_model)
    assert torch.allclose(left, right, atol=1e-5)
    for i, seq in enumerate(SEQS):  # and each equals the example run alone, unpadded
        alone = _last(model, {"input_ids": torch.tensor([seq])}, site)
        assert torch.allclose(left[i], alone[0], atol=1e-5), f"example {i}"


def test_without_position_ids_left_padding_shifts_absolute_positions():
    """GPT-2 adds learned absolute positions: left padding without position_ids moves them."""
    torch.manual_seed(0)
    model = FAMILIES["gpt2"]().eval()
    site = resid_post(model, -1).replace(positions="last")
    left = cache(model, collate(SEQS, side="left", position_ids=False), [site])[site]
    right = cache(model, collate(SEQS, side="right"), [site])[site]
    assert torch.allclose(left[0], right[0], atol=1e-5)  # the longest example has no padding
    assert not torch.allclose(left[1], right[1], atol=1e-3)
