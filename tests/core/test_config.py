from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

import pytest

from mechscope.core.config import (
    Config,
    ConfigError,
    add_config_arguments,
    config,
    config_from_args,
    param,
    parse_text,
)


@config
class Inner(Config):
    width: int = param(4, help="hidden width")


@config
class ProbeConfig(Config):
    layer: int = param(help="block whose output is probed")
    lr: float = param(1e-3, help="learning rate")
    kind: Literal["linear", "mlp"] = param("linear", help="probe family")
    dims: tuple[int, ...] = param((8, 16), help="subspace sizes")
    pair: tuple[str, float] = param(("a", 1.0), help="a fixed pair")
    balanced: bool = param(True, help="balance the classes")
    verbose: bool = param(False, help="say more")
    name: Optional[str] = param(None, help="run name")
    path: Path = param(Path("out"), help="where to write")
    inner: Inner = param(default_factory=Inner, help="nested")
    secret: int = param(7, help="not on the command line", cli=False)


@config
class Ranged(Config):
    low: float = 0.0
    high: float = 1.0

    def validate(self) -> None:
        if self.low > self.high:
            raise ConfigError(f"Ranged: low ({self.low}) must be <= high ({self.high})")


def test_config_is_frozen_dataclass():
    cfg = ProbeConfig(layer=1)
    assert dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer = 2  # type: ignore[misc]


def test_config_decorator_requires_config_base():
    with pytest.raises(TypeError, match="subclass of mechscope.core.config.Config"):
        @config
        class NotAConfig:
            x: int = 1


def test_unknown_field_names_nearest_and_lists_valid():
    with pytest.raises(ConfigError) as err:
        ProbeConfig.from_dict({"layer": 1, "lrr": 0.1})
    text = str(err.value)
    assert "'lrr'" in text
    assert "did you mean 'lr'" in text
    for name in ("layer", "lr", "kind", "dims", "balanced", "inner"):
        assert name in text
    assert isinstance(err.value, ValueError)


def test_unknown_field_without_close_match_still_lists_fields():
    with pytest.raises(ConfigError, match=r"has no field 'zzzzzz'; valid fields: layer, lr"):
        ProbeConfig.from_dict({"layer": 1, "zzzzzz": 0})


def test_missing_required_field():
    with pytest.raises(ConfigError, match="missing required field.*layer"):
        ProbeConfig.from_dict({})


