"""Run-directory locks: one job writes a run directory at a time.

A long job (an activation store, an SAE or SPD training, a DAS alignment, the bench) holds
a lock file in the directory it writes, ``.mechscope.lock``, for as long as it runs; a
file output (``sae train --out FILE``) is locked by ``.FILE.lock`` beside it. The lock is
created atomically (``O_CREAT | O_EXCL``) and holds JSON::

    {"pid": 4242, "proc_start": 81234, "host": "node-1", "started": "2025-01-01T12:00:00Z",
     "job": null, "token": "<random hex>", "command": "mechscope sae train ..."}

- A second job that asks for a held lock fails at once with :class:`LockError`, whose one
  line names the holder's PID, host and start time.
- A stale lock (same host, its PID no longer running or, on Linux, reused by a process
  that started later; or an unreadable file left by a crash) is taken over with a warning. A lock held on another host cannot be checked, so
  it is never taken over: the message says to delete it once that job is known to be gone.
- The lock is per job: under ``torchrun`` (``WORLD_SIZE`` > 1) the job id is the
  rendezvous id and master address that every rank of one launch shares. Rank 0 takes the
  lock; the other ranks wait (briefly) for it and join it, and never remove it. In a
  process group started without torchrun's environment (``mp.spawn``), ranks other than
  0 leave the lock to rank 0.
- It is released when the ``with`` block ends, by an exception too (``KeyboardInterrupt``
  included). A process killed hard leaves the file behind; the next job finds it stale.

One process may take the same lock again (nested ``with`` blocks): it is counted, not
refused.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from mechscope.core.paths import output_dir, output_file

LOCK_NAME = ".mechscope.lock"
JOIN_TIMEOUT = 60.0  # seconds a rank > 0 waits for rank 0 to take the lock
_HELD: dict[Path, list[Any]] = {}  # lock path -> [count, token] for the locks this process holds


class LockError(RuntimeError):
    """A run directory is held by another job (or the lock cannot be taken)."""


class StaleLockWarning(UserWarning):
    """A lock left by a job that is no longer running was taken over."""


def job_id() -> str | None:
    """The id every rank of one ``torchrun`` launch shares; None for a single process."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    parts = [env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    return "torchrun:" + "@".join(parts) if any(parts) else None


