"""Checkpoints damaged (mechscope's tensor files, module checkpoints, SAE files, SPD
decompositions): every load is a typed error or exactly what was written, tensors and
metadata alike, never another exception."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from damage import (
    Written,
    byte_damage,
    examples,
    json_damage,
    json_paths,
    load_or_typed_error,
    safetensors_header_end,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mechscope.core.checkpoint import (
    load_module_state,
    load_tensors,
    save_module,
    save_tensors,
)
from mechscope.sae.arch import SAE, SAEConfig
from mechscope.sae.io import load_sae, read_sae_metadata, save_sae
from mechscope.sae.resume import load_checkpoint, save_checkpoint
from mechscope.sae.train import Trainer, TrainConfig
from mechscope.spd.checkpoint import (
    load_decomposition,
    load_training_state,
    read_extra,
    save_decomposition,
    save_training_state,
)
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.tasks.tms import TMSInstance

SAE_CFG = SAEConfig(d_in=6, d_sae=8, arch="topk", k=2)
META = {"step": 12, "history": [{"step": 10, "loss": 0.25}], "note": "written by the property tests"}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each kind, with what a faithful load gives back."""
    out = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    tensors = {"w": torch.randn(3, 4), "ids": torch.arange(5), "half": torch.randn(2).half()}
    save_tensors(out / "tensors.safetensors", tensors, META)
    linear = nn.Linear(3, 2)
    save_module(out / "module.safetensors", linear, {"d_in": 3, "d_out": 2})
    sae = SAE(SAEConfig(d_in=6, d_sae=8, arch="topk", k=2))
    save_sae(out / "sae.safetensors", sae, extra=META)
    tms = TMSInstance(5, 2)
    dec = Decomposition(tms, SPDConfig(sites=("encoder", "decoder"), C=3), example_inputs=torch.rand(2, 5))
    save_decomposition(out / "spd.safetensors", dec, extra=META)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    opt, gens = _optimiser(dec)
    sum(p.square().sum() for p in dec.parameters()).backward()
    opt.step()  # moments to save
    save_training_state(out / "spd_state.safetensors", dec, opt, 7, gens, META["history"])
    trainer = Trainer(SAE_CFG, TrainConfig(steps=4))
    trainer.step(torch.randn(16, 6))
    save_checkpoint(trainer, out / "sae_trainer.safetensors")
    return Written("checkpoints", dir=out, trainer={k: v.clone() for k, v in trainer.sae.state_dict().items()}, tensors=tensors, linear=linear.state_dict(), sae=sae.state_dict(),
                   tms=tms, dec=before, trained={k: v.clone() for k, v in dec.state_dict().items()},
                   opt=copy.deepcopy(opt.state_dict()), gens={k: g.get_state() for k, g in gens.items()})


def _optimiser(dec: Decomposition):
    return torch.optim.Adam(dec.parameters(), lr=1e-3), {"data": torch.Generator().manual_seed(3)}


def _load_tensors(path: Path, w: Written):
    tensors, meta = load_tensors(path)
    return _same_state(tensors, w.tensors) and meta == META


def _load_module(path: Path, w: Written):
    module = nn.Linear(3, 2)
    load_module_state(path, module, expect_config={"d_in": 3, "d_out": 2})
    return _same_state(module.state_dict(), w.linear)


def _load_sae(path: Path, w: Written):
    sae = load_sae(path)
    extra = read_sae_metadata(path)
    return _same_state(sae.state_dict(), w.sae) and {k: extra.get(k) for k in META} == META


def _load_spd(path: Path, w: Written):
    dec = load_decomposition(path, w.tms)
    return _same_state(dec.state_dict(), w.dec) and read_extra(path) == META


def _load_spd_state(path: Path, w: Written):
    dec = Decomposition(w.tms, SPDConfig(sites=("encoder", "decoder"), C=3))
    opt, gens = _optimiser(dec)
    gens["data"].manual_seed(99)
    step, history = load_training_state(path, dec, opt, gens)
    moments, saved = opt.state_dict()["state"], w.opt["state"]
    same_moments = moments.keys() == saved.keys() and all(
        torch.equal(moments[i][m], saved[i][m]) for i in saved for m in ("exp_avg", "exp_avg_sq"))
    return (step, history) == (7, META["history"]) and _same_state(dec.state_dict(), w.trained) and same_moments \
        and torch.equal(gens["data"].get_state(), w.gens["data"])


def _load_trainer(path: Path, w: Written):
    trainer = Trainer(SAE_CFG, TrainConfig(steps=4))
    meta = load_checkpoint(trainer, path)
    return _same_state(trainer.sae.state_dict(), w.trainer) and trainer.step_count == meta["step"] == 1


LOADERS = {"sae_trainer": _load_trainer, "tensors": _load_tensors, "module": _load_module, "sae": _load_sae, "spd": _load_spd,
           "spd_state": _load_spd_state}


@examples(100)
@given(data=st.data(), kind=st.sampled_from(sorted(LOADERS)))
def test_a_damaged_checkpoint_is_an_error_or_what_was_written(files, data, kind):
    raw = (files.dir / f"{kind}.safetensors").read_bytes()
    what, damaged = data.draw(byte_damage(raw, header=safetensors_header_end(raw)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.safetensors"
        path.write_bytes(damaged)
        ok, same = load_or_typed_error(lambda: LOADERS[kind](path, files), f"{kind}: {what}")
        assert not ok or same, f"{kind}: {what}: loaded without an error, but not what was written"


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_every_undamaged_checkpoint_loads_as_written(files, kind):
    assert LOADERS[kind](files.dir / f"{kind}.safetensors", files)


@examples(100)
@given(data=st.data(), kind=st.sampled_from(sorted(LOADERS)))
def test_metadata_of_another_shape_written_whole_is_an_error_or_a_load(files, data, kind):
    # a file written whole (valid checksums) by another version or a buggy writer: its
    # metadata may have any shape, and reading it must still fail with a typed error only
    tensors, meta = load_tensors(files.dir / f"{kind}.safetensors")
    if not json_paths(meta):
        return
    what, damaged = data.draw(json_damage(meta))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.safetensors"
        save_tensors(path, tensors, damaged)
        load_or_typed_error(lambda: LOADERS[kind](path, files), f"{kind} metadata: {what}")