@pytest.mark.parametrize("field,value,expected", [
    ("layer", "3", r"ProbeConfig\.layer: expected int, got str '3'"),
    ("layer", True, r"ProbeConfig\.layer: expected int, got bool"),
    ("layer", 1.5, r"ProbeConfig\.layer: expected int, got float"),
    ("lr", "fast", r"ProbeConfig\.lr: expected float, got str"),
    ("kind", "cnn", r"ProbeConfig\.kind: expected one of 'linear', 'mlp', got 'cnn'"),
    ("dims", [1, "2"], r"ProbeConfig\.dims\[1\]: expected int, got str"),
    ("dims", 5, r"ProbeConfig\.dims: expected tuple\[int, \.\.\.\], got int"),
    ("pair", ["a"], r"ProbeConfig\.pair: expected 2 items"),
    ("balanced", 1, r"ProbeConfig\.balanced: expected bool, got int"),
    ("name", 3, r"ProbeConfig\.name: expected str \| None, got int"),
    ("inner", {"widht": 3}, r"Inner has no field 'widht' \(did you mean 'width'\?\)"),
])
def test_type_errors_are_clear(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        ProbeConfig.from_dict({"layer": 1, field: value})


def test_lossless_coercions():
    cfg = ProbeConfig.from_dict({"layer": 2, "lr": 1, "dims": [4, 8], "path": "x/y",
                                 "inner": {"width": 9}, "pair": ["b", 2]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.dims == (4, 8)
    assert cfg.path == Path("x/y")
    assert cfg.inner == Inner(width=9)
    assert cfg.pair == ("b", 2.0)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="ProbeConfig.layer"):
        ProbeConfig(layer="one")  # type: ignore[arg-type]


def test_validate_hook_for_cross_field_rules():
    assert Ranged.from_dict({"low": 0.2}).low == 0.2
    with pytest.raises(ConfigError, match=r"low \(2.0\) must be <= high"):
        Ranged.from_dict({"low": 2})


def test_to_dict_and_json_round_trip():
    cfg = ProbeConfig.from_dict({"layer": 3, "dims": [1, 2], "name": "run", "inner": {"width": 2}})
    data = cfg.to_dict()
    assert data["dims"] == [1, 2] and data["path"] == "out" and data["inner"] == {"width": 2}
    json.dumps(data)  # plain JSON values
    assert ProbeConfig.from_dict(data) == cfg
    assert ProbeConfig.from_json(cfg.to_json()) == cfg


def test_from_json_rejects_bad_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ProbeConfig.from_json("{layer: 1")


def test_replace_validates():
    cfg = ProbeConfig(layer=1)
    assert cfg.replace(lr=0.5).lr == 0.5
    with pytest.raises(ConfigError, match="did you mean 'layer'"):
        cfg.replace(layr=2)
    with pytest.raises(ConfigError, match="expected int"):
        cfg.replace(layer="2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_config_arguments(parser, ProbeConfig)
    return parser


def test_cli_options_generated_from_fields():
    parser = _parser()
    help_text = parser.format_help()
    for option in ("--layer", "--lr", "--kind", "--dims", "--balanced", "--no-balanced",
                   "--verbose", "--no-verbose", "--name", "--path"):
        assert option in help_text
    assert "--secret" not in help_text and "--inner" not in help_text
    assert "learning rate (default: 0.001)" in help_text
    assert "{linear,mlp}" in help_text
    assert "subspace sizes (default: 8,16)" in help_text
    # the spelling that changes the default is the one usage shows
    assert "[--no-balanced]" in parser.format_usage() and "[--verbose]" in parser.format_usage()


def test_cli_defaults_come_from_the_dataclass():
    cfg = config_from_args(ProbeConfig, _parser().parse_args(["--layer", "2"]))
    assert cfg == ProbeConfig(layer=2)


def test_cli_values_parse_to_field_types():
    args = _parser().parse_args(["--layer", "5", "--lr", "0.1", "--kind", "mlp", "--dims", "3, 4,5",
                                 "--pair", "z,0.5", "--no-balanced", "--verbose", "--name", "none",
                                 "--path", "a/b"])
    cfg = config_from_args(ProbeConfig, args)
    assert cfg == ProbeConfig(layer=5, lr=0.1, kind="mlp", dims=(3, 4, 5), pair=("z", 0.5),
                              balanced=False, verbose=True, name=None, path=Path("a/b"))


@pytest.mark.parametrize("argv,message", [
    (["--lr", "1"], "the following arguments are required: --layer"),
    (["--layer", "x"], "argument --layer: expected int, got 'x'"),
    (["--layer", "1", "--kind", "cnn"], "argument --kind: expected one of linear, mlp"),
    (["--layer", "1", "--dims", "1,a"], "argument --dims: expected int, got 'a'"),
])
def test_cli_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_prefix_and_exclude():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Inner, prefix="inner_")
    add_config_arguments(parser, ProbeConfig, exclude=("path",))
    args = parser.parse_args(["--inner-width", "3", "--layer", "1"])
    assert config_from_args(Inner, args, prefix="inner_") == Inner(width=3)
    assert "--path" not in parser.format_help()


def test_parse_text_empty_sequence_and_optional():
    assert parse_text("", tuple[int, ...]) == ()
    assert parse_text("None", Optional[int]) is None
    assert parse_text("4", Optional[int]) == 4


@config
class Bounded(Config):
    steps: int = param(10, ge=1, help="training steps")
    lr: float = param(0.1, gt=0, le=1, help="learning rate")
    sizes: tuple[int, ...] = param((4, 8), ge=2, help="sizes")
    limit: Optional[int] = param(None, ge=0, help="optional limit")


@config
class Reworded(Bounded):
    FIELD_HELP = {"steps": "optimiser steps of this command"}


def test_declared_bounds_are_checked_when_built():
    assert Bounded(limit=0).limit == 0 and Bounded(limit=None).limit is None
    with pytest.raises(ConfigError, match=r"Bounded.steps must be >= 1, got 0"):
        Bounded(steps=0)
    with pytest.raises(ConfigError, match=r"Bounded.lr must be > 0, <= 1, got 0.0"):
        Bounded.from_dict({"lr": 0})
    with pytest.raises(ConfigError, match=r"Bounded.sizes must be >= 2, got 1"):
        Bounded(sizes=(4, 1))
    with pytest.raises(ConfigError, match=r"Bounded.steps must be >= 1"):
        Bounded().replace(steps=-3)


def test_bounds_show_in_help_and_errors_name_the_option(capsys):
    parser = argparse.ArgumentParser(prog="t")
    add_config_arguments(parser, Bounded, prefix="b_")
    text = " ".join(parser.format_help().split())
    assert "training steps (>= 1; default: 10)" in text and "learning rate (> 0, <= 1; default: 0.1)" in text
    with pytest.raises(ConfigError, match=r"^--b-steps must be >= 1, got 0$"):
        config_from_args(Bounded, parser.parse_args(["--b-steps", "0"]), prefix="b_")


def test_a_subclass_rewords_an_inherited_fields_help():
    parser = argparse.ArgumentParser(prog="t")
    add_config_arguments(parser, Reworded)
    text = " ".join(parser.format_help().split())
    assert "optimiser steps of this command (>= 1; default: 10)" in text
    with pytest.raises(ConfigError, match="Reworded.steps must be >= 1"):
        Reworded(steps=0)
