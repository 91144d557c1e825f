"""Sites: where in a real model an activation is read or written.

A :class:`Site` is a small frozen value. It names a module by its own path in
``model.named_modules()``, says whether the activation is the module's input or output
(and which element of a tuple / keyword argument), and optionally narrows it to
positions, attention heads or feature indices. Sites print, compare, hash and round-trip
through JSON; they hold no reference to a model.

The *view* of a site is the part of the activation it names. Its shape is the
activation's shape with the narrowed dimensions replaced:

- positions narrow dim 1 of a ``[batch, pos, ...]`` activation to ``[batch, n, ...]``
  (an ``int`` keeps the dim, with ``n = 1``, so every view is ``[batch, n, ...]``);
- heads split the last dim into ``[n_heads, d_head]`` and keep the chosen heads;
- features keep chosen indices of the last dim (of the head dim when heads are given).

Positions count *real tokens*: when the batch has an attention mask they are resolved
per example against it, so position 0 is each example's first real token and -1 its
last, whether the batch was padded on the left or on the right.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor

# A position function maps (lengths [batch], starts [batch], seq_len) of the batch's
# real tokens to absolute indices [batch, n] into the padded sequence. Named ones
# serialise; anonymous ones cannot.
PositionFn = Callable[[Tensor, Tensor, int], Tensor]
PositionSpec = Union[None, int, slice, tuple, str, Callable]

_POSITION_FNS: dict[str, PositionFn] = {}


class SiteError(ValueError):
    """A site that cannot be used as written (bad spec or mismatch with the model)."""


def register_position_fn(name: str) -> Callable[[PositionFn], PositionFn]:
    """Register a named position function, so sites using it serialise to JSON."""

    def deco(fn: PositionFn) -> PositionFn:
        _POSITION_FNS[name] = fn
        fn.__position_name__ = name  # type: ignore[attr-defined]
        return fn

    return deco


@dataclass(frozen=True)
class BatchInfo:
    """What a site needs to know about the batch to resolve its positions."""

    seq_len: int
    attention_mask: Tensor | None = None  # [batch, pos], 1 for real tokens

    def lengths(self, batch: int, device: torch.device) -> Tensor:  # [batch]
        if self.attention_mask is None:
            return torch.full((batch,), self.seq_len, dtype=torch.long, device=device)
        return self.attention_mask.to(device).long().sum(dim=1)

    def starts(self, batch: int, device: torch.device) -> Tensor:  # [batch]
        """Index of each example's first real token (non-zero under left padding)."""
        if self.attention_mask is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        mask = self.attention_mask.to(device).long()
        return mask.argmax(dim=1)  # first 1 in each row


