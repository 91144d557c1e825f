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
