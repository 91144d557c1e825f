"""Bench checks of predicting and controlling: probes with their controls, steering with its
KL, representation finetuning beside prompting, steering, LoRA and full finetuning.

Every threshold below is written from the issue / spec before the check first ran:

- planted neurons (Gurnee et al.): k-sparse support overlap >= 0.9 at k = the planted size;
  F1 tracks the shift (Spearman >= 0.9 over six shifts); the control task stays near
  chance (<= 0.05 above the majority class) while the real probe does not (>= 0.1 above);
  the online code compresses the labels (compression > 1, shuffled labels beside it);
- steering toy: difference of means has cosine > 0.9 with the planted concept's direction;
  ablation brings the rate of emitting R on concept inputs to within 0.05 of its base rate
  (concept-free inputs); addition makes R the output on >= 90 % of concept-free inputs;
  KL of the unrelated behaviour (next-symbol prediction) <= 0.1 nats under ablation; the
  weight edit equals the hook form (max |logit difference| <= 1e-4);
- instruction task: LoReFT within 0.05 accuracy of LoRA with >= 10x fewer parameters.

The Othello world model's probes and edits are in :mod:`mechscope.bench.othello_checks`.
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.bench import Result, check
from mechscope.core.site import Site
from mechscope.core.collect import activations
from mechscope.probe.control import control_labels, probe_with_controls, shuffled_labels
from mechscope.probe.linear import split_indices, train_probe
from mechscope.probe.mdl import online_codelength
from mechscope.probe.sparse import RANKINGS, f1_score, sparse_probe
from mechscope.steer.apply import ablate, steer
from mechscope.steer.baselines import compare
from mechscope.probe.linear import probe_direction
from mechscope.steer.directions import actadd, cosine, diff_of_means, pca_of_differences
from mechscope.steer.finetune import TrainRecipe
from mechscope.steer.orthogonalize import orthogonalize_weights
from mechscope.tasks import instructions as ins
from mechscope.tasks import registry
from mechscope.tasks import steering_toy as st
from mechscope.tasks.planted import make_planted


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in t.unique():  # ties share their mean rank
            r[t == val] = r[t == val].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-12))


# =========================================================================== planted neurons
_PLANTED = dict(n=4000, d=512, k=8)
_SHIFTS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


@check("planted", "sparse_probe", "support_overlap", threshold=(">=", 0.9),
       other_metrics={"f1_shift_spearman": (">=", 0.9)},
       baselines={"random_neurons": "overlap / F1 of k neurons drawn at random"},
       description="k-sparse probes (mean difference, F-statistic, mutual information, L1) recover the "
                   "planted neurons at k = planted size, and their test F1 grows with the shift")
def planted_sparse(ctx) -> list[Result]:
    shifts = _SHIFTS
    n = _PLANTED["n"] * (4 if ctx.full else 1)
    f1: dict[str, list[float]] = {m: [] for m in RANKINGS}
    overlap: dict[str, float] = {}
    chosen: dict[str, list[int]] = {}
    rand_f1 = []
    for i, shift in enumerate(shifts):
        data = make_planted(n=n, d=_PLANTED["d"], k=_PLANTED["k"], shift=shift, seed=ctx.seed * 100 + i)
        split = split_indices(n, (0.6, 0.2, 0.2), ctx.seed)
        for method in RANKINGS:
            sp = sparse_probe(data.x, data.y, _PLANTED["k"], method, split=split)
            f1[method].append(sp.f1)
            if shift == 0.4:  # the overlap row: the middle of the spec's shift range
                overlap[method] = sp.overlap(data.support.tolist())
                chosen[method] = sp.neurons
        gen = torch.Generator().manual_seed(ctx.seed + i)
        rnd = torch.randperm(_PLANTED["d"], generator=gen)[:_PLANTED["k"]]
        fit = train_probe(data.x[:, rnd], data.y, split=split)
        rand_f1.append(f1_score(fit.probe.predict_index(data.x[split[2]][:, rnd])[:, 0], data.y[split[2]]))
        if shift == 0.4:
            support = data.support.tolist()
            rand_overlap = len(set(rnd.tolist()) & set(support)) / len(support)
    with ctx.figure("f1_vs_shift", caption="Test F1 of k-sparse probes (k = 8 planted neurons of 512) against "
                    "the planted shift, per neuron ranking; random neurons as the baseline") as fig:
        ax = fig.add_subplot()
        for method in RANKINGS:
            ax.plot(shifts, f1[method], marker="o", label=method)
        ax.plot(shifts, rand_f1, ls="--", color="gray", label="random k neurons")
        ax.set_xscale("log")
        ax.set_xlabel("shift")
        ax.set_ylabel("test F1")
        ax.legend(fontsize=7)
    rows = []
    for method in RANKINGS:
        detail = {"ranking": method, "shift": 0.4, "chosen_neurons": chosen[method], "planted": support, **_PLANTED, "n": n}
        rows.append(Result(overlap[method], baselines={"random_neurons": rand_overlap}, detail=detail))
        rows.append(Result(_spearman(list(shifts), f1[method]), metric="f1_shift_spearman",
                           baselines={"random_neurons": _spearman(list(shifts), rand_f1)},
                           detail={"ranking": method, "shifts": list(shifts), "f1": f1[method], "random_f1": rand_f1}))
    return rows


@check("planted", "linear_probe", "control_excess", threshold=("<=", 0.05),
       other_metrics={"task_excess": (">=", 0.1), "memorising_control_excess": None},
       baselines={"shuffled_labels": "accuracy above majority of a probe on shuffled labels",
                  "task_probe": "accuracy above majority of the real probe"},
       description="control task (random label per input type): its probe stays at chance while the real "
                   "probe does not; with type-revealing activations the control probe memorises")
def planted_control(ctx) -> list[Result]:
    n = _PLANTED["n"] * (2 if ctx.full else 1)
    data = make_planted(n=n, d=_PLANTED["d"], k=_PLANTED["k"], shift=1.0, seed=ctx.seed)
    c = probe_with_controls(data.x, data.y, data.types, seed=ctx.seed)
    chance = c.majority_accuracy
    # the same probe on activations that reveal each example's type: memorisation shows up
    mem = make_planted(n=n, d=_PLANTED["d"], k=_PLANTED["k"], shift=1.0, type_strength=0.9, seed=ctx.seed)
    cm = probe_with_controls(mem.x, mem.y, mem.types, seed=ctx.seed)
    detail = {"shift": 1.0, **_PLANTED, "n": n, "n_types": int(data.types.unique().numel()), **c.summary()}
    return [
        Result(c.control_accuracy - chance, detail=detail,
               baselines={"shuffled_labels": c.shuffled_accuracy - chance, "task_probe": c.accuracy - chance}),
        Result(c.accuracy - chance, metric="task_excess", detail=detail,
               baselines={"shuffled_labels": c.shuffled_accuracy - chance}),
        Result(cm.control_accuracy - cm.majority_accuracy, metric="memorising_control_excess",
               detail={"type_strength": 0.9, **cm.summary(),
                       "note": "types visible in the activations: a high value is memorisation, as the control task detects"}),
    ]


@check("planted", "mdl_probe", "compression", threshold=(">", 1.0),
       baselines={"shuffled_labels": "compression of the same labels shuffled",
                  "control_task": "compression of the control-task labels"},
       description="online code (Voita & Titov): uniform codelength / online codelength, in bits")
def planted_mdl(ctx) -> Result:
    n = _PLANTED["n"] // 2 * (4 if ctx.full else 1)
    data = make_planted(n=n, d=_PLANTED["d"], k=_PLANTED["k"], shift=1.0, seed=ctx.seed)
    real = online_codelength(data.x, data.y, seed=ctx.seed)
    shuf = online_codelength(data.x, shuffled_labels(data.y, ctx.seed + 1), seed=ctx.seed)
    ctrl = online_codelength(data.x, control_labels(data.types, data.y, ctx.seed + 2), seed=ctx.seed)
    with ctx.figure("online_code", caption="Bits to transmit each block's labels (online code), real labels "
                    "against shuffled and control-task labels") as fig:
        ax = fig.add_subplot()
        for name, code in (("real", real), ("shuffled", shuf), ("control task", ctrl)):
            ax.plot(code.block_ends, torch.tensor(code.block_bits).cumsum(0).tolist(), marker=".", label=name)
        ax.plot(real.block_ends, [e for e in real.block_ends], ls="--", color="gray", label="uniform (1 bit/label)")
        ax.set_xscale("log")
        ax.set_xlabel("examples transmitted")
        ax.set_ylabel("cumulative bits")
        ax.legend(fontsize=7)
    return Result(real.compression, baselines={"shuffled_labels": shuf.compression, "control_task": ctrl.compression},
                  detail={**real.summary(), "shuffled_bits": shuf.codelength, "control_bits": ctrl.codelength,
                          "shift": 1.0, "n": n, "d": _PLANTED["d"]})


# =========================================================================== steering toy
def _steering_model(ctx) -> Any:
    return ctx.world_model(registry.get("steering_toy"), "the steering toy")


def _toy_setup(ctx) -> dict[str, Any]:
    """The model, data splits and the difference of means at every layer's output at the query."""
    model = _steering_model(ctx)
    n = 2000 if ctx.full else 600
    s = ctx.seed * 1000
    fit_pos, fit_neg = st.sample(n, s + 1, concept=True), st.sample(n, s + 2, concept=False)
    val_pos, val_neg = st.sample(n // 2, s + 3, concept=True), st.sample(n // 2, s + 4, concept=False)
    test_pos, test_neg = st.sample(n, s + 5, concept=True), st.sample(n, s + 6, concept=False)
    sites = [Site(f"blocks.{l}", positions=[st.QUERY_POS]) for l in range(st.MODEL.n_layers)]
    dirs = [diff_of_means(activations(model, fit_pos.ids, site), activations(model, fit_neg.ids, site)) for site in sites]
    return dict(model=model, sites=sites, dirs=dirs, val=(val_pos.ids, val_neg.ids), test=(test_pos.ids, test_neg.ids),
                fit=(fit_pos.ids, fit_neg.ids), n=n)


def _select_layer(setup: dict[str, Any]) -> tuple[int, dict[int, dict[str, float]]]:
    """Arditi et al.'s selection, on the validation split: among layers whose direction, added
    at coefficient 1, makes R the output on at least half of the concept-free inputs and whose
    ablation keeps the unrelated KL below 0.1, the one whose ablation leaves the least P(R)."""
    model, (pos, neg) = setup["model"], setup["val"]
    with torch.no_grad():
        clean_neg = model(neg)
        scores = {}
        for layer, v in enumerate(setup["dirs"]):
            induced = st.r_rate(steer(model, neg, v, Site(f"blocks.{layer}"), 1.0))["argmax_r"]
            kl = st.content_kl(clean_neg, ablate(model, neg, v))
            scores[layer] = {"ablated_p_r": st.r_rate(ablate(model, pos, v))["p_r"], "induced": induced, "kl": kl}
    ok = [l for l, s in scores.items() if s["induced"] >= 0.5 and s["kl"] < 0.1]
    best = min(ok or scores, key=lambda l: scores[l]["ablated_p_r"])
    return best, scores


@check("steering_toy", "diff_of_means", "cosine_to_concept", threshold=(">", 0.9),
       baselines={"probe_direction": "cosine of a logistic probe's direction", "actadd_one_pair": "ActAdd, one prompt pair",
                  "pca_of_differences": "RepE reading vector", "random_direction": "a random direction"},
       description="difference of means at the middle layer (query position) against the planted concept's "
                   "direction there (mean over matched pairs of marked minus plain sequences)")
def toy_direction(ctx) -> Result:
    model = _steering_model(ctx)
    n = 2000 if ctx.full else 600
    layer = st.MODEL.n_layers // 2
    site = Site(f"blocks.{layer}", positions=[st.QUERY_POS])
    s = ctx.seed * 1000
    pos = activations(model, st.sample(n, s + 1, concept=True).ids, site)
    neg = activations(model, st.sample(n, s + 2, concept=False).ids, site)
    truth = st.concept_direction(model, site, n=n, seed=s + 7)
    marked, plain = st.pairs(n, s + 8)
    pm, pp = activations(model, marked, site), activations(model, plain, site)
    dm = diff_of_means(pos, neg)
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).long()
    base = {"probe_direction": cosine(probe_direction(torch.cat([pos, neg]), labels, seed=ctx.seed), truth),
            "actadd_one_pair": cosine(actadd(pm[0], pp[0]), truth),
            "pca_of_differences": cosine(pca_of_differences(pm, pp, seed=ctx.seed), truth),
            "random_direction": cosine(torch.randn(truth.shape[0], generator=torch.Generator().manual_seed(ctx.seed)), truth)}
    value = cosine(dm, truth)
    with ctx.figure("direction_cosines", caption=f"Cosine with the planted concept direction at blocks.{layer} "
                    "(query position), per way of finding a direction") as fig:
        ax = fig.add_subplot()
        names = ["diff_of_means", *base]
        ax.barh(names, [value, *base.values()], color=["#4a7"] + ["#888"] * len(base))
        ax.axvline(0.9, ls="--", color="red")
        ax.set_xlabel("cosine with concept direction")
    return Result(value, baselines=base, detail={"site": str(site), "n_per_class": n, "norm": float(dm.norm())})


