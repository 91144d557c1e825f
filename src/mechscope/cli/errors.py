"""How the command line reports an error: one line on stderr and an exit status.

Exit 2 (bad input: the message says what was wrong and how to fix it) for

- :class:`~mechscope.cli.UsageError` and ``ConfigError``;
- every error type mechscope defines (``CheckpointError``, ``LockError``, ``PathError``,
  ``DataError``, ``SAEError``, ``SiteError``, ...): raised on purpose, with a fix;
- ``ValueError`` / ``KeyError`` raised by a ``raise`` statement in mechscope's own code
  (a deliberate check; the same error from an unpacking or a library call inside
  mechscope is a failure);
- ``OSError`` (a missing file, a directory where a file was expected, no permission).

Anything else is a failure inside mechscope or a library it calls: exit 1 with the
exception's type and message on one line and a pointer to ``--debug``, which prints the
full traceback (so does the environment variable ``MECHSCOPE_DEBUG=1``). mechscope's own
warnings print as one line too.
"""

from __future__ import annotations

import linecache
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

MAX_CHARS = 1000  # longer messages of other libraries (a list of every valid name) are cut
_PACKAGE = Path(__file__).resolve().parent.parent  # .../mechscope


def _ours(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "mechscope" for c in cls.__mro__)


def _raised_by_mechscope(e: BaseException) -> bool:
    """The error comes from a ``raise`` statement in mechscope's code: a deliberate check,
    not an unpacking or a library call that failed inside it."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        ours = _PACKAGE in Path(filename).resolve().parents
    except (OSError, ValueError):
        return False
    return ours and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def is_bad_input(e: BaseException) -> bool:
    """Whether ``e`` reports bad input (exit 2) rather than a failure (exit 1)."""
    if _ours(type(e)) or isinstance(e, OSError):
        return True
    return isinstance(e, (ValueError, KeyError)) and _raised_by_mechscope(e)


def message(e: BaseException) -> str:
    """The error's text: a KeyError without its quotes, an OSError with its file; another
    library's message is cut at MAX_CHARS (mechscope's own say what they need to)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    elif isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e)
    text = text.strip() or type(e).__name__
    if len(text) > MAX_CHARS and not _ours(type(e)):
        text = f"{text[:MAX_CHARS]}... ({len(text) - MAX_CHARS} more characters; --debug shows them)"
    return text


def shipped_advice(e: BaseException) -> str | None:
    """For a damaged checkpoint shipped with mechscope: the command that rebuilds it."""
    from mechscope.core.checkpoint import CheckpointError, shipped_file

    path = getattr(e, "path", None)
    if not isinstance(e, CheckpointError) or path is None or not shipped_file(path):
        return None
    from mechscope.tasks.registry import names as task_names

    stem = Path(path).name.split(".")[0]
    names = [n for n in task_names() if stem == n or stem.startswith(n + "_")]
    command = f"`mechscope train {max(names, key=len)}`" if names else "`mechscope train NAME` (see --list)"
    return (f"{path}: {e.problem}. It ships with mechscope: rebuild it with {command}, or reinstall mechscope "
            "to restore the original")


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """mechscope's own warnings (a stale lock taken over) as ``mechscope COMMAND: warning: ...``;
    other libraries' warnings as they print them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
            if not _ours(category):
                return shown(message, category, filename, lineno, file, line)
            (file or sys.stderr).write(f"mechscope {command}: warning: {message}\n")

        warnings.showwarning = show
        yield


def report(e: BaseException, command: str, debug: bool, stream: TextIO | None = None) -> int:
    """Print ``e`` for ``mechscope COMMAND`` and return the exit status (2 bad input, 1 failure)."""
    stream = stream or sys.stderr
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=stream)
    bad = is_bad_input(e)
    text = shipped_advice(e) or message(e)
    if bad:
        stream.write(f"mechscope {command}: error: {text}\n")
        return 2
    text = " ".join(text.split())
    hint = "" if debug else " (run again with --debug for the traceback)"
    stream.write(f"mechscope {command}: error: {type(e).__name__}: {text}{hint}\n")
    return 1
