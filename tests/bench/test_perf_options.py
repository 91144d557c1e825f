"""The speed benchmarks' shared options (benchmarks/_timing.py): ``--device`` / ``--dtype``,
refused with exit status 2 and one line when they cannot run here, and timings that wait
for the device's queued work."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _timing  # noqa: E402


def test_defaults_are_the_cpu_in_float32():
    assert _timing.device_options(["bench.py", "--quick"]) == (torch.device("cpu"), torch.float32)
    auto = _timing.device_options(["bench.py", "--device", "auto"])[0]
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                         ("float32", torch.float32)])
def test_dtypes(name, dtype):
    assert _timing.device_options(["b.py", "--device", "cpu", "--dtype", name]) == (torch.device("cpu"), dtype)


@pytest.mark.parametrize("argv, says", [
    (["--dtype", "float64"], "--dtype float64: dtype 'float64' is not supported; expected one of"),
    (["--dtype"], "--dtype needs a value"),
    (["--device", "--quick"], "--device needs a value"),
    (["--device", "meta"], "--device meta --dtype float32: device 'meta' is not supported"),
    (["--device", "nonsense"], "device 'nonsense' is not supported; expected 'cpu', 'cuda', 'cuda:N' or 'auto'"),
])
def test_bad_values_exit_2_with_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        _timing.device_options(["b.py", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_at_the_command_line():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_store.py"), "--device", "cuda"],
                         capture_output=True, text=True, cwd=BENCHMARKS.parent)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: --device cuda --dtype float32: device='cuda', but torch sees no CUDA device (torch "
        f"{torch.__version__}); use device='cpu'"]
    assert out.stdout == ""  # refused before any work


def test_interleaved_waits_for_the_device_after_each_round():
    calls = []
    t = _timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, inner=3,
                            warmup=1, sync=lambda: calls.append("sync"))
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    # warm-up (one call each), one wait; then per contender and round: its inner calls, one wait
    assert calls == ["a", "b", "sync"] + (["a"] * 3 + ["sync"] + ["b"] * 3 + ["sync"]) * 2


def test_synchronize_on_the_cpu_waits_for_nothing():
    assert _timing.synchronize(torch.device("cpu"))() is None
    assert _timing.placed(torch.device("cpu"), torch.bfloat16) == "bfloat16"
    assert _timing.placed(torch.device("cuda", 1), torch.float32) == "float32 on cuda:1"
