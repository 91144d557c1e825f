"""``python -m mechscope`` is the ``mechscope`` command."""

from mechscope.cli import console

raise SystemExit(console())
