"""Tiny random causal LMs of 16 Hugging Face families, for structure tests (issue 15).

Shared helper, not a test file: ``tests/conftest.py`` puts this folder on ``sys.path`` so
tests can ``import hf_families``.

``FAMILIES[name]()`` builds a fresh, deterministic (seeded), randomly initialised
``XxxForCausalLM`` in eval mode: 2-3 layers, d_model 32-64, vocab 80-100, grouped-query
attention wherever the family has it, and ``n_heads * head_dim != d_model`` where the
family allows a free ``head_dim``. Nothing is downloaded. After building, every norm's
weight (and bias) is moved away from its init (which is 1, or 0 for Gemma's ``1 + w``
norms), so a read before a norm and a read after it differ, and every linear bias is
moved away from 0 (HF initialises biases to zero), so a bias that is dropped or counted
twice shows up.

``EXTRA`` holds variants of the same families (Falcon's old parallel/multi-query block,
GPT-NeoX and StableLM with the other residual form, OPT with project_in/out): cheap to
build, not part of the 16, for tests that want more coverage.

``IDS`` is a ``[2, 7]`` LongTensor of token ids valid in every vocab (and not the pad
id, whose embedding row is zero). ``hidden_states(model, ids)`` is the model's own
``output_hidden_states`` tuple: ``[0]`` is block 0's input (after embedding scale,
positions, dropout, project_in), ``[l]`` block ``l-1``'s output, except the last entry,
which has the final norm applied (checked on transformers 5.25 for every family here).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import transformers as tf

VOCAB_MIN = 80  # every family's vocab is at least this
PAD, BOS, EOS = 0, 1, 2
_TOKENS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# token ids 3..79: valid in every vocab, never the pad id
IDS = torch.tensor([[5, 17, 42, 8, 63, 29, 11],
                    [71, 3, 56, 23, 9, 77, 40]], dtype=torch.long)


def _perturb(model: nn.Module, seed: int) -> None:
    """Move norm weights/biases and linear biases away from their init."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            name = type(m).__name__
            if "Norm" in name:
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, torch.Tensor):
                        p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif isinstance(m, nn.Linear) or name == "Conv1D":
                b = getattr(m, "bias", None)
                if isinstance(b, torch.Tensor):
                    b.add_(0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype))


def _make(model_cls: type, config: tf.PretrainedConfig, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        _perturb(model, seed)
    return model.eval()


# ------------------------------------------------------------------------- the 16 families


def gpt2() -> nn.Module:
    # no GQA; Conv1D projections; learned positions (wpe) added to wte; one fused c_attn
    return _make(tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4, n_inner=80,
        initializer_range=0.1, **_TOKENS))


