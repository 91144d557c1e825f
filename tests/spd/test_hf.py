"""SPD on tiny random Hugging Face language models (built in-process, nothing downloaded):
GPT-2's Conv1D and tied embedding, Llama's Linear and embedding, with padding."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.spd.config import SPDConfig  # noqa: E402
from mechscope.spd.decomposition import Decomposition  # noqa: E402
from mechscope.spd.evals import lm_metrics  # noqa: E402
from mechscope.spd.objective import SPDObjective  # noqa: E402
from mechscope.spd.train import train_spd  # noqa: E402


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=12)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=12)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batch(gen, b=4, t=10, vocab=40):
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 7:] = 0  # one right-padded sequence
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("build,sites", [
    (_gpt2, ("transformer.wte", "transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_proj")),
    (_llama, ("model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj")),
])
def test_batched_and_straightforward_passes_agree_on_language_models(build, sites):
    model = build()
    model.requires_grad_(False)
    cfg = SPDConfig(sites=sites, C=6, recon="kl")
    dec = Decomposition(model, cfg)
    kinds = {i.path: i.kind for i in dec.layers}
    assert kinds[sites[0]] == "embedding"
    inputs = _batch(torch.Generator().manual_seed(1))
    a = SPDObjective(dec, batched=True)(inputs, 0.0, torch.Generator().manual_seed(2))
    b = SPDObjective(dec, batched=False)(inputs, 0.0, torch.Generator().manual_seed(2))
    for key in ("stochastic", "layerwise", "importance"):
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
        assert math.isfinite(float(a[key].detach()))


def test_a_few_steps_on_gpt2_with_annealed_p():
    model = _gpt2()
    cfg = SPDConfig(sites=("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"), C=8, recon="kl", steps=6,
                    batch_size=4, warmup_steps=20, log_every=3, importance_coeff=1e-3, p=2.0, p_final=0.4)
    run = train_spd(model, lambda b, g: _batch(g, b), cfg, progress=False)
    assert len(run.history) == 2 and all(math.isfinite(r["total"]) for r in run.history)
    assert run.history[0]["p"] == pytest.approx(2.0 - 1.6 * 2 / 6)  # p at step 3 of 6 (frac 2/6 when drawn)
    assert run.history[-1]["p"] < run.history[0]["p"]


def test_language_model_metrics_of_an_exact_factorisation():
    model = _gpt2()
    path = "transformer.h.0.mlp.c_fc"
    dec = Decomposition(model, SPDConfig(sites=(path,), C=16, recon="kl"))
    with torch.no_grad():  # U V == W exactly (Conv1D: W = weight.T, d_in = 16)
        comps = dec.comps(path)
        comps.U_param.copy_(dec.target_weight(path))
        comps.V_param.copy_(torch.eye(16))
    m = lm_metrics(model, dec, _batch(torch.Generator().manual_seed(5)))
    assert set(m) >= {"ce_target", "ce_ci", "ce_unmasked", "ce_stochastic", "ce_zero", "kl_ci", "kl_zero",
                      "ce_unrecovered"}
    assert m["kl_unmasked"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_unmasked"] == pytest.approx(m["ce_target"], abs=1e-5)
    assert m["kl_zero"] > 1e-6  # removing the whole MLP input changes the model
    assert m["ce_unrecovered"] == pytest.approx((m["ce_ci"] - m["ce_target"]) / (m["ce_zero"] - m["ce_target"]))
