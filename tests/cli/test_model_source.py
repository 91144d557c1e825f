"""The one model source every command shares: ``--model`` / ``--hf-config`` and :func:`load`."""

import argparse

import pytest

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource, load
from mechscope.core.config import ConfigError, add_config_arguments


def test_at_most_one_source_unless_one_is_required():
    from mechscope.cli.sites import SitesConfig

    assert ModelSource().model is None and ModelSource(model="mlp").model == "mlp"
    with pytest.raises(ConfigError, match="give at most one of --model and --hf-config"):
        ModelSource(model="mlp", hf_config="{}")
    with pytest.raises(ConfigError, match="give exactly one of --model NAME or --hf-config PATH_OR_JSON"):
        SitesConfig()


def test_every_model_command_shares_the_options_and_rewords_their_help():
    from mechscope.cli.probe import ProbeConfig
    from mechscope.cli.reft import ReftConfig
    from mechscope.cli.sites import SitesConfig
    from mechscope.cli.steer import SteerConfig

    helps = {}
    for cls in (SitesConfig, ProbeConfig, SteerConfig, ReftConfig):
        assert issubclass(cls, ModelSource) and cls.field_names()[:2] == ["model", "hf_config"]
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, cls)
        helps[cls.__name__] = " ".join(parser.format_help().split())
    assert "a built-in model (default: steering_toy)" in helps["SteerConfig"]
    assert "a built-in model (default: instructions)" in helps["ReftConfig"]
    assert "a built-in model (default: the dataset's own)" in helps["ProbeConfig"]
    assert "a Hugging Face config.json path, or its JSON text, with model_type" in helps["SitesConfig"]


def test_load_resolves_names_in_one_place():
    model, tokenizer = load(ModelSource(model="mlp"))
    assert tokenizer is None and not model.training
    default, _ = load(ModelSource(), default="transformer")
    assert type(default).__name__ == "Transformer"
    with pytest.raises(UsageError, match="unknown model 'gpt7'; valid: .*mlp"):
        load(ModelSource(model="gpt7"))


def test_a_built_in_or_config_model_takes_dtype_and_device():
    """--dtype and --device apply to every source, not only to checkpoints loaded from disk."""
    import json

    import torch

    model, _ = load(ModelSource(model="transformer", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    config = json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50,
                         "n_positions": 8})
    model, _ = load(ModelSource(hf_config=config, dtype="float16", device="auto"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("source", [ModelSource(model="transformer", device="cuda"),
                                    ModelSource(model="gpt7", device="cuda:1"), ModelSource(device="cuda")])
def test_a_device_torch_cannot_use_is_refused_before_loading(source):
    with pytest.raises(UsageError, match=r"--device cuda(:1)?: device='cuda(:1)?', but torch sees no CUDA device"):
        load(source, default="mlp")


def test_a_device_name_torch_does_not_know_is_refused():
    with pytest.raises(UsageError, match="--device tpu: device 'tpu' is not supported"):
        load(ModelSource(model="mlp", device="tpu"))


def test_compute_device_gives_each_torchrun_rank_its_own_gpu(monkeypatch):
    import torch

    from mechscope.cli.model_source import compute_device

    assert compute_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert compute_device("auto") == "cuda" and compute_device("cuda:1") == "cuda:1"  # one process
    for rank, local in ((0, 0), (3, 3)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert compute_device("cuda") == f"cuda:{local % 2}"  # round-robin over the GPUs
        assert compute_device("cuda:1") == "cuda:1"  # an explicit GPU is kept
