"""What each block adds to the residual stream, established from the probe forward and checked.

A block computes ``resid_post = resid_pre + attn_write + mlp_write`` (sequential or
parallel). The *write* of a sublayer is the tensor the block adds, which is not always
the sublayer module's own output: Gemma 2/3 and OLMo 2 normalise the attention and MLP
outputs (``post_attention_layernorm``, ``post_feedforward_layernorm``) before adding
them, Phi-3 passes them through a dropout module. A hook on the attention module there
reads something the stream never receives, and a direction projected out of it is put
back by the norm.

So the write is found by following the values of the probe forward
(:mod:`mechscope.core.trace`): starting at the attention (MLP) module, go to the next
module of the block that was called once, on exactly that value, and returns the
stream's width, until there is none. Then the invariant is checked on the same
forward, at no extra cost::

    resid_post - resid_pre == attn_write + mlp_write      (to the dtype's rounding)

Where it does not hold the writes are unknown, and every alias and method that needs
them refuses with the measured gap (see :attr:`BlockPaths.writes_error`). Names are
never consulted: ``post_attention_layernorm`` is the post-sublayer norm in Gemma 2 and
the pre-MLP norm in Llama; the values tell which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from mechscope.core.trace import Trace


@dataclass(frozen=True)
class Write:
    """One sublayer's write to the residual stream."""

    path: str  # module whose output (element 0 of a tuple) is added to the stream
    flat: bool = False  # the module runs on flattened rows [batch * pos, d] (OPT's fc2)
    is_proj: bool = False  # equal to the output projection's own output: a weight edit of it edits the write


def _inside(path: str, root: str | None) -> bool:
    return root is not None and (path == root or path.startswith(root + "."))


def follow(trace: Trace, block: str, start: str, avoid: tuple[str | None, ...]) -> str:
    """From ``start``, the end of the chain of modules inside ``block`` each called once on
    exactly the previous one's output (equal values) and returning the same width."""
    order = list(trace.outputs)
    current = start
    while True:
        value = trace.values.get(current)
        if value is None:
            return current
        after = order[order.index(current) + 1:] if current in order else []
        nxt = next((p for p in after if p.startswith(block + ".") and not current.startswith(p + ".")
                    and not any(_inside(p, a) for a in avoid) and trace.calls.get(p) == 1
                    and _same(trace.inputs.get(p), value) and _width(trace.values.get(p)) == _width(value)), None)
        if nxt is None:
            return current
        current = nxt


def _same(a: Tensor | None, b: Tensor) -> bool:
    return a is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _width(t: Tensor | None) -> int | None:
    return int(t.shape[-1]) if t is not None and t.dim() else None


def _as_stream(value: Tensor, stream: Tensor) -> tuple[Tensor, bool] | None:
    """``value`` in the stream's shape [batch, pos, d], and whether it came as flat rows."""
    if value.shape == stream.shape:
        return value, False
    if stream.dim() == 3 and value.dim() == 2 and value.shape == (stream.shape[0] * stream.shape[1], stream.shape[2]):
        return value.view(stream.shape), True
    return None


def _gap(delta: Tensor, parts: list[Tensor], scale: float) -> float:
    rest = delta.double() - sum(p.double() for p in parts)
    return float(rest.norm()) / max(scale, 1e-30)


def establish(trace: Trace, block: str, attn: str | None, mlp: str | None, projs: Mapping[str, str | None],
              given: Mapping[str, str]) -> tuple[Write | None, Write | None, str | None]:
    """The attention and MLP writes of ``block`` and ``None``, or ``(None, None, why)``.

    ``given`` holds overriding write paths (keys ``"attn"``/``"mlp"``, full paths);
    ``projs`` the output / down projection of each (``"attn"``/``"mlp"``), to tell whether
    a write is the projection's own output.
    """
    if trace.error:
        return None, None, f"the probe forward failed ({trace.error})"
    x, y = trace.inputs.get(block), trace.values.get(block)
    if x is None or y is None or x.shape != y.shape:
        return None, None, f"the probe forward did not show block {block!r} mapping a stream to a stream of the same shape"
    writes: dict[str, Write] = {}
    parts: list[Tensor] = []
    for key, start in (("attn", attn), ("mlp", mlp)):
        path = given.get(key) or (follow(trace, block, start, (attn, mlp)) if start else None)
        if path is None:
            continue
        value = trace.values.get(path)
        shaped = _as_stream(value, x) if value is not None else None
        if shaped is None:
            return None, None, (f"the {key} write candidate {path!r} returned "
                                f"{trace.outputs[path].text if path in trace.outputs else 'nothing (never ran)'}, "
                                f"not the stream's shape {list(x.shape)}")
        proj = projs.get(key)
        is_proj = proj is not None and (proj == path or _same(trace.values.get(proj), value))
        writes[key] = Write(path, flat=shaped[1], is_proj=is_proj)
        parts.append(shaped[0])
    scale = sum(float(t.double().norm()) for t in [x, y, *parts])
    gap = _gap(y - x, parts, scale)
    tol = 8 * torch.finfo(y.dtype).eps if y.is_floating_point() else 0.0
    if gap > tol:
        named = " + ".join(w.path for w in writes.values()) or "nothing"
        size = float((y - x).double().norm()) / max(scale, 1e-30)
        return None, None, (f"resid_post - resid_pre of block {block!r} is not {named}: they differ by "
                            f"{100 * gap / max(size, 1e-30):.3g} % of the block's update (tolerance "
                            f"{tol:.2g} of the summed norms)")
    return writes.get("attn"), writes.get("mlp"), None


def embedding_writes(trace: Trace, candidates: list[str], first_block: str) -> tuple[str, ...] | None:
    """The embedding modules whose outputs, summed and scaled by one constant, are the
    stream before block 0 (GPT-2: token + position; Gemma: token x sqrt(d)); ``None``
    when that does not hold (a norm, a projection or anything else sits in between)."""
    x = trace.inputs.get(first_block)
    ran = [p for p in candidates if p in trace.values]
    if x is None or not ran:
        return None
    try:
        total = sum(trace.values[p].double() for p in ran).expand(x.shape)
    except RuntimeError:  # an output that does not broadcast to the stream
        return None
    x = x.double()
    c = float((x * total).sum() / (total * total).sum().clamp_min(1e-300))
    gap = float((x - c * total).norm())
    tol = 8 * torch.finfo(trace.inputs[first_block].dtype).eps * (float(x.norm()) + abs(c) * float(total.norm()))
    return tuple(ran) if c != 0 and gap <= tol else None


__all__ = ["Write", "embedding_writes", "establish", "follow"]
