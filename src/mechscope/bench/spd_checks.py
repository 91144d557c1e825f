"""Bench checks of stochastic parameter decomposition on its toy targets (spd.md, issue 8).

Thresholds are the published results, written here before the checks first ran:

- TMS 5-2: exactly 5 live subcomponents in the encoder; MMCS ≥ 0.99; ML2R in
  [0.95, 1.05] (|ML2R − 1| ≤ 0.05); the one-hot importance matrix is a permutation of the
  identity (diagonal ≥ 0.9, off-diagonal ≤ 0.1) with zero violations.
- TMS 40-10: 40 live subcomponents, MMCS ≥ 0.99, violations ≤ 2.
- TMS 5-2 + identity: the identity decomposes into exactly 2 subcomponents, important on
  every input (their importance ≥ 0.9 on every one-hot input). The detail also records
  what each of those importances is worth causally (the output change when that
  subcomponent alone is ablated on that input) and the reference implementation's looser
  count (each block column important on at least one input): a minimal decomposition
  may read the identity along directions orthogonal to a feature, where a zero
  importance is the right answer. The threshold stays as registered (what the shipped
  decomposition and two retrainings end with: ``docs/results.md``).
- Residual MLP (100 features, 50 neurons): W_in has 100 subcomponents important on some
  one-hot input, each important only when its feature is active (violations ≤ 5). Amended
  2026-12-06: the count was of norm-live subcomponents, at most C = 100 and already 100 at
  initialisation; that count is now information.
- Surgery on the residual MLP (feature 0, chosen before running): ablating the
  subcomponents feature 0 needs loses ≥ 90 % of its computation (its error moves from
  the unablated model's to the MLP-zero-ablated level) while the other features' mean
  error changes by ≤ 10 %.

Default run: the shipped targets and the shipped decompositions (trained by
``mechscope spd train --target NAME --ship`` at the published settings) are evaluated.
``--full``: targets and decompositions are retrained from the recipes (hours for the
residual MLP and TMS 40-10 on 2 CPU cores). Baseline of every row: the same metric for
the decomposition at initialisation (seeded, after the faithfulness warm-up).
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.bench import Criterion, Result, amended, check
from mechscope.core.site import Site
from mechscope.spd.checkpoint import load_decomposition, read_extra
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.evals import ablation_effects, importance_matrix
from mechscope.spd.surgery import unlearning_table
from mechscope.spd.train import faithfulness_warmup, train_spd
from mechscope.tasks.resid_mlp import labels
from mechscope.tasks.spd_assess import ONE_HOT_VALUE, assess, draw
from mechscope.tasks.spd_targets import data_fn, load_target, target, train_target

INIT = {"initial_decomposition": "the same metric for a seeded decomposition at initialisation "
                                 "(after the faithfulness warm-up), before any SPD training"}
SPD_SOURCE = "spd.md (Bushnaq, Braun & Sharkey 2025, SPD: what success is on the toy targets)"


def _decomposition(ctx: Any, name: str):
    """(target model, decomposition, setting) — shipped by default, retrained under --full."""
    if not ctx.full:
        model = load_target(name)
        path = target(name).decomposition_checkpoint
        dec = load_decomposition(path, model)
        extra = read_extra(path)
        steps, published = extra.get("steps"), extra.get("published_steps", target(name).spd.steps)
        if steps is not None and steps < published:
            return model, dec, (f"REDUCED: shipped decomposition after {steps} of the published {published} steps "
                                "(the full run did not fit the machine's time; `mechscope train "
                                f"spd_{name}_decomposition` runs it); thresholds are the published ones")
        return model, dec, "shipped target and decomposition (published settings)"
    out = ctx.out_dir / "spd" / name
    if not (out / "target.safetensors").exists():  # the surgery check reuses the spd check's run
        train_target(name, out / "target.safetensors", log=ctx.log.info)
    model = load_target(name, out / "target.safetensors")

    run = train_spd(model, data_fn(name), target(name).spd, out_dir=out / "decomposition", progress=False,
                    log=ctx.log.info)
    return model, run.decomposition, "retrained target and decomposition (published settings)"


def _initial(model, name: str, seed: int):
    """The seeded decomposition before SPD training (warm-up only): the baseline."""
    cfg = target(name).spd.replace(seed=seed)
    dec = Decomposition(model, cfg)
    faithfulness_warmup(dec, cfg)
    return dec


def _assess(ctx: Any, name: str) -> tuple[dict[str, Any], dict[str, Any], Any, Any]:
    model, dec, setting = _decomposition(ctx, name)
    result = assess(name, model, dec, seed=ctx.seed)
    base = assess(name, model, _initial(model, name, ctx.seed), seed=ctx.seed)
    draw(result, model, dec, ctx.figure)
    result["setting"] = setting
    return result, base, model, dec


def _tms_rows(result: dict[str, Any], base: dict[str, Any], metrics: list[str]) -> list[Result]:
    def values(r: dict[str, Any]) -> dict[str, float]:
        enc = r["layers"]["encoder"]
        return {"live_encoder": r["live"]["encoder"], "mmcs": r["encoder_match"]["mmcs"],
                "ml2r_abs_error": abs(r["encoder_match"]["ml2r"] - 1.0), "ci_violations": enc["violations"],
                "ci_diag_min": enc["diag_min"], "ci_offdiag_max": enc["offdiag_max"]}

    got, ref = values(result), values(base)
    detail = {"setting": result["setting"], "ml2r": result["encoder_match"]["ml2r"],
              "live": result["live"], "ci_alive_encoder": result["layers"]["encoder"]["n_alive"],
              "decoder_violations": result["layers"]["decoder"]["violations"],
              "reconstruction": result["reconstruction"]}
    one_hot = len(result["_matrices"]["encoder"])  # importances are read on one one-hot input per feature
    return [Result(float(got[m]), baselines={"initial_decomposition": float(ref[m])}, detail=detail, metric=m,
                   n=one_hot if m.startswith("ci_") else None) for m in metrics]


@check("tms_5_2", "spd", "live_encoder", threshold=("==", 5), kind="finding", baselines=INIT, source=SPD_SOURCE,
       other_metrics={"mmcs": (">=", 0.99), "ml2r_abs_error": ("<=", 0.05), "ci_violations": ("==", 0),
                      "ci_diag_min": (">=", 0.9), "ci_offdiag_max": ("<=", 0.1)},
       description="SPD of TMS 5-2: one live encoder subcomponent per feature, matching W[:, j] e_jᵀ, "
                   "with a one-hot importance matrix that is a permuted identity")
def tms_5_2(ctx) -> list[Result]:
    result, base, _, _ = _assess(ctx, "tms_5_2")
    return _tms_rows(result, base, ["live_encoder", "mmcs", "ml2r_abs_error", "ci_violations", "ci_diag_min",
                                    "ci_offdiag_max"])


@check("tms_40_10", "spd", "live_encoder", threshold=("==", 40), kind="finding", baselines=INIT, source=SPD_SOURCE,
       other_metrics={"mmcs": (">=", 0.99), "ci_violations": ("<=", 2)},
       description="SPD of TMS 40-10: 40 live encoder subcomponents matching the features, ≤ 2 importance violations")
def tms_40_10(ctx) -> list[Result]:
    result, base, _, _ = _assess(ctx, "tms_40_10")
    return _tms_rows(result, base, ["live_encoder", "mmcs", "ci_violations"])


@check("tms_5_2_id", "spd", "identity_live", threshold=("==", 2), kind="finding", baselines=INIT, source=SPD_SOURCE,
       other_metrics={"identity_importance_min": Criterion.finding(">=", 0.9, source=SPD_SOURCE, known_cause=(
           "each of the 2 live identity subcomponents reads the identity orthogonally to one feature, so its "
           "importance on that feature's one-hot input is 0 - and rightly: ablating it there moves the output "
           "0.6-1.2 % of what ablating the whole identity does. The shipped decomposition and two retrainings "
           "(seed 0 on the reference code's data, seed 1 on ours) all end this way; 0 errors by the reference "
           "implementation's looser count (docs/results.md, 2026-11-24)"))},
       description="SPD of TMS 5-2 + identity: the hidden identity decomposes into exactly 2 subcomponents "
                   "that are important on every input")
def tms_5_2_id(ctx) -> list[Result]:
    result, base, model, dec = _assess(ctx, "tms_5_2_id")
    ident = result["layers"]["identity"]
    # why an importance in the block can be 0: ablating that subcomponent alone on that
    # input, as a fraction of ablating the whole identity (0: it does nothing there)
    effect = ablation_effects(model, dec, "identity", torch.eye(model.n_features) * ONE_HOT_VALUE,
                              ident["columns"][:model.n_hidden])

    def values(r: dict[str, Any]) -> dict[str, float]:
        return {"identity_live": r["live"]["identity"], "identity_importance_min": r["layers"]["identity"]["block_min"]}

    got, ref = values(result), values(base)
    detail = {"setting": result["setting"], "live": result["live"],
              "identity_dense_violations": ident["violations"], "identity_ci_alive": ident["n_alive"],
              "identity_importance_one_hot": [[round(float(v), 4) for v in row]
                                              for row in result["_matrices"]["identity"][:, :2]],
              "identity_ablation_effect_one_hot": [[round(float(v), 4) for v in row] for row in effect],
              "identity_column_errors_reference_pattern": ident["column_errors"],
              "encoder_violations": result["layers"]["encoder"]["violations"],
              "mmcs": result["encoder_match"]["mmcs"], "reconstruction": result["reconstruction"]}
    return [Result(float(got[m]), baselines={"initial_decomposition": float(ref[m])}, detail=detail, metric=m,
                   n=model.n_features if m == "identity_importance_min" else None)
            for m in ("identity_live", "identity_importance_min")]


@check("resid_mlp", "spd", "w_in_live", threshold=None, baselines=INIT, source=SPD_SOURCE,
       amended_from=amended(("==", 100), "C = 100 (the published setting), so the count of subcomponents with a "
                            "norm >= 10 % of the largest is at most 100 and the initial decomposition is already "
                            "100/100: it cannot fail. Replaced by w_in_ci_alive", "2026-12-06"),
       other_metrics={"w_in_ci_alive": Criterion.finding(
                          "==", 100, source=SPD_SOURCE + "; W_in -> 100 subcomponents, one per feature",
                          after_observation=True,
                          amended_from=amended(None, "w_in_live (norm-live) is 100/100 at initialisation; count the "
                                               "subcomponents important (> 0.1) on some one-hot input instead: "
                                               "48 at initialisation", "2026-12-06")),
                      "w_in_violations": Criterion.finding("<=", 5, source=SPD_SOURCE)},
       description="SPD of the residual MLP: W_in has one importance-alive subcomponent per feature, important "
                   "only when its feature is active (the norm-live count is information: C = 100)")
def resid_mlp(ctx) -> list[Result]:
    result, base, _, _ = _assess(ctx, "resid_mlp")

    def values(r: dict[str, Any]) -> dict[str, float]:
        return {"w_in_live": r["live"]["mlp_in"], "w_in_ci_alive": r["layers"]["mlp_in"]["n_alive"],
                "w_in_violations": r["layers"]["mlp_in"]["violations"]}

    got, ref = values(result), values(base)
    detail = {"setting": result["setting"], "live": result["live"],
              "w_out_ci_alive": result["layers"]["mlp_out"]["n_alive"],
              "w_out_dense_violations": result["layers"]["mlp_out"]["violations"],
              "reconstruction": result["reconstruction"]}
    one_hot = len(result["_matrices"]["mlp_in"])
    return [Result(float(got[m]), baselines={"initial_decomposition": float(ref[m])}, detail=detail, metric=m,
                   n=None if m == "w_in_live" else one_hot)
            for m in ("w_in_live", "w_in_ci_alive", "w_in_violations")]


SURGERY_FEATURE = 0  # chosen before the first run; not the best of many
SURGERY_INPUTS = 256  # single-feature inputs per feature on which each error is measured


@check("resid_mlp", "spd_surgery", "lost_fraction", threshold=(">=", 0.9), kind="finding", source=SPD_SOURCE,
       other_metrics={"others_error_change": ("<=", 0.10)},
       baselines={"random_subcomponent": "the same metrics when a random W_in subcomponent of another "
                                         "feature is ablated instead",
                  "initial_decomposition": "the same surgery with the decomposition at initialisation"},
       description="unlearning feature 0 of the residual MLP by subtracting the W_in subcomponents it needs")
def resid_mlp_surgery(ctx) -> list[Result]:
    model, dec, setting = _decomposition(ctx, "resid_mlp")
    n = model.cfg.n_features
    ci = importance_matrix(model, dec, torch.eye(n) * 0.75)["mlp_in"]  # [n_features, C]
    table = unlearning_table(model, dec, ci, "mlp_in", SURGERY_FEATURE, labels, Site("mlp_out"),
                           per_feature=SURGERY_INPUTS, seed=ctx.seed)
    # control: ablate another feature's subcomponents and measure feature 0 the same way
    other = (SURGERY_FEATURE + 1 + int(torch.randint(n - 1, (1,)))) % n
    perm = torch.arange(n)
    perm[[SURGERY_FEATURE, other]] = perm[[other, SURGERY_FEATURE]]
    control = unlearning_table(model, dec, ci[perm], "mlp_in", SURGERY_FEATURE, labels, Site("mlp_out"),
                           per_feature=SURGERY_INPUTS, seed=ctx.seed)
    init = _initial(model, "resid_mlp", ctx.seed)
    init_ci = importance_matrix(model, init, torch.eye(n) * 0.75)["mlp_in"]
    initial = unlearning_table(model, init, init_ci, "mlp_in", SURGERY_FEATURE, labels, Site("mlp_out"),
                           per_feature=SURGERY_INPUTS, seed=ctx.seed)
    with ctx.figure("unlearning_table", f"residual MLP: error on feature {SURGERY_FEATURE} and on the other "
                    "features, before and after ablating feature 0's W_in subcomponents") as fig:
        ax = fig.add_subplot()
        groups = [r["features"] for r in table["rows"]]
        for i, (key, color) in enumerate([("unablated", "#888"), ("ablated", "#c44"), ("mlp_zero_ablated", "#48c")]):
            ax.bar([g + i * 0.27 for g in range(len(groups))], [r[key] for r in table["rows"]], width=0.27,
                   color=color, label=key.replace("_", " "))
        ax.set_xticks([g + 0.27 for g in range(len(groups))], groups)
        ax.set_ylabel("mean squared error on single-feature inputs")
        ax.legend(fontsize=8)
    detail = {"setting": setting, "feature": SURGERY_FEATURE, "ablated_subcomponents": table["subcomponents"],
              "table": table["rows"], "others_ratio": table["others_ratio"],
              "others_worst_ratio": table["others_worst_ratio"], "control_feature": other}
    return [Result(table["lost_fraction"], detail=detail, metric="lost_fraction", n=SURGERY_INPUTS,
                   baselines={"random_subcomponent": control["lost_fraction"],
                              "initial_decomposition": initial["lost_fraction"]}),
            Result(abs(table["others_ratio"] - 1.0), detail=detail, metric="others_error_change",
                   n=SURGERY_INPUTS * (n - 1),
                   baselines={"random_subcomponent": abs(control["others_ratio"] - 1.0),
                              "initial_decomposition": abs(initial["others_ratio"] - 1.0)})]
