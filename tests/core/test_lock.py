"""Run-directory locks: one job per directory, stale locks taken over, torchrun ranks join."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from mechscope.core.lock import LOCK_NAME, LockError, StaleLockWarning, holder, job_id, lock_dir, lock_file
from mechscope.core.paths import PathError

HOLD = textwrap.dedent("""
    import sys
    from mechscope.core.lock import lock_dir
    with lock_dir(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin
""")


def fake_lock(directory, pid, host=None, job=None):
    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2025-01-01T00:00:00Z", "job": job,
              "token": "abc", "command": "test"}
    (directory / LOCK_NAME).write_text(json.dumps(record))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def torchrun_env(monkeypatch, rank, run_id="run-1"):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")


def test_second_job_fails_at_once_naming_the_holder(tmp_path, single_process):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"in use by another job \(PID {proc.pid} on host {socket.gethostname()}"):
            with lock_dir(run):
                pass
        assert holder(run)["pid"] == proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert holder(run) is None  # released when the holder finished
    with lock_dir(run):
        assert holder(run)["pid"] == os.getpid()


def test_released_on_exception_and_reentrant(tmp_path, single_process):
    with pytest.raises(KeyboardInterrupt):
        with lock_dir(tmp_path):
            with lock_dir(tmp_path):  # the same process again: counted, not refused
                pass
            assert holder(tmp_path)["pid"] == os.getpid()
            raise KeyboardInterrupt
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, single_process):
    pid = dead_pid()
    fake_lock(tmp_path, pid)
    with pytest.warns(StaleLockWarning, match=f"process {pid} is no longer running"):
        with lock_dir(tmp_path):
            assert holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None
    if sys.platform == "linux":  # the PID was reused by a process that started after the lock was taken
        fake_lock(tmp_path, os.getppid())
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "proc_start": 1}))
        with pytest.warns(StaleLockWarning, match="the PID now belongs to another process"):
            with lock_dir(tmp_path):
                assert holder(tmp_path)["proc_start"] > 1
    (tmp_path / LOCK_NAME).write_text("")  # a crash between creating and writing the lock
    with pytest.warns(StaleLockWarning, match="empty or unreadable"):
        with lock_dir(tmp_path):
            pass


def test_live_or_foreign_host_lock_is_refused(tmp_path, single_process):
    fake_lock(tmp_path, os.getppid())
    with pytest.raises(LockError, match=f"PID {os.getppid()}"):
        with lock_dir(tmp_path):
            pass
    fake_lock(tmp_path, dead_pid(), host="elsewhere")  # cannot be checked from here: never taken over
    with pytest.raises(LockError, match="on host elsewhere.*delete the lock file"):
        with lock_dir(tmp_path):
            pass


def test_a_file_output_is_locked_beside_it(tmp_path, single_process):
    out = tmp_path / "sub" / "sae.safetensors"
    with lock_file(out, "--out"):
        assert (tmp_path / "sub" / ".sae.safetensors.lock").exists()
    with pytest.raises(PathError, match="is a directory, but a file is expected"):
        with lock_file(tmp_path):
            pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathError, match="is an existing file, but a directory is expected"):
        with lock_dir(tmp_path / "f"):
            pass


def test_torchrun_ranks_of_one_job_share_the_lock(tmp_path, monkeypatch):
    torchrun_env(monkeypatch, rank=0)
    job = job_id()
    assert job is not None and "run-1" in job
    with lock_dir(tmp_path / "a"):  # rank 0 takes it, recording the job
        assert holder(tmp_path / "a")["job"] == job
    torchrun_env(monkeypatch, rank=1)
    fake_lock(tmp_path, os.getppid(), job=job)  # rank 0 of this job (another live process) holds it
    with lock_dir(tmp_path):  # rank 1 joins
        pass
    assert holder(tmp_path)["pid"] == os.getppid()  # and leaves rank 0's lock in place
    torchrun_env(monkeypatch, rank=1, run_id="run-2")
    with pytest.raises(LockError, match="in use by another job"):  # a rank of another job fails at once
        with lock_dir(tmp_path):
            pass
    (tmp_path / LOCK_NAME).unlink()
    with pytest.raises(LockError, match="waited 0 s for rank 0"):
        with lock_dir(tmp_path, join_timeout=0.2):
            pass
