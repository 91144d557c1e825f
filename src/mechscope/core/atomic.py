"""Atomic files: written to a temporary file in the same directory, flushed and fsynced,
then ``os.replace``d onto the real name, so a reader (or a crash) sees the old file or the
new one, never half of one. The one implementation for the package (checkpoints, stores,
scoreboards, reports); it imports nothing heavy, so the command line can use it without
loading torch.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

PathLike = str | os.PathLike


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def stale_temp_files(path: PathLike) -> list[Path]:
    """Temporary files an interrupted atomic write of ``path`` left behind (a hard kill)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    For writers that insist on opening the file themselves (``safetensors.save_file``).
    On any error (``KeyboardInterrupt`` included) the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors: 0600) gets the umask's mode back
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """``with atomic_open(p) as f: f.write(...)`` -- a binary file that appears whole or not at all."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()


def atomic_write(path: PathLike, write_fn: Callable[[BinaryIO], Any] | bytes | str) -> None:
    """Write ``path`` atomically: ``write_fn(file)`` fills a temporary file (or give bytes, or
    text, written as UTF-8). The file gets the umask's permissions like any other."""
    if isinstance(write_fn, str):
        write_fn = write_fn.encode("utf-8")
    with atomic_open(path) as f:
        if isinstance(write_fn, (bytes, bytearray, memoryview)):
            f.write(write_fn)
        else:
            write_fn(f)
