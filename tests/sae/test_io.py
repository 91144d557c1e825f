"""Saving and loading: mechscope's own file and the SAELens layout (cfg.json + safetensors),
round trips for every architecture, files written the way SAELens writes them, and
files that cannot be loaded faithfully."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mechscope.core.checkpoint import CheckpointError
from mechscope.sae.arch import SAEError
from mechscope.sae.io import load_sae, read_sae_metadata, save_sae
from mechscope.sae.saelens import load_saelens, save_saelens
from tests.sae.conftest import make_sae

ROUND_TRIP = [("relu", "sae"), ("topk", "sae"), ("jumprelu", "sae"), ("batchtopk", "sae"), ("matryoshka", "sae"),
              ("relu", "transcoder"), ("relu", "skip_transcoder"), ("jumprelu", "transcoder")]


@pytest.mark.parametrize("arch,kind", ROUND_TRIP)
def test_saelens_round_trip(tmp_path, arch, kind):
    sae = make_sae(arch, kind, d_out=None if kind == "sae" else 6)
    out = save_saelens(tmp_path / "sae", sae, hook_name="blocks.3.hook_resid_post", model_name="toy")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["d_sae"] == 32
    loaded, cfg2 = load_saelens(out)
    x = torch.randn(50, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), sae(x), atol=1e-6)
    if arch in ("batchtopk", "matryoshka"):
        assert cfg["architecture"] == "jumprelu" and loaded.cfg.arch == "jumprelu"


def test_a_file_written_the_way_saelens_writes_it(tmp_path):
    """A 'standard' SAE in bf16 with apply_b_dec_to_input false, computed by hand as SAELens does."""
    gen = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(8, 32, generator=gen), torch.randn(32, 8, generator=gen)
    b_enc, b_dec = torch.randn(32, generator=gen), torch.randn(8, generator=gen)
    state = {k: v.to(torch.bfloat16) for k, v in dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec).items()}
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": 8, "d_sae": 32, "dtype": "bfloat16", "device": "cuda",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.8.hook_resid_pre", "sae_lens_version": "6.5.1"}}))
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    sae, cfg = load_saelens(tmp_path)
    w = {k: v.float() for k, v in state.items()}
    x = torch.randn(20, 8)
    f = torch.relu(x @ w["W_enc"] + w["b_enc"])  # SAELens: no b_dec subtracted when the flag is false
    with torch.no_grad():
        assert torch.allclose(sae(x), f @ w["W_dec"] + w["b_dec"], atol=1e-4)
    assert sae.W_enc.dtype == torch.float32 and cfg["metadata"]["sae_lens_version"] == "6.5.1"


def test_jumprelu_and_scaling_factor_from_saelens(tmp_path):
    sae = make_sae("jumprelu")
    save_saelens(tmp_path, sae)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="norm_scaling_factor="):
        load_saelens(tmp_path)
    scaled, _ = load_saelens(tmp_path, norm_scaling_factor=2.5)
    x = torch.randn(30, 8)
    with torch.no_grad():
        assert torch.allclose(scaled(x), sae(2.5 * x) / 2.5, atol=1e-5)


def test_files_that_cannot_load_faithfully(tmp_path):
    with pytest.raises(CheckpointError, match="no cfg.json"):
        load_saelens(tmp_path)
    save_saelens(tmp_path, make_sae("relu"))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for change, message in [({"architecture": "gated"}, "'gated' is not supported"),
                            ({"normalize_activations": "layer_norm"}, "rescales every input at run time"),
                            ({"d_sae": 16}, "does not match its cfg.json")]:
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises((SAEError, CheckpointError), match=message):
            load_saelens(tmp_path)
    with pytest.raises(SAEError, match="no inference architecture"):
        save_saelens(tmp_path / "x", make_sae("topk", "transcoder", d_out=4))


def test_own_format_round_trip_with_metadata_and_half_precision(tmp_path):
    sae = make_sae("topk", "skip_transcoder", d_out=6)
    save_sae(tmp_path / "a.safetensors", sae, extra={"site": "blocks.1.mlp", "history": [1, 2]})
    back = load_sae(tmp_path / "a.safetensors")
    x = torch.randn(10, 8)
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))
    assert read_sae_metadata(tmp_path / "a.safetensors")["site"] == "blocks.1.mlp"
    save_sae(tmp_path / "h.safetensors", make_sae("jumprelu"), dtype=torch.float16)
    half = load_sae(tmp_path / "h.safetensors")
    assert half.W_enc.dtype == torch.float32 and half.threshold.dtype == torch.float32
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_sae(tmp_path / "bad.safetensors")


def test_written_files_follow_the_umask(tmp_path):
    """core.checkpoint fix: safetensors writes its file 0600; package data must stay readable (0644 under umask 022)."""
    import os

    from mechscope.core.checkpoint import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
        save_sae(tmp_path / "s.safetensors", make_sae("topk"))
    finally:
        os.umask(old)
    for name in ("t.safetensors", "s.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
