"""The SAELens layout (cfg.json + sae_weights.safetensors) damaged: a typed error or the
dictionary as written, with its sizes read as written (never ``k: 1.5`` read as 1).

Neither file has a checksum (the layout is SAELens'), so a flipped bit among the weights or
a digit of cfg.json changed into another digit cannot be seen; a changed type, a
truncation and damage to the weights' header must be."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from damage import (
    Written,
    byte_damage,
    examples,
    json_damage,
    load_or_typed_error,
    safetensors_header_end,
)
from hypothesis import given
from hypothesis import strategies as st

from mechscope.sae.arch import SAE, SAEConfig
from mechscope.sae.saelens import CFG, WEIGHTS, load_saelens, save_saelens


@pytest.fixture(scope="module", params=["topk", "jumprelu"])
def written(request, tmp_path_factory):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=8, arch=request.param, k=2))
    out = save_saelens(tmp_path_factory.mktemp(f"saelens_{request.param}"), sae, hook_name="blocks.0")
    loaded, _ = load_saelens(out)
    return Written(f"saelens {request.param}", dir=out, state=loaded.state_dict(), cfg=loaded.cfg)


def check(directory: Path, w: Written, what: str) -> None:
    ok, loaded = load_or_typed_error(lambda: load_saelens(directory)[0], what)
    if ok:
        state = loaded.state_dict()
        assert state.keys() == w.state.keys() and all(torch.equal(state[k], w.state[k]) for k in state), \
            f"{what}: loaded a different dictionary without an error"
        assert loaded.cfg == w.cfg, f"{what}: loaded as {loaded.cfg}, written as {w.cfg}"


def damaged_copy(w: Written, name: str, data: bytes) -> tuple[tempfile.TemporaryDirectory, Path]:
    holder = tempfile.TemporaryDirectory()
    directory = Path(holder.name) / "sae"
    shutil.copytree(w.dir, directory)
    (directory / name).write_bytes(data)
    return holder, directory


@examples(80)
@given(data=st.data())
def test_a_damaged_cfg_is_an_error_or_the_same_dictionary(written, data):
    what, doc = data.draw(json_damage(json.loads((written.dir / CFG).read_text())))
    holder, directory = damaged_copy(written, CFG, json.dumps(doc).encode())
    with holder:
        check(directory, written, what)


@examples(50)
@given(data=st.data())
def test_cfg_bytes_damaged_are_an_error_or_a_dictionary(written, data):
    # cfg.json has no checksum: a flipped digit (k 2 -> 3) is another valid file, so only
    # the kind of failure is checked here; a changed type is checked above
    what, raw = data.draw(byte_damage((written.dir / CFG).read_bytes()))
    holder, directory = damaged_copy(written, CFG, raw)
    with holder:
        load_or_typed_error(lambda: load_saelens(directory), what)


@examples(50)
@given(data=st.data())
def test_truncated_or_damaged_weight_headers_are_errors(written, data):
    raw = (written.dir / WEIGHTS).read_bytes()
    end = safetensors_header_end(raw)
    cut = st.integers(0, len(raw) - 1).map(lambda k: (f"truncated to {k} bytes", raw[:k]))
    flipped = st.tuples(st.integers(0, end - 1), st.integers(0, 7)).map(
        lambda p: (f"bit {p[1]} of header byte {p[0]}", bytes(b ^ (1 << p[1]) if i == p[0] else b
                                                            for i, b in enumerate(raw))))
    what, damaged = data.draw(st.one_of(cut, flipped))
    holder, directory = damaged_copy(written, WEIGHTS, damaged)
    with holder:
        check(directory, written, what)