@check("steering_toy", "directional_ablation", "r_rate_excess", threshold=("<=", 0.05),
       other_metrics={"kl_unrelated": ("<=", 0.1)},
       baselines={"clean": "rate of R on concept inputs without ablation",
                  "random_direction": "after ablating a random direction"},
       description="ablating the difference-of-means direction at every layer and position: rate of emitting R "
                   "on concept inputs minus the base rate (concept-free inputs); KL of next-symbol predictions "
                   "on concept-free inputs")
def toy_ablation(ctx) -> list[Result]:
    setup = _toy_setup(ctx)
    layer, scores = _select_layer(setup)
    model, (pos, neg), v = setup["model"], setup["test"], setup["dirs"][layer]
    rnd = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
    with torch.no_grad():
        base_rate = st.r_rate(model(neg))["argmax_r"]
        clean = st.r_rate(model(pos))["argmax_r"]
        ablated = st.r_rate(ablate(model, pos, v))
        random_ablated = st.r_rate(ablate(model, pos, rnd))["argmax_r"]
        kl = st.content_kl(model(neg), ablate(model, neg, v))
        kl_query = st.query_kl(model(neg), ablate(model, neg, v))
    detail = {"layer": layer, "selection": scores, "base_rate": base_rate, "ablated_rate": ablated["argmax_r"],
              "ablated_mean_p_r": ablated["p_r"], "query_kl_concept_free": kl_query, "n_test": setup["n"]}
    return [Result(ablated["argmax_r"] - base_rate, detail=detail,
                   baselines={"clean": clean - base_rate, "random_direction": random_ablated - base_rate}),
            Result(kl, metric="kl_unrelated", detail={"layer": layer, "what": "KL(clean || ablated), next-symbol "
                                                      "predictions at content positions of concept-free inputs"})]