@register_position_fn("last")
def last_token(lengths: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    """Each example's last real token, shape [batch, 1]."""
    return (starts + lengths - 1).unsqueeze(1)


@register_position_fn("first")
def first_token(lengths: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    """Each example's first real token, shape [batch, 1]."""
    return starts.unsqueeze(1)


def _canonical_positions(positions: Any) -> Any:
    """Turn a user's positions into a hashable, JSON-friendly canonical form."""
    if positions is None or isinstance(positions, (int, str)):
        if isinstance(positions, bool):
            raise SiteError("positions must be an int, slice, index tensor or function, got a bool")
        if isinstance(positions, str) and positions not in _POSITION_FNS:
            raise SiteError(
                f"unknown named positions {positions!r}; known: {sorted(_POSITION_FNS)}; "
                "register one with mechscope.core.site.register_position_fn"
            )
        return positions
    if isinstance(positions, slice):
        return ("slice", positions.start, positions.stop, positions.step)
    if isinstance(positions, range):  # the positions it enumerates: range(2, 5) is [2, 3, 4]
        if not positions:
            raise SiteError(f"positions {positions!r} is empty; give at least one position")
        return ("list", tuple(positions))
    if isinstance(positions, Tensor):
        if positions.dtype.is_floating_point or positions.dim() != 2:
            raise SiteError(
                f"a positions tensor must be an integer tensor of shape [batch, n], got "
                f"dtype {positions.dtype} and shape {tuple(positions.shape)}"
            )
        return ("index", tuple(tuple(int(v) for v in row) for row in positions.tolist()))
    if isinstance(positions, tuple) and positions and positions[0] in ("slice", "index", "list"):
        return _checked_canonical(positions)
    if isinstance(positions, (list, tuple)):
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise SiteError(f"a list of positions must hold ints, got {positions!r}")
        return ("list", tuple(positions))
    if callable(positions):
        return getattr(positions, "__position_name__", positions)
    raise SiteError(f"cannot use {positions!r} as positions: expected int, slice, list, range, [batch, n] tensor or function")


def _checked_canonical(positions: tuple) -> tuple:
    """A canonical form given back (``Site.from_dict``): each part must be what
    :func:`_canonical_positions` makes, so a damaged file is an error here, not at run time."""
    kind, parts = positions[0], positions[1:]
    ints = lambda xs: isinstance(xs, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)  # noqa: E731
    ok = {"slice": len(parts) == 3 and all(p is None or ints((p,)) for p in parts),
          "list": len(parts) == 1 and ints(parts[0]),
          "index": len(parts) == 1 and isinstance(parts[0], tuple) and bool(parts[0])
          and all(ints(row) and len(row) == len(parts[0][0]) for row in parts[0])}[kind]
    if not ok:
        raise SiteError(f"positions {positions!r} are not a valid {kind!r} form; expected what Site.to_dict writes")
    return positions


def _canonical_ints(value: Any, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, range):
        value = list(value)
    try:  # operator.index: an int (or numpy integer), never a float or a string silently truncated
        out = tuple(operator.index(v) for v in value)
    except TypeError:
        raise SiteError(f"{what} must be an int or a sequence of ints, got {value!r}") from None
    if not out:
        raise SiteError(f"{what} is empty: give at least one index or None for all")
    if len(set(out)) != len(out):
        raise SiteError(f"{what} has repeated indices: {out}")
    return out


@dataclass(frozen=True)
class Site:
    """A place in a model: ``Site("layers.1")``, ``Site("h.0.attn", element=0)``.

    Args:
        path: module path exactly as ``model.named_modules()`` gives it ("" is the model).
        io: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook).
        element: which element of a tuple/dict output, or which positional argument
            (int) / keyword argument (str) of the input. ``None`` for an output means
            "the module returns a tensor" (checked at run time); for an input it means
            the first argument.
        positions: int, slice, list (or range) of ints, ``[batch, n]`` index tensor, a registered
            name (``"last"``) or a function of :class:`BatchInfo` returning ``[batch, n]``.
        heads: attention heads to keep; needs ``head_dim``.
        head_dim: width of one head, to split the last dimension into heads.
        features: indices of the last dimension (of the head dimension with heads).
        rows_of: for a module that runs on flattened rows ``[batch * pos, ...]`` (OPT's
            MLP): the path of the module whose input gives ``batch`` and ``pos`` (its
            block). The view is then ``[batch, pos, ...]`` like every other site's.
        name: optional label (aliases set it, e.g. ``"resid_post.3"``); not part of
            equality, only of printing.
    """

    path: str
    io: str = "output"
    element: int | str | None = None
    positions: Any = None
    heads: tuple[int, ...] | None = None
    head_dim: int | None = None
    features: tuple[int, ...] | None = None
    rows_of: str | None = None
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise SiteError(f"site path must be a string module path, got {self.path!r}")
        if self.io not in ("output", "input"):
            raise SiteError(f"site io must be 'output' or 'input', got {self.io!r}")
        if self.element is not None and (isinstance(self.element, bool) or not isinstance(self.element, (int, str))):
            raise SiteError(f"element must be an int, a str or None, got {self.element!r}")
        object.__setattr__(self, "positions", _canonical_positions(self.positions))
        object.__setattr__(self, "heads", _canonical_ints(self.heads, "heads"))
        object.__setattr__(self, "features", _canonical_ints(self.features, "features"))
        if self.rows_of is not None and not isinstance(self.rows_of, str):
            raise SiteError(f"rows_of must be a module path (the block whose input gives batch and pos), got {self.rows_of!r}")
        if self.heads is not None and not self.head_dim:
            raise SiteError(f"site {self.path!r} selects heads {self.heads} but has no head_dim; pass head_dim=")

    # -- printing and serialisation -------------------------------------------------
    def __str__(self) -> str:
        return self.name or self.describe()

    def describe(self) -> str:
        s = f"{self.path or '<model>'}:{self.io}"
        if self.element is not None:
            s += f"[{self.element}]"
        if self.positions is not None:
            s += f" pos={_positions_text(self.positions)}"
        if self.heads is not None:
            s += f" heads={list(self.heads)}"
        if self.features is not None:
            s += f" features={list(self.features) if len(self.features) <= 8 else f'<{len(self.features)}>'}"
        return s

    def to_dict(self) -> dict[str, Any]:
        pos = self.positions
        if callable(pos):
            raise SiteError(
                f"site {self.describe()} uses an unnamed position function, which cannot be "
                "serialised; register it with register_position_fn('name') and pass the name"
            )
        if isinstance(pos, tuple):
            pos = [pos[0], *([list(r) for r in pos[1]] if pos[0] == "index" else pos[1:] if pos[0] == "slice" else [list(pos[1])])]
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["positions"] = pos
        for k in ("heads", "features"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Site":
        if not isinstance(d, dict) or not isinstance(d.get("path"), str):
            raise SiteError(f"a site must be an object with a string 'path' (as Site.to_dict writes it), got "
                            f"{json.dumps(d, default=str)[:80]}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SiteError(f"unknown site field(s) {sorted(unknown)}; valid fields: {sorted(known)}")
        d = dict(d)
        pos = d.get("positions")
        if isinstance(pos, list) and pos and pos[0] == "slice":
            d["positions"] = ("slice", *pos[1:])
        elif isinstance(pos, list) and pos and pos[0] == "index" and all(isinstance(r, list) for r in pos[1:]):
            d["positions"] = ("index", tuple(tuple(r) for r in pos[1:]))
        elif isinstance(pos, list) and pos and pos[0] == "list" and len(pos) == 2 and isinstance(pos[1], list):
            d["positions"] = ("list", tuple(pos[1]))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Site":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "Site":
        return dataclasses.replace(self, **changes)

    @property
    def module_key(self) -> tuple[str, str, int | str | None, str | None]:
        """Sites with the same key share one hook (same module, io, element and row layout)."""
        return (self.path, self.io, self.element, self.rows_of)

    # -- selecting the view ---------------------------------------------------------
    def resolve_positions(self, act: Tensor, info: BatchInfo | None) -> Tensor | None:
        """Absolute indices ``[batch, n]`` into dim 1 of ``act``, or None for all."""
        return resolve_positions(self.positions, act, info, self)

    def select(self, act: Tensor, index: Tensor | None) -> Tensor:
        """The view of ``act`` this site names (see module docstring for its shape)."""
        view = act
        if index is not None:
            view = gather_positions(view, index)
        if self.heads is not None:
            view = split_heads(view, self.head_dim, self)[..., list(self.heads), :]
        if self.features is not None:
            _check_feature_range(self, view.shape[-1])
            view = view[..., list(self.features)]
        return view

    def scatter(self, act: Tensor, index: Tensor | None, view: Tensor) -> Tensor:
        """``act`` with this site's view replaced by ``view`` (out of place, autograd-safe)."""
        if self.heads is None and self.features is None and index is None:
            return view
        region = gather_positions(act, index) if index is not None else act
        if self.heads is not None:
            split = split_heads(region, self.head_dim, self)
            if self.features is not None:
                sub = split[..., list(self.heads), :].clone()
                sub[..., list(self.features)] = view
                view = sub
            split = split.clone()
            split[..., list(self.heads), :] = view
            new_region = split.flatten(-2)
        elif self.features is not None:
            new_region = region.clone()
            new_region[..., list(self.features)] = view
        else:
            new_region = view
        if index is None:
            return new_region
        return scatter_positions(act, index, new_region)


def _positions_text(pos: Any) -> str:
    if isinstance(pos, tuple) and pos[0] == "slice":
        return f"{pos[1] if pos[1] is not None else ''}:{pos[2] if pos[2] is not None else ''}" + (f":{pos[3]}" if pos[3] is not None else "")
    if isinstance(pos, tuple) and pos[0] == "list":
        return str(list(pos[1]))
    if isinstance(pos, tuple) and pos[0] == "index":
        return f"<index {len(pos[1])}x{len(pos[1][0]) if pos[1] else 0}>"
    if callable(pos):
        return getattr(pos, "__name__", "fn")
    return str(pos)


def _check_feature_range(site: Site, width: int) -> None:
    bad = [f for f in site.features or () if not -width <= f < width]
    if bad:
        raise SiteError(f"site {site.describe()}: feature indices {bad} are outside a last dimension of width {width}")


def split_heads(x: Tensor, head_dim: int | None, site: Site) -> Tensor:
    """``[..., n_heads * head_dim] -> [..., n_heads, head_dim]`` with a clear error."""
    width = x.shape[-1]
    if not head_dim or width % head_dim:
        raise SiteError(f"site {site.describe()}: last dimension {width} does not split into heads of width {head_dim}")
    n_heads = width // head_dim
    bad = [h for h in site.heads or () if not 0 <= h < n_heads]
    if bad:
        raise SiteError(f"site {site.describe()}: heads {bad} out of range; the activation has {n_heads} heads (0..{n_heads - 1})")
    return x.unflatten(-1, (n_heads, head_dim))


def gather_positions(act: Tensor, index: Tensor) -> Tensor:
    """``act[b, index[b, j]]`` -> ``[batch, n, ...]``."""
    idx = index.view(*index.shape, *([1] * (act.dim() - 2))).expand(*index.shape, *act.shape[2:])
    return act.gather(1, idx)


def scatter_positions(act: Tensor, index: Tensor, values: Tensor) -> Tensor:
    idx = index.view(*index.shape, *([1] * (act.dim() - 2))).expand(*index.shape, *act.shape[2:])
    return act.scatter(1, idx, values.to(act.dtype))


def resolve_positions(pos: Any, act: Tensor, info: BatchInfo | None, site: Site) -> Tensor | None:
    """Absolute position indices ``[batch, n]`` (relative to real tokens when masked)."""
    if pos is None:
        return None
    if act.dim() < 3:
        raise SiteError(
            f"site {site.describe()} selects positions, but its activation has shape "
            f"{tuple(act.shape)} with no position dimension; drop positions= for this site"
        )
    batch, seq = act.shape[0], act.shape[1]
    info = info if info is not None and info.seq_len == seq else BatchInfo(seq_len=seq)
    device = act.device
    lengths, starts = info.lengths(batch, device), info.starts(batch, device)
    if isinstance(pos, str):
        index = _POSITION_FNS[pos](lengths, starts, seq)
    elif callable(pos):
        index = pos(lengths, starts, seq)
    elif isinstance(pos, tuple) and pos[0] == "index":
        index = torch.tensor(pos[1], dtype=torch.long, device=device)
        if index.shape[0] != batch:
            raise SiteError(f"site {site.describe()}: positions tensor has {index.shape[0]} rows but the batch has {batch}")
        return _check_absolute(index, seq, site)
    else:
        rel = _relative_positions(pos, int(lengths.min()), int(lengths.max()), site)  # [n]
        rel = rel.to(device)
        index = torch.where(rel.unsqueeze(0) < 0, lengths.unsqueeze(1) + rel.unsqueeze(0), rel.unsqueeze(0))
        bad = (index < 0) | (index >= lengths.unsqueeze(1))
        if bad.any():
            b = int(bad.any(dim=1).nonzero()[0])
            raise SiteError(
                f"site {site.describe()}: positions {_positions_text(pos)} fall outside example {b}, "
                f"which has {int(lengths[b])} real tokens; use positions within 0..{int(lengths[b]) - 1} "
                "or negative indices from the end"
            )
        index = index + starts.unsqueeze(1)
    index = torch.as_tensor(index, device=device).long()
    if index.dim() != 2 or index.shape[0] != batch:
        raise SiteError(f"site {site.describe()}: position function returned shape {tuple(index.shape)}, expected [batch={batch}, n]")
    return _check_absolute(index, seq, site)


def _check_absolute(index: Tensor, seq: int, site: Site) -> Tensor:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= seq):
        raise SiteError(
            f"site {site.describe()}: positions {sorted(set(index.flatten().tolist()))[:8]} are "
            f"outside the sequence of length {seq} (valid 0..{seq - 1})"
        )
    return index


def _relative_positions(pos: Any, min_len: int, max_len: int, site: Site) -> Tensor:
    if isinstance(pos, int):
        return torch.tensor([pos])
    if pos[0] == "list":
        return torch.tensor(pos[1])
    # slice: resolved against the shortest example so every row has the same count;
    # a slice counted from the end stays counted from each example's own end
    start, stop, step = pos[1:]
    from_end = (start is not None and start < 0) or (stop is not None and stop < 0)
    idx = list(range(-min_len, 0) if from_end else range(min_len))[slice(start, stop, step)]
    if not idx:
        raise SiteError(f"site {site.describe()}: slice {_positions_text(pos)} selects no positions of a sequence of {min_len} real tokens")
    return torch.tensor(idx)
