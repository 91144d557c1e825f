"""CE loss recovered, spliced into the model through core interventions: 1 for an exact
dictionary, 0 for one that outputs zeros; an exact transcoder of a ReLU MLP recovers 1."""

import pytest
import torch

from mechscope.core.batch import collate
from mechscope.core.site import Site
from mechscope.sae.arch import SAE, SAEConfig, SAEError
from mechscope.sae.splice import ce_loss_recovered, next_token_loss
from mechscope.zoo import build


def _exact_sae(d: int) -> SAE:
    """d_sae = 2d, W_enc = [I, -I]: ReLU keeps both signs, the reconstruction is exact."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, arch="relu"))
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval()


def _batches(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=gen) for _ in range(n)]


def test_exact_dictionary_recovers_everything_and_zeros_nothing():
    model = build("transformer", seed=0)
    site = Site("blocks.0")
    exact = ce_loss_recovered(model, _batches(), site, _exact_sae(64))
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_score"] == pytest.approx(1.0, abs=1e-4) and abs(exact["delta_loss"]) < 1e-4
    zero = _exact_sae(64)
    with torch.no_grad():
        zero.W_dec.zero_()
    r = ce_loss_recovered(model, _batches(), site, zero)
    assert r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablation"], abs=1e-5)
    assert r["n_positions"] == 3 * 4 * 11


def test_padding_is_not_scored():
    model = build("transformer", seed=0)
    batch = collate([[1, 2, 3, 4], [5, 6]], side="right")
    losses, logits = next_token_loss(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}), batch)
    assert losses.shape == (3 + 1,) and logits.shape == (4, 64)


def test_exact_transcoder_of_a_relu_mlp():
    model = build("transformer", seed=0, act="relu")
    mlp = model.blocks[1].mlp
    tc = SAE(SAEConfig(d_in=64, d_sae=256, arch="relu", kind="transcoder", d_out=64))
    with torch.no_grad():  # the MLP *is* a ReLU transcoder: fc_out(relu(fc_in(x)))
        tc.W_enc.copy_(mlp.fc_in.weight.T), tc.b_enc.copy_(mlp.fc_in.bias)
        tc.W_dec.copy_(mlp.fc_out.weight.T), tc.b_dec.copy_(mlp.fc_out.bias)
    r = ce_loss_recovered(model, _batches(), Site("blocks.1.mlp"), tc.eval(), input_site=Site("blocks.1.mlp", io="input"))
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(SAEError, match="give input_site="):
        ce_loss_recovered(model, _batches(), Site("blocks.1.mlp"), tc)


def test_a_loss_that_ignores_the_site_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    constant = lambda output, inputs: (torch.zeros(6), torch.zeros(6, 64))  # noqa: E731
    with pytest.raises(SAEError, match="does not change the loss"):
        ce_loss_recovered(model, [torch.zeros(2, 3, 64)], Site("0"), _exact_sae(64), loss_fn=constant)