@check("steering_toy", "addition", "r_rate_induced", threshold=(">=", 0.9),
       other_metrics={"kl_unrelated": None},
       baselines={"clean": "rate of R on concept-free inputs", "random_direction": "adding a random direction of the same norm"},
       description="adding the difference of means (coefficient 1) at the selected layer, every position, to "
                   "concept-free inputs: rate of emitting R; KL of next-symbol predictions; strength sweep figure")
def toy_addition(ctx) -> list[Result]:
    setup = _toy_setup(ctx)
    layer, _ = _select_layer(setup)
    model, (_, neg), v = setup["model"], setup["test"], setup["dirs"][layer]
    site = Site(f"blocks.{layer}")
    rnd = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
    rnd = rnd / rnd.norm() * v.norm()
    coeffs = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
    with torch.no_grad():
        clean = model(neg)
        sweep = []
        for c in coeffs:
            out = steer(model, neg, v, site, c)
            sweep.append({"coeff": c, "r_rate": st.r_rate(out)["argmax_r"], "kl": st.content_kl(clean, out)})
        at1 = next(r for r in sweep if r["coeff"] == 1.0)
        random_rate = st.r_rate(steer(model, neg, rnd, site, 1.0))["argmax_r"]
    with ctx.figure("strength_sweep", caption=f"Adding c x (difference of means) at blocks.{layer} on concept-free "
                    "inputs: rate of emitting R and KL of the unrelated next-symbol predictions") as fig:
        ax = fig.add_subplot()
        ax.plot(coeffs, [r["r_rate"] for r in sweep], marker="o", color="#4a7", label="rate of R")
        ax.set_xlabel("coefficient c")
        ax.set_ylabel("rate of R")
        ax2 = ax.twinx()
        ax2.plot(coeffs, [r["kl"] for r in sweep], marker="s", color="#a47", label="KL unrelated")
        ax2.set_ylabel("KL (nats)")
        ax2.set_yscale("symlog", linthresh=1e-3)
        fig.legend(loc="center right", fontsize=7)
    detail = {"layer": layer, "coeff": 1.0, "norm": float(v.norm()), "sweep": sweep}
    return [Result(at1["r_rate"], detail=detail,
                   baselines={"clean": st.r_rate(clean)["argmax_r"], "random_direction": random_rate}),
            Result(at1["kl"], metric="kl_unrelated", detail={"layer": layer, "coeff": 1.0})]


