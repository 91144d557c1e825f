"""Ways to damage a file, as hypothesis strategies, and the one check every loader must pass.

Byte damage (:func:`byte_damage`): a truncation anywhere, or one flipped bit anywhere or
(for safetensors) in the header, where a flip changes meaning rather than a weight.
Structural damage of a JSON document (:func:`json_damage`): one field (at any depth)
deleted or its value replaced by one of another type (null, a string, a negative or
huge number, a float, a bool, a list, an object, the value's own text).

:func:`load_or_typed_error` runs a loader: it may succeed (the caller then checks that
nothing was silently lost) or raise a ``ValueError`` subclass defined by mechscope with a
one-line message; any other exception (``KeyError``, ``TypeError``, ``json`` or
safetensors errors, a plain ``ValueError`` from a library) fails the property.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from typing import Any, Callable

from hypothesis import settings
from hypothesis import strategies as st

_REPLACEMENTS: dict[str, Callable[[Any], Any]] = {
    "null": lambda v: None,
    "string": lambda v: "x",
    "text of it": lambda v: json.dumps(v) if not isinstance(v, str) else v + "x",
    "negative": lambda v: -1,
    "huge": lambda v: 10**20,
    "float": lambda v: 1.5,
    "bool": lambda v: True,
    "list": lambda v: [],
    "object": lambda v: {},
    "wrapped": lambda v: [v],
}


def examples(n: int) -> settings:
    """``n`` examples in CI; 25 times as many under ``HYPOTHESIS_PROFILE=thorough`` (a test's
    own ``max_examples`` would otherwise override the profile's)."""
    return settings(max_examples=n * (25 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 1))


def flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def byte_damage(data: bytes, header: int | None = None) -> st.SearchStrategy[tuple[str, bytes]]:
    """``(what was done, damaged bytes)``: a truncation or a bit flip; with ``header`` (its length
    in bytes from the start) flips there are drawn as often as flips anywhere."""
    n = len(data)
    cut = st.integers(0, n - 1).map(lambda k: (f"truncated to {k} of {n} bytes", data[:k]))
    anywhere = st.tuples(st.integers(0, n - 1), st.integers(0, 7))
    where = st.one_of(anywhere, st.tuples(st.integers(0, header - 1), st.integers(0, 7))) if header else anywhere
    flipped = where.map(lambda p: (f"bit {p[1]} of byte {p[0]} flipped", flip(data, *p)))
    return st.one_of(cut, flipped)


def safetensors_header_end(data: bytes) -> int:
    """Bytes of a safetensors file's length prefix and JSON header."""
    return 8 + struct.unpack("<Q", data[:8])[0]


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: a key of an object or an index of a list, at any depth."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append(prefix + (key,))
        out += json_paths(child, prefix + (key,))
    return out


def damaged_json(doc: Any, path: tuple, how: str) -> Any:
    out = copy.deepcopy(doc)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = _REPLACEMENTS[how](parent[path[-1]])
    return out


def json_damage(doc: Any) -> st.SearchStrategy[tuple[str, Any]]:
    """``(what was done, damaged document)``: one field deleted or given another type."""
    hows = ["delete", *_REPLACEMENTS]
    return st.tuples(st.sampled_from(json_paths(doc)), st.sampled_from(hows)).map(
        lambda p: (f"{p[1]} at {list(p[0])}", damaged_json(doc, *p)))


def load_or_typed_error(load: Callable[[], Any], what: str) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, error)`` for a mechscope error with a one-line message;
    any other exception fails, naming the damage ``what``."""
    try:
        return True, load()
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions escape
        ours = isinstance(e, ValueError) and type(e).__module__.split(".")[0] == "mechscope"
        if not ours:
            raise AssertionError(f"{what}: {type(e).__module__}.{type(e).__name__} escaped: {e}") from e
        assert "\n" not in str(e).strip(), f"{what}: the message is not one line: {e}"
        return False, e


class Written:
    """What a fixture wrote (its directory, its contents as read back), with a short repr
    so that hypothesis' report of a failing example stays readable."""

    def __init__(self, name: str, **parts: Any) -> None:
        self.name = name
        self.__dict__.update(parts)

    def __repr__(self) -> str:
        return f"<{self.name}>"
