"""Paths a run reads and writes: outputs checked before the work, references kept inside.

- **Outputs** are checked, and their parent directories created, before any work starts,
  so that a long run never ends by failing to write its result: :func:`output_dir` for a
  directory (``--out DIR``), :func:`output_file` for a file (``--out FILE``).
- **References** inside a file (a store manifest's shard ``file``, a scoreboard's figure
  ``path``) are resolved by :func:`confined`, which refuses anything that leads outside the
  directory holding them: ``..``, an absolute path, or a symbolic link that points out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class PathError(ValueError):
    """An output path that cannot be written, or a reference that leads outside its directory."""


def _mkdir(directory: Path, flag: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PathError(f"{flag} {directory}: a part of this path is a file, not a directory; "
                        "choose another path") from None
    except OSError as e:
        raise PathError(f"{flag} {directory}: cannot create the directory ({e.strerror}); "
                        "choose a path you can write") from None


def _writable(directory: Path, flag: str, path: Path) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {path}: the directory {directory} is not writable; choose a path you can write")


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A directory to write into: created if missing; an existing file there is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{flag} {path} is an existing file, but a directory is expected here; "
                        "give a directory (new or existing) instead")
    _mkdir(path, flag)
    _writable(path, flag, path)
    return path


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file to write: its directory is created if missing; a directory at the path is an error."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{flag} {path} is a directory, but a file is expected here; "
                        f"give a file name, e.g. {path / 'out.safetensors'}")
    _mkdir(path.parent, flag)
    _writable(path.parent, flag, path)
    return path


def confined(base: str | os.PathLike, ref: Any, what: str) -> Path:
    """``base / ref``, refused unless it stays inside ``base`` once links are resolved.

    ``what`` names the entry in the message (``"shard 3 of /runs/store/manifest.json"``).
    """
    if not isinstance(ref, str) or not ref:
        raise PathError(f"{what}: the path must be a non-empty string relative to {base}, got {ref!r}")
    if Path(ref).is_absolute() or ref.startswith(("/", "\\")):
        raise PathError(f"{what}: the path {ref!r} is absolute; only paths inside {base} are read. "
                        "The file was edited or damaged: write it again")
    root = Path(base).resolve()
    full = (root / ref).resolve()
    if full != root and root not in full.parents:
        raise PathError(f"{what}: the path {ref!r} leads outside {base} (to {full}); only files inside it "
                        "are read. The file was edited or damaged: write it again")
    return Path(base) / ref


__all__ = ["PathError", "confined", "output_dir", "output_file"]
