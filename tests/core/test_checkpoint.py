"""Atomic, verified files: every way a file can be wrong is a clear CheckpointError."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from torch import nn

from mechscope.core.checkpoint import (
    CheckpointError,
    MissingCheckpointError,
    atomic_open,
    atomic_write,
    load_json,
    load_module_state,
    load_tensors,
    read_header,
    save_json_atomic,
    save_module,
    save_tensors,
    tensor_sha256,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(32, 16, generator=g),  # [32, 16]
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(4, 4, generator=g).to(torch.bfloat16),
    }


def _data_start(path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


# -- atomic writes --------------------------------------------------------------------
def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "x.bin"
    atomic_write(p, b"first")
    atomic_write(p, lambda f: f.write(b"second"))
    assert p.read_bytes() == b"second"
    assert sorted(os.listdir(p.parent)) == ["x.bin"]
    atomic_write(p, "thïrd")  # text: UTF-8
    assert p.read_bytes() == "thïrd".encode("utf-8")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_atomic_write_keeps_old_file_and_removes_temp(tmp_path, exc):
    p = tmp_path / "x.bin"
    atomic_write(p, b"old")
    with pytest.raises(exc):
        with atomic_open(p) as f:
            f.write(b"half of the new")
            raise exc("crash")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_json_round_trip_and_errors(tmp_path):
    p = tmp_path / "m.json"
    save_json_atomic(p, {"a": [1, 2], "b": None})
    assert load_json(p) == {"a": [1, 2], "b": None}
    with pytest.raises(MissingCheckpointError, match="missing"):
        load_json(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        load_json(tmp_path / "nope.json")
    p.write_text('{"a": [1, ')
    with pytest.raises(CheckpointError, match=r"m\.json: corrupted or truncated.*Delete the file"):
        load_json(p)
    p.write_text("")
    with pytest.raises(CheckpointError, match="empty"):
        load_json(p)


# -- tensor files ---------------------------------------------------------------------
def test_tensors_round_trip_with_metadata(tmp_path):
    p = tmp_path / "t.safetensors"
    sums = save_tensors(p, _tensors(), {"step": 3, "note": "hi"})
    assert sums["a"] == tensor_sha256(_tensors()["a"])
    out, meta = load_tensors(p)
    assert meta == {"step": 3, "note": "hi"}
    for k, v in _tensors().items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)
    part, _ = load_tensors(p, names=["b"])
    assert list(part) == ["b"]


def test_shared_and_sliced_tensors_are_saved_standalone(tmp_path):
    base = torch.randn(8, 4)
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"w": base, "tied": base, "half": base[:4]})
    out, _ = load_tensors(p)
    assert torch.equal(out["tied"], base) and torch.equal(out["half"], base[:4])


def test_missing_file(tmp_path):
    with pytest.raises(MissingCheckpointError, match=r"nope\.safetensors: missing"):
        load_tensors(tmp_path / "nope.safetensors")


def test_truncated_data_names_sizes(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, _tensors())
    start, size = _data_start(p), p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    msg = rf"t\.safetensors: truncated: header says {size - start} bytes of data, file has {size - start - 100}"
    with pytest.raises(CheckpointError, match=msg):
        load_tensors(p)


@pytest.mark.parametrize("keep", [0, 5, 20])
def test_truncated_inside_header(tmp_path, keep):
    p = tmp_path / "t.safetensors"
    save_tensors(p, _tensors())
    with open(p, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(CheckpointError, match="truncated"):
        load_tensors(p)


def test_corrupted_header(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, _tensors())
    raw = bytearray(p.read_bytes())
    raw[9] = ord("#")  # inside the JSON header
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted header"):
        load_tensors(p)


def test_absurd_header_length(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="corrupted header"):
        read_header(p)


def test_flipped_data_byte_is_caught_only_when_verifying(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, _tensors())
    raw = bytearray(p.read_bytes())
    raw[_data_start(p) + 7] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"t\.safetensors: corrupted data: tensor '\w+' has SHA-256"):
        load_tensors(p)
    load_tensors(p, verify=False)  # the user asked not to check


def test_foreign_safetensors_file_needs_verify_false(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(3)}, str(p))
    with pytest.raises(CheckpointError, match="no mechscope checksums.*verify=False"):
        load_tensors(p)
    out, meta = load_tensors(p, verify=False)
    assert torch.equal(out["x"], torch.ones(3)) and meta is None


def test_unknown_tensor_name(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, _tensors())
    with pytest.raises(CheckpointError, match=r"no tensor\(s\) \['zz'\]"):
        load_tensors(p, names=["zz"])


# -- module checkpoints ---------------------------------------------------------------
def _mlp(d_hidden: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, d_hidden), nn.ReLU(), nn.Linear(d_hidden, 2))


def test_module_round_trip_and_config_check(tmp_path):
    p = tmp_path / "m.safetensors"
    src = _mlp()
    save_module(p, src, {"d_hidden": 8, "lr": 0.1})
    dst = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    meta = load_module_state(p, dst, expect_config={"d_hidden": 8, "lr": 0.1})
    assert meta["config"] == {"d_hidden": 8, "lr": 0.1}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"different config: lr: saved 0\.1, expected 0\.01"):
        load_module_state(p, dst, expect_config={"d_hidden": 8, "lr": 0.01})


def test_module_shape_and_name_mismatches_are_named(tmp_path):
    p = tmp_path / "m.safetensors"
    save_module(p, _mlp(8))
    wider = _mlp(16)
    before = [t.clone() for t in wider.state_dict().values()]
    with pytest.raises(CheckpointError, match=r"shape mismatch.*0\.weight: checkpoint \[8, 4\], module \[16, 4\]"):
        load_module_state(p, wider)
    assert all(torch.equal(a, b) for a, b in zip(before, wider.state_dict().values()))  # untouched
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint, e\.g\. \['1\.weight'"):
        load_module_state(p, other)


def test_plain_tensor_file_is_not_a_module_checkpoint(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, _tensors())
    with pytest.raises(CheckpointError, match="not a module checkpoint"):
        load_module_state(p, _mlp())


def test_metadata_is_json(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"x": torch.zeros(2)}, {"k": (1, 2)})
    _, record = read_header(p)
    assert record["format"] == "mechscope.tensors" and record["metadata"] == {"k": [1, 2]}
    assert json.loads(json.dumps(record))
