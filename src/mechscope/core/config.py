"""Frozen configs: validated at load, serialisable, and the single source of CLI options.

A config is a frozen dataclass that subclasses :class:`Config`::

    @config
    class ProbeConfig(Config):
        layer: int = param(1, help="block whose output is probed")
        lr: float = param(1e-3, help="learning rate")
        kind: Literal["linear", "mlp"] = param("linear", help="probe family")
        dims: tuple[int, ...] = param((8, 16), help="subspace sizes to try")

    cfg = ProbeConfig.from_dict({"layer": 2})      # unknown keys are a ConfigError
    ProbeConfig.from_json(cfg.to_json()) == cfg     # JSON round trip

Field types are checked when the object is built (``int``, ``float``, ``str``, ``bool``,
``pathlib.Path``, ``Optional[X]``, ``Literal[...]``, ``tuple[X, ...]``, ``list[X]``,
``dict[str, X]`` and nested configs). Other annotations are accepted unchecked. A numeric
range is declared on the field, ``param(4, ge=1, help=...)`` (also ``gt``, ``le``, ``lt``;
None passes), checked when the object is built and shown in ``--help``. Cross-field
rules go in :meth:`Config.validate` (subclasses that define ``__post_init__`` must call
``super().__post_init__()``).

On the command line, :func:`add_config_arguments` adds one ``--field-name`` option per
field to an argparse parser and :func:`config_from_args` builds the config back from the
parsed namespace, so a config is the single source of a command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C", bound="Config")

_NO_DEFAULT: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A config was given a field it does not have, or a value of the wrong type."""