@check("steering_toy", "weight_orthogonalization", "max_abs_diff", threshold=("<=", 1e-4),
       baselines={"unedited": "max |logit difference| of the unedited model (the edit must matter)"},
       description="orthogonalising embedding, attention-output and MLP-output weights against the direction "
                   "gives the same logits as directional ablation by hooks")
def toy_weight_edit(ctx) -> Result:
    setup = _toy_setup(ctx)
    model, (pos, neg) = setup["model"], setup["test"]
    diffs, changed = [], []
    with torch.no_grad():
        for v in setup["dirs"]:
            ids = torch.cat([pos[:200], neg[:200]])
            hooked = ablate(model, ids, v)
            edited = orthogonalize_weights(model, v)(ids)
            diffs.append(float((hooked - edited).abs().max()))
            changed.append(float((model(ids) - edited).abs().max()))
        scale = float(model(pos[:50]).abs().max())
    return Result(max(diffs), baselines={"unedited": min(changed)},
                  detail={"per_layer_direction": diffs, "logit_scale": scale})


# =========================================================================== instruction task: ReFT and baselines
# One learning rate for every adapter (ReFT, LoRA) and a lower one for full finetuning, where
# every weight moves; --full trains the same way on twice the data for twice the steps.
_ADAPTER_LR = 1e-2
_FULL_FT_LR = 1e-3


