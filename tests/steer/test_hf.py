"""Steering, ablation, the weight edit, ReFT and LoRA on tiny random Hugging Face causal LMs."""

import pytest
import torch

pytest.importorskip("transformers")

from mechscope.core.models import hf_model_from_config, resolve, structure  # noqa: E402
from mechscope.steer.apply import ablate, residual_writers, steer  # noqa: E402
from mechscope.steer.finetune import TrainRecipe, lora_targets, train_lora, train_reft  # noqa: E402
from mechscope.steer.orthogonalize import orthogonalize_weights  # noqa: E402
from mechscope.steer.reft import Reft, n_trainable  # noqa: E402

CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 50, "n_positions": 32,
             "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 50, "bos_token_id": 0, "eos_token_id": 0},
}


@pytest.fixture(params=sorted(CONFIGS))
def model(request):
    return hf_model_from_config(CONFIGS[request.param], seed=0)


def test_weight_edit_equals_hook_ablation(model):
    ids = torch.randint(0, 50, (3, 10))
    r = torch.randn(32)
    with torch.no_grad():
        hooked = ablate(model, ids, r).logits
        edited = orthogonalize_weights(model, r)
        assert float((edited(ids).logits - hooked).abs().max()) < 1e-4
        assert float((model(ids).logits - hooked).abs().max()) > 1e-2
    assert residual_writers(model)[0].path == structure(model).embed


def test_tied_unembedding_is_left_alone():
    model = hf_model_from_config(CONFIGS["gpt2"], seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    edited = orthogonalize_weights(model, torch.randn(32))
    assert edited.lm_head.weight is not edited.transformer.wte.weight
    assert torch.equal(edited.lm_head.weight, model.lm_head.weight)


def test_steering_at_an_alias_changes_later_positions_only(model):
    ids = torch.randint(0, 50, (2, 8))
    site = resolve(model, "resid_post.0")
    with torch.no_grad():
        out = steer(model, ids, torch.randn(32), site, 3.0, positions=[5]).logits
        clean = model(ids).logits
    assert torch.allclose(out[:, :5], clean[:, :5], atol=1e-5)  # causal: earlier positions unchanged
    assert float((out[:, 5:] - clean[:, 5:]).abs().max()) > 1e-3


class _Batch:
    def __init__(self, n=16, t=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 50, (n, t), generator=g)
        self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.labels = torch.full((n, t), -100)
        self.labels[:, -1] = 7  # the behaviour to induce: say 7 at the end
        self.prompt_start = torch.zeros(n, dtype=torch.long)
        self.prompt_len = torch.full((n,), t)


def test_reft_learns_with_the_model_frozen(model):
    sites = [resolve(model, f"resid_pre.{l}") for l in range(2)]
    reft = Reft(sites, 32, "loreft", rank=2, positions="l1")
    before = [p.clone() for p in model.parameters()]
    batch = _Batch()
    losses = train_reft(model, reft, lambda step: batch, TrainRecipe(steps=60, lr=5e-2))
    # a random tiny model has small logits (std-0.02 unembedding), so the loss cannot fall far;
    # what it can do is make 7 the model's answer
    assert losses[-1] < losses[0] - 0.3
    from mechscope.steer.baselines import reft_forward
    with torch.no_grad():
        out = reft_forward(model, reft)(batch.inputs, batch.prompt_start, batch.prompt_len).logits
    assert float(out[:, -1].argmax(-1).eq(7).double().mean()) > 0.9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert n_trainable(reft) == 2 * (2 * 2 * 32 + 2)


def test_lora_with_peft_on_every_linear_layer():
    pytest.importorskip("peft")
    model = hf_model_from_config(CONFIGS["gpt2"], seed=0)
    assert lora_targets(model) == ["c_attn", "c_fc", "c_proj"]
    batch = _Batch()
    tuned = train_lora(model, lambda step: batch, TrainRecipe(steps=30, lr=1e-2), rank=4)
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    # per block: c_attn 32->96, attn c_proj 32->32, c_fc 32->128, mlp c_proj 128->32; r (in + out) each
    assert trainable == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    with torch.no_grad():
        assert float(tuned(**batch.inputs).logits[:, -1].argmax(-1).eq(7).double().mean()) > 0.9