class BoundError(ConfigError):
    """A field's value is outside the range declared on it (``param(ge=..., ...)``).

    The message names the field as ``Owner.field``; :func:`config_from_args` says
    ``--field-name`` instead, the spelling the user typed."""

    def __init__(self, owner: str, field: str, value: Any, rule: str) -> None:
        self.owner, self.field, self.value, self.rule = owner, field, value, rule
        super().__init__(self.text(f"{owner}.{field}"))

    def text(self, name: str) -> str:
        return f"{name} must be {self.rule}, got {self.value}"


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def param(default: Any = _NO_DEFAULT, *, help: str = "", default_factory: Any = _NO_DEFAULT,
          cli: bool = True, metavar: str | None = None, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text; ``cli=False`` keeps it off the command line and
    ``metavar`` names its value in ``--help`` (default: derived from the type). ``ge``,
    ``gt``, ``le`` and ``lt`` bound a number (each item of a sequence); a value outside is a
    :class:`BoundError` when the config is built."""
    bounds = tuple((op, b) for op, b in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if b is not None)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "cli": cli, "metavar": metavar, "bounds": bounds})


def bounds_text(f: dataclasses.Field) -> str:
    """A field's declared range as text, e.g. ``>= 1`` or ``> 0, <= 1`` ('' when unbounded)."""
    return ", ".join(f"{_BOUNDS[op][0]} {b}" for op, b in f.metadata.get("bounds", ()))


def config(cls: type[C]) -> type[C]:
    """Make ``cls`` (a subclass of :class:`Config`) a frozen dataclass."""
    if not (isinstance(cls, type) and issubclass(cls, Config)):
        raise TypeError(f"@config expects a subclass of mechscope.core.config.Config, got {cls!r}; "
                        f"declare it as `class {getattr(cls, '__name__', 'X')}(Config): ...`")
    return dataclasses.dataclass(frozen=True)(cls)


class Config:
    """Base of every config: frozen dataclass subclasses get validation and (de)serialisation."""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            value = coerce(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
            object.__setattr__(self, f.name, value)
            _check_bounds(type(self).__name__, f, value)
        self.validate()

    def validate(self) -> None:
        """Override for rules that involve several fields; raise ConfigError when broken."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: typing.Mapping[str, Any]) -> C:
        """Build from a mapping; unknown and missing fields are errors that name the fix."""
        if not isinstance(data, typing.Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping of field names to values, "
                              f"got {type(data).__name__}")
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(unknown_field_message(cls.__name__, str(unknown[0]), names))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _is_required(f)]
        if missing:
            raise ConfigError(f"{cls.__name__} is missing required field(s) {', '.join(missing)}; "
                              f"give them a value (valid fields: {', '.join(names)})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: nested configs as dicts, tuples as lists, paths as strings."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated like ``from_dict``."""
        names = self.field_names()
        for key in changes:
            if key not in names:
                raise ConfigError(unknown_field_message(type(self).__name__, key, names))
        return dataclasses.replace(self, **changes)


def _check_bounds(owner: str, f: dataclasses.Field, value: Any) -> None:
    """Raise :class:`BoundError` when ``value`` (or an item of it) breaks ``f``'s declared range."""
    rules = f.metadata.get("bounds", ())
    if not rules or value is None:
        return
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
        for op, bound in rules:
            if item is not None and not _BOUNDS[op][1](item, bound):
                raise BoundError(owner, f.name, item, bounds_text(f))


def unknown_field_message(owner: str, bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{owner} has no field {bad!r}{hint}; valid fields: {', '.join(valid)}"


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (string annotations included), cached per class."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def describe(tp: Any) -> str:
    """A short human name for a type annotation, for error messages and CLI metavars."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(origin):
        return " | ".join("None" if a is type(None) else describe(a) for a in args)
    if origin in (tuple, list, dict):
        inner = ", ".join("..." if a is Ellipsis else describe(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _is_union(origin: Any) -> bool:
    import types
    return origin is Union or origin is getattr(types, "UnionType", None)


def _fail(where: str, tp: Any, value: Any) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ConfigError(f"{where}: expected {describe(tp)}, got {type(value).__name__} {shown}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it in canonical form.

    Lossless conversions only: int -> float, list -> tuple, str -> Path, dict -> nested config.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args if a == value):
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if _is_union(origin):
        return _coerce_union(value, args, where, tp)
    if origin in (tuple, list):
        return _coerce_sequence(value, origin, args, where, tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, tp, value)
        vt = args[1] if args else Any
        return {k: coerce(v, vt, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type):
        return _coerce_class(value, tp, where)
    return value  # an annotation we do not check (Callable, a TypeVar, ...)


def _coerce_union(value: Any, args: tuple, where: str, tp: Any) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _fail(where, tp, value)
    for arg in (a for a in args if a is not type(None)):
        try:
            return coerce(value, arg, where)
        except ConfigError:
            continue
    raise _fail(where, tp, value)


def _coerce_sequence(value: Any, origin: type, args: tuple, where: str, tp: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _fail(where, tp, value)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items ({describe(tp)}), got {len(value)}")
        items = [coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    else:
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_class(value: Any, tp: type, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value)
    elif isinstance(value, tp):
        return value
    raise _fail(where, tp, value)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value



# --------------------------------------------------------------------------- command line


class _Toggle(argparse.Action):
    """``--flag`` sets True, ``--no-flag`` sets False (one dest, one help line).

    The spelling that changes the default comes first, so usage shows ``[--no-fail]`` for a
    flag that is on by default and ``[--full]`` for one that is off.
    """

    def __init__(self, option_strings: list[str], dest: str, default: Any = False, **kwargs: Any) -> None:
        negated = [s.replace("--", "--no-", 1) for s in option_strings]
        spellings = negated + option_strings if default else option_strings + negated
        super().__init__(spellings, dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def option_name(name: str, prefix: str = "") -> str:
    """``field_name`` -> ``--field-name`` (``prefix`` is prepended to the field name)."""
    return "--" + (prefix + name).replace("_", "-")


def parse_text(text: str, tp: Any) -> Any:
    """Parse one command-line string as a value of annotation ``tp``.

    Sequences are comma-separated (``--dims 4,8,16``; an empty string is an empty
    sequence); ``none`` gives None for an Optional field.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(origin):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_text(text, arg)
            except (argparse.ArgumentTypeError, ValueError):
                continue
        raise argparse.ArgumentTypeError(f"expected {describe(tp)}, got {text!r}")
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(str(a) for a in args)}, got {text!r}")
    if origin in (tuple, list):
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise argparse.ArgumentTypeError(
                    f"expected {len(args)} comma-separated values ({describe(tp)}), got {text!r}")
            return tuple(parse_text(p, a) for p, a in zip(parts, args))
        item = args[0] if args else str
        values = [parse_text(p, item) for p in parts]
        return tuple(values) if origin is tuple else values
    return _parse_scalar(text, tp)


def _parse_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None
    if tp in (str, Path):
        return tp(text)
    raise argparse.ArgumentTypeError(f"a {describe(tp)} cannot be given on the command line")


def _cli_supported(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(origin):
        return all(a is type(None) or _cli_supported(a) for a in args)
    if origin in (tuple, list):
        return all(a is Ellipsis or _cli_supported(a) for a in args)
    return origin is Literal or tp in (bool, int, float, str, Path)


def _shown_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "(empty)"
    return str(value)


def field_help(cls: type[Config], f: dataclasses.Field) -> str:
    """A field's help text: ``cls.FIELD_HELP[name]`` where a config rewords a field it
    inherits (a shared field whose meaning depends on the command), else ``param(help=...)``."""
    return getattr(cls, "FIELD_HELP", {}).get(f.name, f.metadata.get("help", ""))


def cli_fields(cls: type[Config]) -> list[dataclasses.Field]:
    """The fields of ``cls`` that appear on the command line."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_config_arguments(parser: argparse.ArgumentParser | Any, cls: type[Config], *,
                         prefix: str = "", exclude: typing.Iterable[str] = ()) -> None:
    """Add one ``--field-name`` option per field of ``cls`` to an argparse parser or group.

    Help comes from ``param(help=...)``, defaults from the dataclass. Booleans become
    ``--flag/--no-flag``, Literals get ``choices``, tuples and lists are comma-separated.
    Fields whose type cannot be typed on a command line (nested configs, dicts) are left
    out and keep their defaults.
    """
    hints, skip = field_types(cls), set(exclude)
    for f in cli_fields(cls):
        if f.name in skip:
            continue
        tp, required = hints[f.name], _is_required(f)
        if not _cli_supported(tp):
            if required:
                raise TypeError(f"{cls.__name__}.{f.name}: a required {describe(tp)} field cannot be "
                                f"given on the command line; give it a default or param(cli=False)")
            continue
        default = None if required else (f.default if f.default is not dataclasses.MISSING
                                         else f.default_factory())
        text, rule = field_help(cls, f), bounds_text(f)
        if not required and "(default" not in text:
            shown = f"default: {_shown_default(default)}"
            text = f"{text} ({rule}; {shown})" if rule else f"{text} ({shown})"
        elif rule:
            text = f"{text} ({rule})"
        text = text.strip()
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "help": text.replace("%", "%%")}
        if tp is bool:
            parser.add_argument(option_name(f.name, prefix), action=_Toggle, default=default, **kwargs)
            continue
        parser.add_argument(option_name(f.name, prefix), type=_typed(tp), default=default,
                            required=required,
                            metavar=f.metadata.get("metavar") or _metavar(tp), **kwargs)


def _metavar(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if _is_union(origin):
        return "|".join("none" if a is type(None) else _metavar(a) for a in args)
    if origin in (tuple, list):
        if args and args[-1] is not Ellipsis:
            return ",".join(_metavar(a) for a in args)
        item = _metavar(args[0]) if args else "STR"
        return f"{item}[,{item}...]"
    return getattr(tp, "__name__", "value").upper()


def _typed(tp: Any) -> Any:
    def convert(text: str) -> Any:
        return parse_text(text, tp)
    convert.__name__ = describe(tp)
    return convert


def config_from_args(cls: type[C], namespace: argparse.Namespace, *, prefix: str = "") -> C:
    """Build ``cls`` from a namespace parsed with :func:`add_config_arguments`."""
    data = {f.name: getattr(namespace, prefix + f.name) for f in cli_fields(cls)
            if hasattr(namespace, prefix + f.name)}
    try:
        return cls.from_dict(data)
    except BoundError as e:  # name the option the user typed, not the field
        if e.owner != cls.__name__ or e.field not in data:
            raise
        raise ConfigError(e.text(option_name(e.field, prefix))) from None


__all__ = ["Config", "ConfigError", "BoundError", "config", "param", "add_config_arguments", "config_from_args",
           "option_name", "parse_text", "cli_fields", "field_help", "bounds_text", "coerce", "describe",
           "field_types"]