def _rank() -> int:
    """This process's rank: torchrun's ``RANK``, else an initialised ``torch.distributed`` group's."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ.get("RANK", "0") or 0)
    dist = sys.modules.get("torch.distributed")  # never imported here: a group exists only if it was
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _proc_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return None


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when it is gone. An unreadable record is ``{}``."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else {}


def _read_settled(path: Path) -> dict[str, Any] | None:
    """As :func:`_read`, giving a holder that has just created the file time to write it."""
    for _ in range(10):
        record = _read(path)
        if record != {}:
            return record
        time.sleep(0.05)
    return record


def describe(record: dict[str, Any]) -> str:
    """``PID 4242 on host node-1 since 2025-...``: who holds a lock."""
    since = f" since {record['started']}" if record.get("started") else ""
    job = f", job {record['job']}" if record.get("job") else ""
    return f"PID {record.get('pid')} on host {record.get('host')}{since}{job}"


def _stale(record: dict[str, Any]) -> str | None:
    """Why a lock is stale (None: it is live, or cannot be known to be dead)."""
    if not record:
        return "its file is empty or unreadable (a job that crashed while taking it)"
    if record.get("host") != socket.gethostname():
        return None
    pid = record["pid"]
    if pid == os.getpid():
        return "this process took it earlier and did not release it"
    if not _alive(pid):
        return f"process {pid} is no longer running"
    started = _proc_start(pid)
    if isinstance(record.get("proc_start"), int) and started is not None and started != record["proc_start"]:
        return f"process {pid} is no longer running (the PID now belongs to another process)"
    return None


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file with ``record``; False when it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(path: Path, seen: dict[str, Any]) -> None:
    """Remove a stale lock, unless another job replaced it since it was read."""
    grave = path.with_name(f"{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    if _read(grave) != seen:  # a fresh lock was moved: put it back where its holder expects it
        try:
            os.link(grave, path)
        except OSError:
            pass
    grave.unlink(missing_ok=True)


def _record(job: str | None) -> dict[str, Any]:
    return {"pid": os.getpid(), "proc_start": _proc_start(os.getpid()), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "job": job,
            "token": secrets.token_hex(8), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _held_error(path: Path, record: dict[str, Any], what: str) -> LockError:
    return LockError(f"{what} is in use by another job ({describe(record)}; lock file {path}): wait for it "
                     "to finish or choose another path; if that job is gone, delete the lock file")


def _acquire(path: Path, what: str, job: str | None) -> str | None:
    """Take the lock at ``path`` (rank 0 or one process); returns its token, None when joined."""
    for _ in range(20):
        mine = _record(job)
        if _create(path, mine):
            return mine["token"]
        record = _read_settled(path)
        if record is None:  # released between the two calls: try again
            continue
        if job is not None and record.get("job") == job:
            return None  # another process of this job holds it: join
        reason = _stale(record)
        if reason is None:
            raise _held_error(path, record, what)
        warnings.warn(f"taking over the stale lock of {what} ({describe(record) if record else path}): "
                      f"{reason}", StaleLockWarning, stacklevel=4)
        _take_over(path, record)
    raise LockError(f"could not take the lock {path}: other jobs keep taking it; run one job at a time")


def _join(path: Path, what: str, job: str, timeout: float) -> None:
    """A rank > 0: wait until rank 0 of this job holds the lock; fail at once for another live job."""
    deadline = time.monotonic() + timeout
    while True:
        record = _read_settled(path)
        if record and record.get("job") == job:
            return
        if record and _stale(record) is None:
            raise _held_error(path, record, what)
        if time.monotonic() > deadline:
            raise LockError(f"rank {_rank()} waited {timeout:.0f} s for rank 0 of this job ({job}) to lock "
                            f"{what}; did rank 0 fail? Its error says why")
        time.sleep(0.05)


def _release(path: Path, token: str) -> None:
    record = _read(path)
    if record and record.get("token") == token:
        path.unlink(missing_ok=True)


@contextmanager
def locked(path: str | os.PathLike, what: str = "run directory", *, join_timeout: float = JOIN_TIMEOUT) -> Iterator[Path]:
    """Hold the lock file ``path`` for the ``with`` block (see the module docstring).

    ``what`` names the locked thing in messages ("activation store /runs/s"). Prefer
    :func:`lock_dir` and :func:`lock_file`, which name the lock file for a directory or
    a file output. Yields the lock file's path.
    """
    path = Path(path).absolute()
    if path in _HELD:  # this process holds it already: count, do not refuse
        _HELD[path][0] += 1
        try:
            yield path
        finally:
            _HELD[path][0] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    job, rank = job_id(), _rank()
    if rank != 0:  # rank 0 of the job holds the lock and writes; the others join it
        if job is not None:
            _join(path, what, job, join_timeout)
        yield path
        return
    token = _acquire(path, what, job)
    if token is None:
        yield path
        return
    _HELD[path] = [1, token]
    try:
        yield path
    finally:
        del _HELD[path]
        _release(path, token)


def lock_dir(directory: str | os.PathLike, what: str = "run directory", **kwargs: Any):
    """Lock a run directory (created if missing) by its ``.mechscope.lock``: ``with lock_dir(d): ...``."""
    output_dir(directory, what)  # an existing file there is a clear error, not a failed mkdir
    return locked(Path(directory) / LOCK_NAME, f"{what} {directory}", **kwargs)


def lock_file(file: str | os.PathLike, what: str = "output file", **kwargs: Any):
    """Lock a file output by ``.NAME.lock`` beside it (its directory is created if missing)."""
    file = output_file(file, what)
    return locked(file.with_name(f".{file.name}.lock"), f"{what} {file}", **kwargs)


def holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the job holding a run directory's lock, or None when it is free."""
    return _read(Path(directory) / LOCK_NAME)


__all__ = ["LOCK_NAME", "LockError", "StaleLockWarning", "describe", "holder", "job_id", "lock_dir", "lock_file",
           "locked"]
