"""Bad input at the command line: exit 2 and one line that says what to fix; tracebacks only with --debug."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from mechscope.cli import main

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 40, "n_positions": 16,
        "bos_token_id": 0, "eos_token_id": 0}


def one_line_error(capsys, command=None):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(rf"{command or 'mechscope [a-z]+'}: error: ", lines[0]), err
    return lines[0]


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", ["probe", "steer", "reft"])
def test_data_files_that_cannot_be_read(tmp_path, capsys, command):
    cases = [(str(tmp_path / "none.jsonl"), "no such file"),
             (str(tmp_path), "is a directory; give a JSON-lines file"),
             (write(tmp_path / "empty.jsonl", "\n"), "holds no rows"),
             (write(tmp_path / "bad.jsonl", '\n{"tokens": [1\n'), "bad.jsonl:2: not valid JSON")]
    for data, message in cases:
        assert main([command, "--data", data]) == 2
        assert message in one_line_error(capsys, f"mechscope {command}")


@pytest.mark.parametrize("command", ["probe", "steer"])
def test_labels_and_token_ids_are_checked_before_the_forward(tmp_path, capsys, command):
    labels = write(tmp_path / "labels.jsonl", '{"tokens": [1, 2], "label": 0}\n{"tokens": [3], "label": "yes"}\n')
    assert main([command, "--data", labels]) == 2
    assert "labels.jsonl:2: field 'label' must be an integer, got \"yes\" (str)" in one_line_error(capsys)
    big = write(tmp_path / "big.jsonl", '{"tokens": [1, 2], "label": 0}\n{"tokens": [3, 40], "label": 1}\n')
    assert main([command, "--hf-config", json.dumps(GPT2), "--data", big, "--site", "resid_post.0"]) == 2
    assert ("big.jsonl:2: field 'tokens' holds token id 40, outside the model's vocabulary of 40 (ids 0..39)"
            in one_line_error(capsys))


def test_reft_data_fields(tmp_path, capsys):
    split = write(tmp_path / "s.jsonl", '{"prompt": [1], "answer": [2], "split": "dev"}\n')
    assert main(["reft", "--data", split]) == 2
    assert "s.jsonl:1: field 'split' must be one of ['train', 'test', 'unrelated'], got \"dev\"" in one_line_error(capsys)
    ids = write(tmp_path / "i.jsonl", '{"prompt": [1, "a"], "answer": [2]}\n')
    assert main(["reft", "--data", ids]) == 2
    assert "i.jsonl:1: field 'prompt' must hold integer token ids >= 0" in one_line_error(capsys)


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.import_module("mechscope.sae.train"), "train",
                        lambda *a, **k: pytest.fail("trained before checking --out"))
    existing = write(tmp_path / "file.txt", "x")
    assert main(["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory, but a file is expected" in one_line_error(capsys)
    assert main(["das", "--out", existing]) == 2
    assert f"--out {existing} is an existing file, but a directory is expected" in one_line_error(capsys)
    assert main(["spd", "figures", "--target", "tms_5_2", "--out", existing]) == 2
    assert "is an existing file, but a directory is expected" in one_line_error(capsys)
    nested = tmp_path / "a" / "b" / "sae.safetensors"
    assert main(["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--out", str(nested),
                 "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in one_line_error(capsys)


def test_parent_directories_are_made_and_the_out_file_locked(tmp_path, capsys):
    from mechscope.core.lock import LOCK_NAME

    nested = tmp_path / "a" / "b" / "sae.safetensors"
    assert main(["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--steps", "2", "--batch-size", "64",
                 "--no-progress", "--out", str(nested), "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    assert nested.exists() and not list(nested.parent.glob(".*.lock")) and not (tmp_path / "ck" / LOCK_NAME).exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    data = str(tmp_path / "none.jsonl")
    assert main(["probe", "--data", data, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("mechscope probe: error: --data")


def test_unknown_option_prints_the_commands_own_usage(capsys):
    assert main(["das", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mechscope das") and "unrecognized arguments: --bogus" in err
    assert main(["sae", "train", "--synthetic", "--bogus"]) == 2
    assert capsys.readouterr().err.startswith("usage: mechscope sae train")


def test_unknown_model_type_is_one_short_line(capsys):
    pytest.importorskip("transformers")
    assert main(["sites", "--hf-config", json.dumps({"model_type": "no_such_family"})]) == 2
    line = one_line_error(capsys, "mechscope sites")
    assert "does not know model_type 'no_such_family'" in line and len(line) < 300


def test_a_failure_inside_is_one_line_with_exit_1(tmp_path, monkeypatch, capsys):
    import mechscope.cli.das as das

    def broken(cfg, out):
        raise RuntimeError("something inside\nbroke")

    monkeypatch.setattr(das, "_run", broken)
    assert main(["das", "--out", str(tmp_path / "o")]) == 1
    line = one_line_error(capsys, "mechscope das")
    assert line.endswith("RuntimeError: something inside broke (run again with --debug for the traceback)")


def test_spd_resume_with_another_config_is_one_line(tmp_path, capsys):
    run = ["spd", "train", "--target", "tms_5_2", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "16",
           "--warmup-steps", "1"]
    assert main(run + ["--C", "4"]) == 0
    capsys.readouterr()
    assert main(run + ["--C", "5"]) == 2
    assert "was trained with --C 4, not 5; use another --out or the same settings" in one_line_error(capsys, "mechscope spd")


def test_a_damaged_shipped_checkpoint_names_the_command_that_rebuilds_it(tmp_path, monkeypatch, capsys):
    import shutil

    from mechscope.core import checkpoint

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    damaged = zoo / "sae_grokking_topk.safetensors"
    shutil.copy(checkpoint.SHIPPED_DIR / damaged.name, damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-3] ^= 0x20
    damaged.write_bytes(bytes(raw))
    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", zoo)
    with pytest.raises(checkpoint.CheckpointError, match="ships with mechscope: rebuild it with `mechscope train"):
        checkpoint.load_tensors(damaged)
    assert main(["sae", "eval", "--sae", str(damaged), "--synthetic"]) == 2
    line = one_line_error(capsys, "mechscope sae")
    assert "corrupted data" in line and "`mechscope train sae_grokking`" in line and "reinstall" in line
    assert "Delete the file" not in line


@pytest.mark.parametrize("command, locked", [
    (["bench", "--only", "core/hooks"], "{d}"),
    (["das"], "{d}"),
    (["spd", "train", "--target", "tms_5_2", "--steps", "2"], "{d}"),
    (["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--out", "{d}/sae.safetensors"], "{d}/.sae.safetensors.lock"),
    (["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--checkpoint-dir", "{d}"], "{d}"),
])
def test_every_run_directory_is_locked(tmp_path, capsys, command, locked):
    import os
    import socket

    from mechscope.core.lock import LOCK_NAME

    run = tmp_path / "run"
    run.mkdir()
    path = locked.format(d=run)
    lock = run / LOCK_NAME if path == str(run) else tmp_path / path
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00Z",
                                "job": None, "token": "t"}))
    argv = [a.format(d=run) for a in command]
    if "--out" not in argv and "--checkpoint-dir" not in argv:
        argv += ["--out", str(run)]
    elif "--checkpoint-dir" in argv:
        argv += ["--out", str(tmp_path / "sae.safetensors"), "--steps", "2", "--batch-size", "64"]
    assert main(argv) == 2
    assert f"is in use by another job (PID {os.getppid()} on host {socket.gethostname()}" in one_line_error(capsys)


def test_steer_target_token_outside_the_vocabulary(capsys):
    assert main(["steer", "--target-token", "999", "--n", "4"]) == 2
    assert "--target-token: token id 999 at index [0] is outside the model's vocabulary" in one_line_error(capsys)