def _comparison(ctx) -> list[Any]:
    model = ctx.world_model(registry.get("instructions"), "the instruction model")
    n_train, n_test = (2000, 1000) if ctx.full else (1000, 300)
    task = ins.comparison_task(n_train, n_test, n_test, seed=ctx.seed)
    sites = [Site(f"blocks.{l}", io="input") for l in range(ins.MODEL.n_layers)]  # resid_pre of every block
    recipe = TrainRecipe(steps=800 if ctx.full else 400, lr=_ADAPTER_LR)
    return compare(model, task, sites, ins.MODEL.d_model, recipe=recipe, batch_size=32, rank=4, positions="f2+l2",
                   lora_rank=8, lora_alpha=16.0, full_lr=_FULL_FT_LR, seed=ctx.seed,
                   log=lambda s: ctx.log.info(s[:200]))


@check("instructions", "loreft", "accuracy_gap_to_lora", threshold=("<=", 0.05),
       other_metrics={"lora_param_ratio": (">=", 10.0), "accuracy": None, "kl_unrelated": None},
       baselines={"prompting": "instruction token in the prompt", "steering": "contrastive vector, best site/position/coeff",
                  "direft": "DiReFT, same sites and rank", "lora": "LoRA r=8 on every linear layer (peft)",
                  "full_finetuning": "every parameter trained"},
       description="make the instruction model reverse without being told: LoReFT (rank 4, resid_pre of every block, "
                   "first 2 + last 2 prompt tokens) against prompting, steering, DiReFT, LoRA and full finetuning on the "
                   "same data; accuracy = exact match of the greedy answer, KL on unrelated (SORT/SHIFT) prompts")
def reft_table(ctx) -> list[Result]:
    rows = {r.method: r for r in _comparison(ctx)}
    lo, lora = rows["loreft"], rows["lora"]
    table = [r.row() for r in rows.values()]
    for r in table:
        r.pop("selection", None)
    with ctx.figure("baseline_table", caption="Trainable parameters against task accuracy (marker) and KL on unrelated "
                    "prompts (label), per method, on the same task and data") as fig:
        ax = fig.add_subplot()
        for r in rows.values():
            x = max(r.trainable_params, 1)
            ax.scatter([x], [r.accuracy], s=40)
            ax.annotate(f"{r.method}\nKL {r.kl_unrelated:.2f}", (x, r.accuracy), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (prompting plotted at 1)")
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(-0.05, 1.1)
    acc = {k: v.accuracy for k, v in rows.items() if k != "loreft"}
    kl = {k: v.kl_unrelated for k, v in rows.items() if k != "loreft"}
    params = {k: float(v.trainable_params) for k, v in rows.items() if k != "loreft"}
    detail = {"table": table, "setting": "full" if ctx.full else "reduced", "adapter_lr": _ADAPTER_LR,
              "full_finetuning_lr": _FULL_FT_LR}
    return [Result(lora.accuracy - lo.accuracy, detail=detail,
                   baselines={k: lora.accuracy - v for k, v in acc.items() if k != "lora"}),
            Result(lora.trainable_params / lo.trainable_params, metric="lora_param_ratio",
                   detail={"loreft_params": lo.trainable_params, "lora_params": lora.trainable_params},
                   baselines={k: v / lo.trainable_params for k, v in params.items() if v > 0}),
            Result(lo.accuracy, metric="accuracy", baselines=acc, detail={"method": "loreft"}),
            Result(lo.kl_unrelated, metric="kl_unrelated", baselines=kl, detail={"method": "loreft"})]