def gpt_neox(parallel: bool = True) -> nn.Module:
    # no GQA; parallel residual (the default, as in Pythia) or sequential; partial rotary
    return _make(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
        vocab_size=90, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
        max_position_embeddings=32, use_parallel_residual=parallel,
        rope_parameters={**_ROPE, "partial_rotary_factor": 0.5},
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def gptj() -> nn.Module:
    # no GQA; parallel block with ONE norm (ln_1) feeding both attn and mlp; rotary_dim < head_dim
    return _make(tf.GPTJForCausalLM, tf.GPTJConfig(
        vocab_size=88, n_positions=32, n_embd=48, n_layer=2, n_head=4, rotary_dim=8, n_inner=80,
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def opt() -> nn.Module:
    # no GQA; no MLP module (fc1/fc2 sit on the layer) and fc1/fc2 run on [batch*seq, d] rows
    return _make(tf.OPTForCausalLM, tf.OPTConfig(
        vocab_size=92, hidden_size=48, num_hidden_layers=2, ffn_dim=80, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=48, do_layer_norm_before=True,
        init_std=0.1, **_TOKENS))


def llama() -> nn.Module:
    return _make(tf.LlamaForCausalLM, tf.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rope_parameters=dict(_ROPE),
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def mistral() -> nn.Module:
    # sliding window smaller than IDS's 7 positions, so the window matters
    return _make(tf.MistralForCausalLM, tf.MistralConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, sliding_window=4,
        rope_parameters=dict(_ROPE), initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def qwen2() -> nn.Module:
    # q/k/v biases, no o_proj bias; tied embeddings (as in the small Qwen2 models)
    return _make(tf.Qwen2ForCausalLM, tf.Qwen2Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_parameters=dict(_ROPE),
        initializer_range=0.1, tie_word_embeddings=True, **_TOKENS))


def qwen3() -> nn.Module:
    # per-head q_norm/k_norm; head_dim 16 with 4 heads != d_model 48
    return _make(tf.Qwen3ForCausalLM, tf.Qwen3Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rope_parameters=dict(_ROPE),
        initializer_range=0.1, tie_word_embeddings=True, **_TOKENS))


def gemma() -> nn.Module:
    # embedding scaled by sqrt(d_model) inside embed_tokens; (1 + w) RMSNorm
    return _make(tf.GemmaForCausalLM, tf.GemmaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rope_parameters=dict(_ROPE),
        initializer_range=0.1, **_TOKENS))


def gemma2() -> nn.Module:
    # sandwich norms (post_attention_layernorm / post_feedforward_layernorm on the sublayer
    # outputs); attention-logit and final-logit softcapping; sliding/global alternation
    return _make(tf.Gemma2ForCausalLM, tf.Gemma2Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=32,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_parameters=dict(_ROPE),
        initializer_range=0.1, **_TOKENS))


def gemma3() -> nn.Module:
    # text-only Gemma 3: sandwich norms, per-head q_norm/k_norm, sliding/global alternation
    # with a different rope per layer type
    return _make(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=32,
        sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        initializer_range=0.1, **_TOKENS))


