"""Running a function *instead of* a module, for the calls made inside a ``with`` block.

A hook sees a module's output after the module has computed it. When that computation
would be thrown away -- a decomposed layer recomputed from its subcomponents, a frozen
module whose output is already known, a transcoder standing in for an MLP -- the
module should not run at all. ``substituting(model, {path: fn})`` makes every call of
the module at ``path`` return ``fn(original, *args, **kwargs)`` instead, where
``original`` is the module's own forward (so ``fn`` can still run the module, e.g. on
some of the rows). Forward hooks and pre-hooks registered on the module still run
around the call, so sites at a substituted module keep working.

How: the module's ``forward`` is shadowed by an attribute on that instance (nothing
global, nothing on the class) and the attribute is deleted on exit, also when the body
raises. By default substitutions do not nest on one module, and a module whose instance
already carries its own ``forward`` attribute is refused rather than silently restored
wrongly. With ``wrap_replaced=True`` such a forward (accelerate's dispatch hook, an outer
substitution) becomes the ``original`` the substitute calls, and is put back on exit.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

from torch import nn

from mechscope.core.run import find_module
from mechscope.core.site import SiteError

Substitute = Callable[..., Any]  # fn(original_forward, *args, **kwargs) -> the module's output


@contextmanager
def substituting(model: nn.Module, substitutes: Mapping[str, Substitute], *,
                 wrap_replaced: bool = False) -> Iterator[None]:
    """Within the block, calls of the module at each path run its substitute instead."""
    shadowed: list[tuple[nn.Module, Any]] = []  # (module, the instance forward it had, or None)
    try:
        for path, fn in substitutes.items():
            if not callable(fn):
                raise TypeError(f"the substitute for {path!r} is not callable: {fn!r}")
            module = find_module(model, path)
            if any(m is module for m, _ in shadowed):
                raise SiteError(f"module {path!r} appears twice among the substitutions (under two paths)")
            before = vars(module).get("forward")
            if before is not None and not wrap_replaced:
                raise SiteError(f"module {path!r} already has a forward attribute on the instance (a substitution "
                                "is active on it, or accelerate's dispatch hook); substitutions do not nest")
            module.forward = functools.partial(fn, module.forward)  # shadows the class's (or the wrapped) forward
            shadowed.append((module, before))
        yield
    finally:
        for module, before in reversed(shadowed):
            if before is None:
                del module.forward
            else:
                module.forward = before
