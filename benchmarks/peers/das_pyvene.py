"""DAS training steps: mechscope against pyvene, same MLP, same data, same intervention.

The network is the hierarchical-equality MLP of the DAS paper (16-16-16-16-2, ReLU), the
shipped checkpoint, copied into pyvene's own MLP classifier (``MLPForClassification``:
the same layers, dropout 0). The intervention is the one ``bench_das.py`` trains: WX and
YZ at hidden layer 0, 8 dimensions each of one shared 16 x 16 orthonormal basis
(pyvene: ``RotatedSpaceIntervention`` with subspace partition [[0, 8], [8, 16]] on two
linked representations, as its DAS tutorial sets it up). Batch 6400, Adam at lr 1e-2, the
same batches in the same order. mechscope runs ``das.fit`` on its tail engine (the
activations before the site computed once) and, for information, on full forwards (as
pyvene does). Before timing, both are set to the same basis and their counterfactual
logits on one batch are compared, so that the work is the same.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import pyvene as pv
import torch
from _rows import fix_threads, interleaved, row
from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification

from mechscope.causal.das import FitConfig, SubspaceAlignment, fit, frozen, widths_of
from mechscope.causal.engine import FullEngine, TailEngine
from mechscope.tasks import hierarchical_equality as task

BATCH, STEPS = 6400, 3


def pyvene_model(model: torch.nn.Module) -> MLPForClassification:
    cfg = MLPConfig(h_dim=16, n_layer=3, num_classes=2, activation_function="relu", pdrop=0.0)
    pv_model = MLPForClassification(cfg).eval()
    with torch.no_grad():
        for block, layer in zip(pv_model.mlp.h, model.layers):
            block.ff1.weight.copy_(layer.weight), block.ff1.bias.copy_(layer.bias)
        pv_model.score.weight.copy_(model.readout.weight), pv_model.score.bias.copy_(model.readout.bias)
    return pv_model


def intervenable(pv_model: MLPForClassification) -> pv.IntervenableModel:
    reps = [pv.RepresentationConfig(0, "block_output", "pos", 1, subspace_partition=[[0, 8], [8, 16]],
                                    intervention_link_key=0) for _ in range(2)]
    model = pv.IntervenableModel(pv.IntervenableConfig(representations=reps,
                                                       intervention_types=pv.RotatedSpaceIntervention), pv_model)
    model.set_device("cpu")
    model.disable_model_gradients()
    return model


def pyvene_logits(model: pv.IntervenableModel, base, wx, yz) -> torch.Tensor:
    b = base.shape[0]
    _, out = model({"inputs_embeds": base[:, None]}, [{"inputs_embeds": wx[:, None]}, {"inputs_embeds": yz[:, None]}],
                   {"sources->base": ([[[0]] * b, [[0]] * b], [[[0]] * b, [[0]] * b])},
                   subspaces=[[[0]] * b, [[1]] * b])
    return out[0] if isinstance(out, tuple) else out.logits  # [b, 2]


def main() -> int:
    threads = fix_threads()
    print(f"== DAS steps, mechscope vs pyvene {version('pyvene')} (torch {torch.__version__}, threads={threads})")
    model = task.load_model().eval()
    train = task.training_counterfactuals(BATCH * STEPS // 3, seed=0)  # STEPS full batches
    site = task.site(0)
    places = {v: site for v in train.variables}
    cfg = FitConfig(batch_size=BATCH, epochs=1)
    with frozen(model):
        engines = {"tail": TailEngine(model, train, places), "full": FullEngine(model, train, places, full_sources=True)}
        widths = widths_of(engines["tail"], [site])

    pv_net = intervenable(pyvene_model(model))
    params = list({id(p): p for p in pv_net.get_trainable_parameters()}.values())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    batches = [order[i * BATCH:(i + 1) * BATCH] for i in range(STEPS)]
    wx, yz = (train.sources[v] for v in ("WX", "YZ"))

    # the same work: with pyvene's rotation set to our basis, the counterfactual logits agree
    ours = SubspaceAlignment(places, {"WX": 8, "YZ": 8}, widths, seed=0)
    rot = next(iter(pv_net.interventions.values()))
    rot = rot[0] if isinstance(rot, (list, tuple)) else rot
    with torch.no_grad():
        rot.rotate_layer.weight = ours.featurizers[0].basis().detach().clone()
        idx = batches[0]
        with frozen(model):
            mine = engines["full"].logits(idx, ours.mix, ours.mix_site)
        theirs = pyvene_logits(pv_net, train.base[idx], wx[idx], yz[idx])
    gap = float((mine - theirs).abs().max())
    print(f"  same intervention: counterfactual logits at the same basis differ by at most {gap:.1e}")

    def pyvene_fit() -> None:
        for idx in batches:
            logits = pyvene_logits(pv_net, train.base[idx], wx[idx], yz[idx])
            loss = torch.nn.functional.cross_entropy(logits, train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def ours_fit(kind: str):
        def go() -> None:
            fit(model, train, SubspaceAlignment(places, {"WX": 8, "YZ": 8}, widths, seed=0), cfg=cfg,
                engine=engines[kind])
        return go

    quick = "--quick" in sys.argv
    t = interleaved({"pyvene": pyvene_fit, "tail": ours_fit("tail"), "full": ours_fit("full")},
                    repeats=5 if quick else 15)
    per = {k: v / STEPS for k, v in t.items()}
    work = f"DAS step (MLP 16x3, batch {BATCH}, 2x8 dims)"
    row(work, f"pyvene {version('pyvene')}", per["pyvene"], per["tail"], "steps/s", f"logits agree to {gap:.0e}")
    row(work + ", full forwards", f"pyvene {version('pyvene')}", per["pyvene"], per["full"], "steps/s", "both run whole forwards")
    return 0 if gap < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