def olmo2() -> nn.Module:
    # no pre-norms: attention and MLP read the raw residual stream; post-norms on their outputs;
    # q_norm/k_norm over the whole (all heads) q/k projection
    return _make(tf.Olmo2ForCausalLM, tf.Olmo2Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_parameters=dict(_ROPE),
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def phi() -> nn.Module:
    # parallel block, one input_layernorm; resid_dropout called twice; lm_head has a bias;
    # partial rotary; q/k LayerNorms (qk_layernorm) on
    return _make(tf.PhiForCausalLM, tf.PhiConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, qk_layernorm=True,
        rope_parameters={**_ROPE, "partial_rotary_factor": 0.5},
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def phi3() -> nn.Module:
    # fused qkv_proj and fused gate_up_proj
    return _make(tf.Phi3ForCausalLM, tf.Phi3Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, original_max_position_embeddings=32,
        rope_parameters=dict(_ROPE), initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def falcon() -> nn.Module:
    # new_decoder_architecture (Falcon-40B/180B): GQA via num_kv_heads, two norms (ln_attn,
    # ln_mlp), parallel block, `mlp_output += attention_output` in place, block returns a tuple
    return _make(tf.FalconForCausalLM, tf.FalconConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, parallel_attn=True, alibi=False, bias=False, ffn_hidden_size=80,
        max_position_embeddings=32, rope_parameters=dict(_ROPE), initializer_range=0.1,
        tie_word_embeddings=False, **_TOKENS))


def stablelm() -> nn.Module:
    # LayerNorm (with bias), partial rotary, sequential residual (StableLM-2 / 3B style);
    # d_model 64 (head_dim 16, rotary on 4 of its dims)
    return _make(tf.StableLmForCausalLM, tf.StableLmConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_qkv_bias=True, use_parallel_residual=False,
        rope_parameters={**_ROPE, "partial_rotary_factor": 0.25},
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": gpt2, "gpt_neox": gpt_neox, "gptj": gptj, "opt": opt, "llama": llama, "mistral": mistral,
    "qwen2": qwen2, "qwen3": qwen3, "gemma": gemma, "gemma2": gemma2, "gemma3": gemma3, "olmo2": olmo2,
    "phi": phi, "phi3": phi3, "falcon": falcon, "stablelm": stablelm,
}

# families whose sublayer output is normalised before it is added to the residual stream:
# the attention/MLP output projection is not the residual write, so a weight edit of it
# cannot remove a direction from the stream
SANDWICH = frozenset({"gemma2", "gemma3", "olmo2"})



# Ground truth read from transformers 5.25's modeling_<family>.py (and checked by hooks):
# where each thing is, as module paths. Block-relative entries are sets of paths that are
# all correct (e.g. the attention module's element 0 and its output projection hold the
# same tensor in eval mode); "attn_write"/"mlp_write" is what the block adds to the
# residual stream, so resid_post - resid_pre == attn_write + mlp_write.
def _t(blocks, embed, attn_out_proj, mlp_down_proj, attn_write, mlp_write, final_norm, unembed="lm_head"):
    return dict(blocks=blocks, embed=embed, attn_out_proj=attn_out_proj, mlp_down_proj=mlp_down_proj,
                attn_write=frozenset(attn_write), mlp_write=frozenset(mlp_write), final_norm=final_norm,
                unembed=unembed)


_LLAMA = _t("model.layers", "model.embed_tokens", "self_attn.o_proj", "mlp.down_proj",
            {"self_attn", "self_attn.o_proj"}, {"mlp", "mlp.down_proj"}, "model.norm")
_SANDWICH = _t("model.layers", "model.embed_tokens", "self_attn.o_proj", "mlp.down_proj",
               {"post_attention_layernorm"}, {"post_feedforward_layernorm"}, "model.norm")
TRUTH: dict[str, dict] = {
    "gpt2": _t("transformer.h", "transformer.wte", "attn.c_proj", "mlp.c_proj",
               {"attn", "attn.c_proj", "attn.resid_dropout"}, {"mlp", "mlp.c_proj", "mlp.dropout"},
               "transformer.ln_f"),
    "gpt_neox": _t("gpt_neox.layers", "gpt_neox.embed_in", "attention.dense", "mlp.dense_4h_to_h",
                   {"attention", "attention.dense", "post_attention_dropout"},
                   {"mlp", "mlp.dense_4h_to_h", "post_mlp_dropout"}, "gpt_neox.final_layer_norm"),
    "gptj": _t("transformer.h", "transformer.wte", "attn.out_proj", "mlp.fc_out",
               {"attn", "attn.out_proj", "attn.resid_dropout"}, {"mlp", "mlp.fc_out", "mlp.dropout"},
               "transformer.ln_f"),
    # fc2 runs on [batch*seq, d_mlp] rows; there is no MLP module
    "opt": _t("model.decoder.layers", "model.decoder.embed_tokens", "self_attn.out_proj", "fc2",
              {"self_attn", "self_attn.out_proj"}, {"fc2"}, "model.decoder.final_layer_norm"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _SANDWICH, "gemma3": _SANDWICH, "olmo2": _SANDWICH,
    # resid_dropout is called twice per block (on the attention and on the MLP output)
    "phi": _t("model.layers", "model.embed_tokens", "self_attn.dense", "mlp.fc2",
              {"self_attn", "self_attn.dense"}, {"mlp", "mlp.fc2"}, "model.final_layernorm"),
    "phi3": _t("model.layers", "model.embed_tokens", "self_attn.o_proj", "mlp.down_proj",
               {"self_attn", "self_attn.o_proj", "resid_attn_dropout"},
               {"mlp", "mlp.down_proj", "resid_mlp_dropout"}, "model.norm"),
    # the block returns (hidden, attn_weights); the MLP's output tensor is then changed in
    # place (`mlp_output += attention_output`), so a read of it must be copied in the hook
    "falcon": _t("transformer.h", "transformer.word_embeddings", "self_attention.dense", "mlp.dense_4h_to_h",
                 {"self_attention", "self_attention.dense"}, {"mlp", "mlp.dense_4h_to_h"}, "transformer.ln_f"),
    "stablelm": _t("model.layers", "model.embed_tokens", "self_attn.o_proj", "mlp.down_proj",
                   {"self_attn", "self_attn.o_proj"}, {"mlp", "mlp.down_proj", "dropout"}, "model.norm"),
}
TRUTH["falcon_7b"] = TRUTH["falcon_rw"] = TRUTH["falcon"]
TRUTH["gpt_neox_sequential"] = TRUTH["gpt_neox"]
TRUTH["stablelm_parallel"] = TRUTH["stablelm"]
TRUTH["opt_project"] = TRUTH["opt"]

# ------------------------------------------------------------------------------ variants


def falcon_7b() -> nn.Module:
    # Falcon-7B block: parallel_attn with ONE input_layernorm, multi-query (one k/v head)
    return _make(tf.FalconForCausalLM, tf.FalconConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False, bias=False,
        ffn_hidden_size=80, max_position_embeddings=32, rope_parameters=dict(_ROPE),
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def falcon_rw() -> nn.Module:
    # Falcon-RW block: sequential (parallel_attn=False), ALiBi instead of rotary, biases
    return _make(tf.FalconForCausalLM, tf.FalconConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True, bias=True,
        ffn_hidden_size=80, max_position_embeddings=32, initializer_range=0.1,
        tie_word_embeddings=False, **_TOKENS))


def gpt_neox_sequential() -> nn.Module:
    return gpt_neox(parallel=False)


def stablelm_parallel() -> nn.Module:
    # StableLM-2-12B style: parallel residual, per-head q/k LayerNorms
    return _make(tf.StableLmForCausalLM, tf.StableLmConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_qkv_bias=False, use_parallel_residual=True,
        qk_layernorm=True, rope_parameters={**_ROPE, "partial_rotary_factor": 0.25},
        initializer_range=0.1, tie_word_embeddings=False, **_TOKENS))


def opt_project() -> nn.Module:
    # OPT-350m's project_in (embedding width 32 -> d_model 48) and project_out before lm_head
    # (pre-LN kept, so the residual-stream invariant still holds)
    return _make(tf.OPTForCausalLM, tf.OPTConfig(
        vocab_size=92, hidden_size=48, num_hidden_layers=2, ffn_dim=80, num_attention_heads=4,
        max_position_embeddings=32, word_embed_proj_dim=32, do_layer_norm_before=True,
        init_std=0.1, **_TOKENS))


EXTRA: dict[str, Callable[[], nn.Module]] = {
    "falcon_7b": falcon_7b, "falcon_rw": falcon_rw, "gpt_neox_sequential": gpt_neox_sequential,
    "stablelm_parallel": stablelm_parallel, "opt_project": opt_project,
}


def sizes(model: nn.Module) -> dict[str, int]:
    """d_model, n_layers, n_heads (query heads), n_kv_heads, head_dim, d_mlp, vocab, from the config."""
    c = model.config
    d = c.hidden_size
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // n_heads
    kv = getattr(c, "num_key_value_heads", None) or getattr(c, "num_kv_heads", None) or n_heads
    if getattr(c, "model_type", "") == "falcon" and not c.new_decoder_architecture:
        kv = 1 if c.multi_query else n_heads
    d_mlp = (getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None)
             or getattr(c, "ffn_hidden_size", None) or getattr(c, "n_inner", None) or 4 * d)
    return dict(d_model=d, n_layers=c.num_hidden_layers, n_heads=n_heads, n_kv_heads=kv, head_dim=head_dim,
                d_mlp=d_mlp, vocab=c.vocab_size)


@torch.no_grad()
def hidden_states(model: nn.Module, ids: torch.Tensor = IDS) -> tuple[torch.Tensor, ...]:
    """The model's own ``output_hidden_states``: [embedding output, block 0 output, ...]."""
    return model(input_ids=ids, output_hidden_states=True).hidden_states
