"""Nothing reaches the Hugging Face Hub while mechscope builds or loads a model unless asked:
attention implementations that would fetch a kernel are refused, and the load runs offline
even where huggingface_hub was imported before (tests run without network)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from mechscope.core.hub import (
    HubAccessError,
    check_attn_implementation,
    check_config_attention,
    hub_offline,
)

transformers = pytest.importorskip("transformers")
hub_constants = pytest.importorskip("huggingface_hub.constants")

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 40, "n_positions": 16,
        "bos_token_id": 0, "eos_token_id": 0}


def test_only_local_attention_implementations_pass():
    for name in (None, "eager", "sdpa", "flex_attention"):
        check_attn_implementation(name, "cfg")
    with pytest.raises(HubAccessError, match="'kernels-community/flash-attn' is a Hub kernel repository"):
        check_attn_implementation("kernels-community/flash-attn", "cfg")
    with pytest.raises(HubAccessError, match="not an attention implementation"):
        check_attn_implementation("fastest", "cfg")
    if importlib.util.find_spec("flash_attn") is None:  # transformers would fall back to a Hub kernel
        with pytest.raises(HubAccessError, match="needs the flash_attn package"):
            check_attn_implementation("flash_attention_2", "cfg")
    with pytest.raises(HubAccessError, match="Hub kernel"):  # a nested sub-config is checked too
        check_config_attention({"text_config": {"_attn_implementation": "org/kernel"}}, "cfg")


def test_a_hub_kernel_in_a_config_is_refused_before_transformers_sees_it(monkeypatch):
    from mechscope.core.models import hf_model_from_config

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to build the config")

    monkeypatch.setattr(transformers.AutoConfig, "for_model", never)
    with pytest.raises(HubAccessError, match="Hub kernel repository"):
        hf_model_from_config({**GPT2, "attn_implementation": "kernels-community/flash-attn"})


def test_offline_holds_where_huggingface_hub_was_imported_first(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # as read at its import, online
    with hub_offline():
        assert hub_constants.is_offline_mode()
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub_constants.is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ
    with hub_offline(allow_download=True):
        assert not hub_constants.is_offline_mode()


def _offline_during(monkeypatch, cls, name):
    seen = []
    original = getattr(cls, name)

    def spy(*args, **kwargs):
        seen.append(hub_constants.is_offline_mode())
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    return seen


def test_building_and_loading_run_offline(tmp_path, monkeypatch):
    from mechscope.core.load import load_model
    from mechscope.core.models import hf_model_from_config

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    auto = transformers.AutoModelForCausalLM
    built = _offline_during(monkeypatch, auto, "from_config")
    model = hf_model_from_config(GPT2)
    assert built == [True] and not hub_constants.is_offline_mode()
    model.save_pretrained(tmp_path)
    loaded = _offline_during(monkeypatch, auto, "from_pretrained")
    load_model(tmp_path, tokenizer=False)
    assert loaded == [True] and not hub_constants.is_offline_mode()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_attn_implementation": "kernels-community/x"}))
    with pytest.raises(HubAccessError, match="config.json: attn_implementation 'kernels-community/x'"):
        load_model(tmp_path, tokenizer=False)
    with pytest.raises(HubAccessError, match="load_model\\(attn=...\\)"):
        load_model(tmp_path, attn="kernels-community/x", tokenizer=False)


def test_the_command_line_refuses_a_hub_kernel_and_shortens_an_unknown_model_type(capsys):
    from mechscope.cli import main

    assert main(["sites", "--hf-config", json.dumps({**GPT2, "attn_implementation": "kernels-community/flash-attn"})]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a Hub kernel repository" in err and "Traceback" not in err
    assert main(["sites", "--hf-config", json.dumps({"model_type": "lama"})]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not know model_type 'lama' (did you mean llama" in err
    assert len(err) < 300
