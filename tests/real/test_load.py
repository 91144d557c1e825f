"""load_model on local directories, its errors, the reference-model cache (with the GGUF
conversion stood in for), and model_record. No download, no reference package needed."""

import hashlib
import json
import socket
import sys
import types

import pytest
import torch
from real_helpers import tiny_llama

from mechscope.core import load
from mechscope.core.load import ModelLoadError, load_model, model_record


def test_directory_loads_frozen_eval_model_and_tokenizer(model_dir, tokenizer):
    model, tok = load_model(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert len(tok) == len(tokenizer)
    assert tok("When Mary went")["input_ids"] == tokenizer("When Mary went")["input_ids"]
    reference = tiny_llama(len(tokenizer))
    ids = torch.tensor([tok("When Mary and John went to the store")["input_ids"]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_dtype_and_attention_options(model_dir):
    model, _ = load_model(model_dir, dtype="bfloat16", attn="eager", tokenizer=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match="dtype 'float64' is not supported"):
        load_model(model_dir, dtype="float64")
    with pytest.raises(ModelLoadError, match="device 'tpu' is not supported"):
        load_model(model_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            load_model(model_dir, device="cuda")


def test_not_a_model_directory_nor_gguf(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"neither a Hugging Face model directory nor a GGUF file.*config\.json"):
        load_model(empty)
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match=r"weights\.bin is neither .* GGUF magic"):
        load_model(junk)
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(tmp_path / "missing" / "model.gguf")


def test_config_without_weights(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"config\.json has no weights beside it.*model\.safetensors"):
        load_model(tmp_path)


def test_tokenizer_vocabulary_must_fit_the_embedding(tmp_path, tokenizer):
    tiny_llama(len(tokenizer) - 5).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"tokenizer has {len(tokenizer)} tokens but the model's embedding "
                                             rf"has {len(tokenizer) - 5} rows"):
        load_model(tmp_path)


def test_missing_tokenizer_files(tmp_path, tokenizer, model_dir):
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_model(tmp_path)
    _model, tok = load_model(tmp_path, tokenizer=model_dir)
    assert len(tok) == len(tokenizer)
    assert load_model(tmp_path, tokenizer=False)[1] is None


def test_hub_name_needs_allow_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    attempts = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelLoadError, match=r"downloads are disabled; pass allow_download=True \(--download"):
        load_model("some-org/some-model")
    assert attempts == []  # local_files_only everywhere, the PEFT adapter lookup included


def test_builtin_hook_is_asked_first(model_dir):
    sentinel = (torch.nn.Linear(1, 1), None)
    assert load_model("induction", resolve_builtin=lambda s: sentinel if s == "induction" else None) is sentinel
    model, _ = load_model(model_dir, resolve_builtin=lambda s: None)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_model_record_of_a_directory(model_dir):
    model, _ = load_model(model_dir, dtype="bfloat16")
    rec = model_record(model_dir, model)
    want = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert rec["model_sha256"] == want and rec["model_files"] == {"model.safetensors": want}
    assert rec["dtype"] == "bfloat16" and rec["source"] == "directory"
    assert rec["torch"] == torch.__version__ and rec["transformers"]
    assert "gguf" in rec
    json.dumps(rec)


@pytest.fixture
def fake_reference(monkeypatch, tmp_path, model_dir):
    """The reference model's package and its GGUF conversion stood in for by the tiny model."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    pkg = types.ModuleType("fake_reference_pkg")
    pkg.EXPECTED_SHA256 = "ab" * 32
    pkg.assemble = lambda: gguf
    monkeypatch.setitem(sys.modules, "fake_reference_pkg", pkg)
    monkeypatch.setitem(load.REFERENCE_MODELS, "tiny-ref", ("fake_reference_pkg", "tiny-ref-cache"))
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    conversions = []

    def convert(path, options, tokenizer):
        conversions.append(path)
        return load._load_directory(model_dir, options, tokenizer)

    monkeypatch.setattr(load, "_load_gguf", convert)
    return pkg, conversions


def test_reference_cache_written_once_and_verified(fake_reference, tmp_path, tokenizer):
    pkg, conversions = fake_reference
    model, tok = load_model("tiny-ref")
    assert len(conversions) == 1 and not model.training and len(tok) == len(tokenizer)
    cache = tmp_path / "cache" / "tiny-ref-cache"
    meta = json.loads((cache / "mechscope.json").read_text())
    assert meta["gguf_sha256"] == pkg.EXPECTED_SHA256
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny-ref-cache"]  # no temp dirs left
    again, _ = load_model("tiny-ref", dtype="bfloat16")
    assert len(conversions) == 1  # read from the cache
    assert next(again.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[2, 5, 6, 7]])
    assert torch.allclose(again.float()(ids).logits, model(ids).logits, atol=0.1)
    assert model_record("tiny-ref", model)["model_sha256"] == pkg.EXPECTED_SHA256
    pkg.EXPECTED_SHA256 = "cd" * 32  # another GGUF installed: the cache is rebuilt
    load_model("tiny-ref")
    assert len(conversions) == 2
    assert json.loads((cache / "mechscope.json").read_text())["gguf_sha256"] == "cd" * 32


def test_reference_package_missing(monkeypatch):
    monkeypatch.setitem(load.REFERENCE_MODELS, "absent-ref", ("no_such_package_here", "x"))
    with pytest.raises(ModelLoadError, match=r"pip install 'mechscope\[real\]'"):
        load_model("absent-ref")
