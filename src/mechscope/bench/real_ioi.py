"""Indirect-object identification in the reference real model (issue 20, row 2).

Prompts are written for this project (:mod:`mechscope.bench.real_ioi_data`): "When Mary
and John went to the store, John gave a drink to", every word one token in a fixed slot,
so all prompts have 15 tokens and positions align; the corrupted counterpart swaps which
name repeats (S2 becomes the IO), so clean and corrupt differ only at S2 (position 10)
and, the model being causal, the residual stream before S2 is the same in both runs. The
metric is logit(IO) - logit(S) of the clean prompt at the final position, read from the
model's logits at that position only (``logits_to_keep=1``: the vocabulary is 262k).

Pre-registered before the first run (thresholds from issue 20; Wang et al. 2022 for the
task, Nanda 2023 / Kramar et al. 2024 for attribution patching), on ``N_PROMPTS`` prompts
and, for patching, the first ``N_PATCH`` of them (half IO-first, half IO-second), all 18
layers:

- the model prefers the IO over S (logit difference > 0) on >= 80 % of clean prompts
  (Wilson interval);
- residual-stream patching (denoising: clean into corrupt, ``resid_pre`` of every layer x
  every position from S2 on) moves the signal from S2 to the final position: the first
  layer where the final position carries > 0.5 of the summed |effect| comes after the
  layer where S2's |effect| peaks (score = takeover - peak >= 1);
- head patching at the final position: the top 10 % of the 72 heads (7) carry >= 50 % of
  the summed |effect|;
- attribution patching on the same head cells correlates with real patching (Pearson
  >= 0.7, a finding); the residual cells' correlation is information.

Intervals bootstrap over the patching prompts: each prompt is patched on its own, and a
resample's effects are computed from its prompts' mean metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.bench import Criterion, Result, check
from mechscope.bench.real_ioi_data import (
    FINAL_POS,
    N_TOKENS,
    NAMES,
    S2_POS,
    check_layout,
    effects_from,
    final_share,
    ioi_prompts,
    pearson,
    shift_score,
    single_token_words,
    top_count,
    top_share,
)
from mechscope.bench.real_model import REFERENCE, reference_model
from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import head_cells, resid_cells
from mechscope.circuits.patching import patch_cells
from mechscope.core.stats import bootstrap_interval
from mechscope.core.text import text_batch

ISSUE = "issue 20, row 2 (indirect-object identification on the real model)"
WANG = "Wang et al. 2022, 'Interpretability in the Wild' (IOI; logit difference, S2 -> end in residual patching)"
ATP = "Nanda 2023 (attribution patching); Kramar et al. 2024 (AtP*): reliable on head outputs"
ATP_RESID = ("first-order estimates are known to fail on the residual stream (Kramar et al. 2024, AtP*): a patch "
             "there replaces the whole state, far from the linear regime")
N_PROMPTS, N_PATCH, SEED_OFFSET = 256, 8, 0
PATCH_POSITIONS = list(range(S2_POS, N_TOKENS))  # before S2 the clean and corrupt streams are identical
CHUNK = 64
RESAMPLES = 1000

_DATA: dict[tuple[int, str], dict[str, Any]] = {}


def _metric(io: Tensor, s: Tensor):
    """logit(IO) - logit(S) at the last position read, mean over the batch."""
    def metric(logits: Tensor) -> Tensor:
        last = logits[:, -1]
        return (last.gather(-1, io[:, None]) - last.gather(-1, s[:, None])).mean()
    return metric


def _inputs(batch: dict[str, Tensor], rows: slice, device: str) -> dict[str, Any]:
    """``logits_to_keep=1``: Gemma unembeds the last position only (a whole forward of a
    repeated batch would otherwise compute 262k logits at every position); the residual cells'
    suffix replay reads the same kept position."""
    out = {"input_ids": batch["input_ids"][rows].to(device), "attention_mask": batch["attention_mask"][rows].to(device)}
    return {**out, "logits_to_keep": 1}


def _prompts(ctx: Any, tok: Any) -> dict[str, Any]:
    bad = {k: v for k, v in single_token_words(tok).items() if v}
    if bad:
        raise ValueError(f"these template words are not one token with a leading space: {bad}")
    prompts = ioi_prompts(N_PROMPTS, ctx.seed + SEED_OFFSET)
    clean, corrupt = text_batch([p.clean for p in prompts], tok), text_batch([p.corrupt for p in prompts], tok)
    name_id = {n: tok(" " + n, add_special_tokens=False)["input_ids"][0] for n in NAMES}
    check_layout(clean["input_ids"], prompts, name_id)
    check_layout(corrupt["input_ids"], [type(p)(p.corrupt, p.clean, p.s, p.io, "BAB" if p.order == "ABB" else "ABB")
                                        for p in prompts], name_id)
    differ = (clean["input_ids"] != corrupt["input_ids"]).any(0).nonzero().flatten().tolist()
    if differ != [S2_POS]:
        raise ValueError(f"clean and corrupt prompts must differ at S2 (position {S2_POS}) only, they differ at {differ}")
    io = torch.tensor([name_id[p.io] for p in prompts])
    s = torch.tensor([name_id[p.s] for p in prompts])
    return {"prompts": prompts, "clean": clean, "corrupt": corrupt, "io": io, "s": s}


def _logit_diffs(model: Any, data: dict[str, Any], device: str) -> Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, N_PROMPTS, CHUNK):
            rows = slice(start, start + CHUNK)
            logits = model(**_inputs(data["clean"], rows, device)).logits  # [chunk, 1, vocab]
            io, s = data["io"][rows].to(device), data["s"][rows].to(device)
            last = logits[:, -1]
            out.append((last.gather(-1, io[:, None]) - last.gather(-1, s[:, None])).squeeze(-1).double().cpu())
    return torch.cat(out)


def _patch_each(ctx: Any, model: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Per patching prompt: clean and corrupt metric, and the metric after each cell's patch,
    real (``patch_cells``) and estimated (``attribution_patching``), residual then head cells."""
    resid = resid_cells(model, positions=PATCH_POSITIONS)
    heads = head_cells(model, positions=[FINAL_POS])
    cells = resid + heads
    real, est, clean, corrupt = [], [], [], []
    for i in range(N_PATCH):
        rows = slice(i, i + 1)
        c, k = _inputs(data["clean"], rows, ctx.device), _inputs(data["corrupt"], rows, ctx.device)
        metric = _metric(data["io"][rows].to(ctx.device), data["s"][rows].to(ctx.device))
        r_resid = patch_cells(model, c, k, resid, metric, readout=[-1])
        r_heads = patch_cells(model, c, k, heads, metric, direction="denoise", readout=[-1])
        a = attribution_patching(model, c, k, cells, metric, direction="denoise", readout=[-1])
        real.append(torch.cat([r_resid.values, r_heads.values])), est.append(a.values)
        clean.append(r_heads.clean), corrupt.append(r_heads.corrupt)
        ctx.log.info(f"IOI patching: prompt {i + 1}/{N_PATCH} done")
    n_r = len(resid)
    real_t, est_t = torch.stack(real), torch.stack(est)  # [prompts, cells]
    return {"real_resid": real_t[:, :n_r], "real_heads": real_t[:, n_r:], "est_resid": est_t[:, :n_r],
            "est_heads": est_t[:, n_r:], "clean": torch.tensor(clean, dtype=torch.float64),
            "corrupt": torch.tensor(corrupt, dtype=torch.float64), "n_layers": len(resid) // len(PATCH_POSITIONS)}


def _data(ctx: Any) -> dict[str, Any]:
    key = (ctx.seed, ctx.device)
    if key not in _DATA:
        model, tok = reference_model(ctx)
        data = _prompts(ctx, tok)
        data["diffs"] = _logit_diffs(model, data, ctx.device)
        data["patch"] = _patch_each(ctx, model, data)
        _DATA[key] = data
    return _DATA[key]


def _budget(data: dict[str, Any]) -> dict[str, Any]:
    p = data["prompts"]
    return {"model": REFERENCE, "prompts": N_PROMPTS, "patching_prompts": N_PATCH,
            "patching_prompts_note": f"the first {N_PATCH} prompts (alternately IO-first and IO-second), each patched "
                                     "on its own so that intervals bootstrap over prompts; a subset to keep the row "
                                     "within its time budget on one CPU thread (full forwards per cell)",
            "layers": data["patch"]["n_layers"], "tokens_per_prompt": N_TOKENS, "s2_position": S2_POS,
            "final_position": FINAL_POS, "template": "{opener} {A} and {B} {move} to the {place}, {S} {give} a {obj} to",
            "example_clean": p[0].clean, "example_corrupt": p[0].corrupt,
            "corruption": "S2 replaced by the IO (the other name repeats; the answer flips)",
            "metric": "logit(IO) - logit(S) of the clean prompt at the final position",
            "direction": "denoise (clean activation patched into the corrupt run)",
            "interval": f"percentile bootstrap over the {N_PATCH} patching prompts ({RESAMPLES} resamples)"}


def _boot(data: dict[str, Any], stat, seed: int) -> tuple[float, float]:
    """Bootstrap interval of ``stat(patch_data_restricted_to_rows)`` over the patching prompts."""
    patch = data["patch"]

    def on(idx: Tensor) -> float:
        rows = idx.long()
        return stat({k: (v[rows] if isinstance(v, Tensor) else v) for k, v in patch.items()})
    return bootstrap_interval(torch.arange(N_PATCH, dtype=torch.float64), on, seed=seed, resamples=RESAMPLES)


def _resid_map(patch: dict[str, Any], key: str = "real_resid") -> Tensor:
    """``[layers, N_TOKENS]`` effects; positions before S2 are zero (the two runs are identical there)."""
    eff = effects_from(patch[key], patch["clean"], patch["corrupt"]).view(patch["n_layers"], -1)
    full = torch.zeros(patch["n_layers"], N_TOKENS, dtype=torch.float64)
    full[:, S2_POS:] = eff
    return full


def _head_effects(patch: dict[str, Any], key: str = "real_heads") -> Tensor:
    return effects_from(patch[key], patch["clean"], patch["corrupt"])  # [layers * heads]


@check("real_ioi", "logit_difference", "io_preferred_accuracy", threshold=(">=", 0.8), kind="finding",
       source=ISSUE + ": the model prefers the indirect object over the subject on >= 80 % of clean prompts; "
              "task and metric: " + WANG, suite="real",
       other_metrics={"mean_logit_difference": Criterion.info(source=WANG + ": GPT-2 small's mean is about 3.5")},
       baselines={"chance": "0.5: no preference between the two names"},
       description="Gemma-3-270M on 256 templated IOI prompts: logit(IO) > logit(S) at the final position")
def ioi_accuracy(ctx) -> list[Result]:
    data = _data(ctx)
    diffs, prompts = data["diffs"], data["prompts"]
    by_order = {o: float((diffs[[p.order == o for p in prompts]] > 0).double().mean()) for o in ("ABB", "BAB")}
    detail = {**_budget(data), "interval": "Wilson 95 % over the prompts", "accuracy_by_order": by_order,
              "order": "ABB: IO named first; BAB: IO named second"}
    acc = float((diffs > 0).double().mean())
    return [Result.proportion(acc, N_PROMPTS, baselines={"chance": 0.5}, detail=detail),
            Result.mean(diffs, ctx.seed, metric="mean_logit_difference",
                   detail={**detail, "interval": "bootstrap over the prompts", "min": float(diffs.min())})]


@check("real_ioi", "residual_patching", "final_takeover_after_s2_peak_layers", threshold=(">=", 1), kind="finding",
       source=ISSUE + ": residual-stream patching over (layer x position) moves the signal from S2 to the final "
              "position: the first layer where the final position's share of the summed |effect| exceeds 0.5 comes "
              "after the layer where S2's effect peaks; " + WANG, suite="real",
       other_metrics={"takeover_layer": None, "s2_peak_layer": None},
       description="denoising patches of resid_pre (18 layers x positions S2..end) on Gemma-3-270M's IOI prompts: "
                   "takeover layer of the final position minus the layer of S2's peak effect")
def ioi_residual(ctx) -> list[Result]:
    data = _data(ctx)
    patch, budget = data["patch"], _budget(data)
    eff = _resid_map(patch)
    score, takeover, peak = shift_score(eff, S2_POS, FINAL_POS)
    interval = _boot(data, lambda p: float(shift_score(_resid_map(p), S2_POS, FINAL_POS)[0]), ctx.seed)
    est = _resid_map(patch, "est_resid")
    with ctx.figure("residual_maps", caption="Residual-stream patching (resid_pre, layer x position; denoising "
                    "effect as a share of clean - corrupt): activation patching (left) and attribution patching's "
                    "first-order estimate (right). Positions before S2 are zero: clean and corrupt are identical "
                    "there.", figsize=(11.0, 4.4)) as fig:
        _maps(fig, {"activation patching": eff, "attribution patching (estimate)": est}, data["prompts"][0].clean)
    detail = {**budget, "sites": "resid_pre.l (the stream before block l), l = 0..17",
              "positions": f"{S2_POS}..{FINAL_POS} patched; 0..{S2_POS - 1} zero by construction",
              "effects": eff[:, S2_POS:].tolist(), "final_share": final_share(eff, FINAL_POS).tolist(),
              "never_value": "-n_layers when the final position never takes over",
              "note": "at layer 0 the S2 cell is the whole difference between the runs (effect 1); the S2 effect "
                      "stays near 1 until the signal moves, so its peak sits on a plateau"}
    return [Result(float(score), n=N_PATCH, interval=interval, detail=detail),
            Result(float(-1 if takeover is None else takeover), metric="takeover_layer",
                   detail={**budget, "note": "-1: never"}),
            Result(float(peak), metric="s2_peak_layer", detail=budget)]


@check("real_ioi", "head_patching", "top10pct_head_share", threshold=(">=", 0.5), kind="finding",
       source=ISSUE + ": head patching to the final position concentrates on few heads (the top 10 % of heads "
              "carry >= 50 % of the summed |effect|)", suite="real",
       other_metrics={"head_pearson": Criterion.finding(">=", 0.7, source=ISSUE + ": attribution patching on head "
                                                        "cells correlates with real patching; " + ATP),
                      "resid_pearson": Criterion.info(source=ISSUE + ": the residual-cell correlation as "
                                                      "information; " + ATP_RESID)},
       baselines={"uniform": "0.1 x 72 heads rounded down / 72: every head carrying the same |effect|"},
       description="denoising patches of each head's output at the final position (72 heads) on Gemma-3-270M's "
                   "IOI prompts; attribution patching's estimates of the same cells beside")
def ioi_heads(ctx) -> list[Result]:
    data = _data(ctx)
    patch, budget = data["patch"], _budget(data)
    real, est = _head_effects(patch), _head_effects(patch, "est_heads")
    n_heads = real.numel() // patch["n_layers"]
    k = top_count(real.numel())
    top = torch.topk(real.abs(), k).indices.tolist()
    labels = [f"L{i // n_heads}H{i % n_heads}" for i in range(real.numel())]
    share_ci = _boot(data, lambda p: top_share(_head_effects(p)), ctx.seed)
    head_ci = _boot(data, lambda p: pearson(_head_effects(p, "est_heads"), _head_effects(p)), ctx.seed)
    resid_ci = _boot(data, lambda p: pearson(_resid_map(p, "est_resid")[:, S2_POS:], _resid_map(p)[:, S2_POS:]),
                     ctx.seed)
    with ctx.figure("head_bars", caption="Denoising effect of patching each head's output at the final position: "
                    "activation patching and attribution patching's estimate") as fig:
        _bars(fig, labels, {"activation patching": real, "attribution patching (estimate)": est})
    detail = {**budget, "cells": "each head's slice of o_proj's input at the final position", "top_k": k,
              "top_heads": [[labels[i], float(real[i])] for i in top], "effects": real.tolist()}
    corr = {**budget, "direction": "denoise for both; the estimate's gradient is taken on the corrupt run"}
    resid = pearson(_resid_map(patch, "est_resid")[:, S2_POS:], _resid_map(patch)[:, S2_POS:])
    return [Result(top_share(real), n=N_PATCH, interval=share_ci, baselines={"uniform": k / real.numel()},
                   detail=detail),
            Result(pearson(est, real), n=N_PATCH, interval=head_ci, metric="head_pearson",
                   detail={**corr, "cells": f"{real.numel()} head cells at the final position",
                           "estimates": est.tolist()}),
            Result(resid, n=N_PATCH, interval=resid_ci, metric="resid_pearson",
                   detail={**corr, "cells": f"resid_pre x positions {S2_POS}..{FINAL_POS} (the cells where the runs "
                                            "differ)", "note": ATP_RESID})]


def _maps(fig: Any, maps: dict[str, Tensor], example: str) -> None:
    """Layer x position heat maps side by side, on one colour scale."""
    vmax = max(float(m.abs().max()) for m in maps.values()) or 1.0
    for i, (name, m) in enumerate(maps.items()):
        ax = fig.add_subplot(1, len(maps), i + 1)
        im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("position (S2 at 10, final at 14)", fontsize=8)
        ax.set_ylabel("layer (resid_pre)", fontsize=8)
        ax.set_xticks(range(m.shape[1]))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"e.g. {example!r}", fontsize=8)


def _bars(fig: Any, labels: list[str], series: dict[str, Tensor]) -> None:
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for n, (name, v) in enumerate(series.items()):
        ax.bar([i + n * width for i in range(len(labels))], v.tolist(), width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=5)
    ax.set_ylabel("effect (share of clean - corrupt)")
    ax.legend(fontsize=7)
    fig.set_size_inches(12.0, 3.4)
