"""Experiment logging: jsonl needs nothing, tensorboard and wandb are imported only when asked
(faked here: no package, no network), bad kinds and missing packages are clear errors."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from mechscope.cli import main
from mechscope.core.tracking import TrackingError, numbers, open_tracker


def test_numbers_keeps_finite_scalars_only():
    got = numbers({"loss": 0.5, "step": 3, "t": torch.tensor(2.0), "nan": math.nan, "flag": True,
                   "live": {"a": 1}, "name": "x"})
    assert got == {"loss": 0.5, "step": 3.0, "t": 2.0}


def test_jsonl_tracker_writes_config_then_one_line_per_step(tmp_path):
    with open_tracker("jsonl", tmp_path / "logs", config={"lr": 0.1}) as t:
        t.log({"loss": 1.0}, 1)
        t.log({"loss": 0.5, "skip": "me"}, 2)
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"config": {"lr": 0.1}}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_none_and_disabled_log_nothing(tmp_path):
    for tracker in (open_tracker("none", tmp_path / "a"), open_tracker("jsonl", tmp_path / "b", enabled=False)):
        tracker.log({"loss": 1.0}, 1)
        tracker.close()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wandb_is_imported_only_when_asked(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with open_tracker("wandb", tmp_path, config={"k": 1}, name="run1") as t:
        t.log({"loss": 0.25}, 7)
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"k": 1} and calls[0][1]["name"] == "run1"
    assert calls[1] == ("log", {"loss": 0.25}, 7) and calls[2] == ("finish",)


def test_missing_package_and_unknown_kind_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(TrackingError, match="pip install wandb"):
        open_tracker("wandb", tmp_path)
    with pytest.raises(TrackingError, match="unknown tracker"):
        open_tracker("mlflow", tmp_path)


def test_sae_train_logs_every_history_entry_to_jsonl(tmp_path):
    out = tmp_path / "sae.safetensors"
    assert main(["sae", "train", "--synthetic", "--d-sae", "64", "--k", "5", "--steps", "4", "--batch-size", "64",
                 "--log-every", "2", "--out", str(out), "--log-to", "jsonl", "--no-progress"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "sae-logs" / "metrics.jsonl").read_text().splitlines()]
    assert "config" in lines[0] and [r["step"] for r in lines[1:]] == [2, 4] and "fvu" in lines[1]


def test_spd_train_logs_every_record_to_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["spd", "train", "--target", "tms_5_2", "--out", str(run_dir), "--steps", "4", "--batch-size", "16",
                 "--log-every", "2", "--log-to", "jsonl"]) == 0
    lines = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["steps"] == 4 and [r["step"] for r in lines[1:]] == [2, 4] and "total" in lines[1]
