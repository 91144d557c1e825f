"""``mechscope steer``: find a direction at a site from inputs with and without a concept, then
add it, ablate it, or bake the ablation into the weights.

Data: the built-in ``steering_toy`` (concept = a marked token; the behaviour is emitting
R) or a JSON-lines file of ``{"tokens": [ids], "label": 0 or 1}`` rows (1 = the concept).
Every result is reported with the coefficient, the effect on ``--target-token`` (its
mean probability at the last position) and the KL divergence of the next-token
distributions on the concept-free inputs (the unrelated behaviour).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal, Optional

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource, check_inputs, load, resolve_site
from mechscope.core.config import add_config_arguments, config, config_from_args, param

DESCRIPTION = __doc__.split("\n\n", 1)[1]


@config
class SteerConfig(ModelSource):
    """Options of ``mechscope steer``."""

    FIELD_HELP = {"model": "a built-in model (default: steering_toy)"}

    data: str = param("steering_toy", metavar="NAME_OR_JSONL", help="steering_toy or a JSON-lines file")
    site: str = param("resid_post.1", help="site (alias or module path) whose last position gives the direction")
    method: Literal["diff_of_means", "pca", "actadd", "probe"] = param("diff_of_means", help="how to find the direction")
    action: Literal["add", "ablate", "orthogonalize"] = param("add", help="add at the site (every position), "
                                                            "ablate at every layer and position, or edit the weights")
    coeffs: tuple[float, ...] = param((0.5, 1.0, 2.0), help="coefficients for --action add (times the raw direction)")
    target_token: Optional[int] = param(None, metavar="ID", help="token whose probability measures the effect "
                                        "(steering_toy: R)")
    n: int = param(500, ge=2, help="examples per class from a built-in dataset")
    save_direction: Optional[Path] = param(None, metavar="FILE", help="write the direction (safetensors)")
    save_model: Optional[Path] = param(None, metavar="FILE", help="--action orthogonalize: write the edited weights")
    seed: int = param(0, help="seed for data")
    json: bool = param(False, help="print JSON")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("steer", help="find, add and ablate a steering direction",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SteerConfig)
    return parser


def _data(cfg: SteerConfig, model: Any) -> tuple[Any, Any, Any, Optional[int]]:
    """(concept inputs, concept-free inputs, positions of the read, default target token)."""
    if cfg.data == "steering_toy":
        from mechscope.tasks import steering_toy as st

        return (st.sample(cfg.n, cfg.seed, concept=True).ids, st.sample(cfg.n, cfg.seed + 1, concept=False).ids,
                [st.QUERY_POS], st.R)
    from mechscope.core.jsonl import integer, read_jsonl, token_batch, token_ids, vocab_size

    rows = read_jsonl(cfg.data, {"tokens": token_ids(vocab_size(model)), "label": integer((0, 1))})
    pos = [r for r in rows if r["label"] == 1]
    neg = [r for r in rows if r["label"] == 0]
    if not pos or not neg:
        raise UsageError(f"{cfg.data}: need rows with label 1 (concept) and label 0 (no concept); "
                         f"got {len(pos)} and {len(neg)}")
    return token_batch(pos), token_batch(neg), "last", None


def direction(cfg: SteerConfig, model: Any, pos_in: Any, neg_in: Any, positions: Any) -> tuple[Any, Any]:
    """The ``--method`` direction at ``--site`` (read at ``positions``), and the site."""
    from mechscope.core.collect import activations
    from mechscope.steer.directions import find_direction

    site = resolve_site(model, cfg.site, positions=positions)
    a, b = activations(model, pos_in, site), activations(model, neg_in, site)
    return find_direction(cfg.method, a, b, seed=cfg.seed), site


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SteerConfig, args)
    import torch

    from mechscope.steer import effects
    from mechscope.steer.apply import SteeringError
    from mechscope.steer.directions import DirectionError

    model, _ = load(cfg, "steering_toy")
    pos_in, neg_in, positions, default_target = _data(cfg, model)
    check_inputs(model, pos_in, cfg.data)
    check_inputs(model, neg_in, cfg.data)
    target = cfg.target_token if cfg.target_token is not None else default_target
    if target is not None:
        from mechscope.core.jsonl import check_token_ids, vocab_size

        check_token_ids(torch.tensor([target]), vocab_size(model), "--target-token")
    try:
        v, site = direction(cfg, model, pos_in, neg_in, positions)
        report: dict[str, Any] = {"site": str(site), "method": cfg.method, "norm": float(v.norm()), "action": cfg.action}
        if cfg.action == "add":
            report["results"] = effects.steering_effects(model, neg_in, v, site.replace(positions=None), cfg.coeffs,
                                                         target)
        elif cfg.action == "ablate":
            report["concept_inputs"] = effects.ablation_effect(model, pos_in, v, target)
            report["concept_free_inputs"] = effects.ablation_effect(model, neg_in, v, target)
        else:
            measured, edited = effects.weight_edit_effect(model, pos_in, v, target)
            report.update(measured)
            if cfg.save_model:
                from mechscope.core.checkpoint import save_module
                save_module(cfg.save_model, edited, {"orthogonalized_against": cfg.site, "method": cfg.method})
                report["saved_model"] = str(cfg.save_model)
    except (SteeringError, DirectionError) as e:
        raise UsageError(str(e)) from None
    if cfg.save_direction:
        from mechscope.core.checkpoint import save_tensors
        save_tensors(cfg.save_direction, {"direction": v.contiguous()}, {"site": str(site), "method": cfg.method})
    print(json.dumps(report, indent=2) if cfg.json else render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['method']} direction at {report['site']} (norm {report['norm']:.3g}), action {report['action']}"]

    def fmt(m: dict[str, float]) -> str:
        effect = f"P(target) {m['p_target_before']:.3f} -> {m['p_target_after']:.3f}, " if "p_target_after" in m else ""
        return f"{effect}KL {m['kl']:.4f}"
    for r in report.get("results", []):
        lines.append(f"  coeff {r['coeff']:g}: concept-free inputs: {fmt(r)}")
    for key in ("concept_inputs", "concept_free_inputs"):
        if key in report:
            lines.append(f"  {key.replace('_', ' ')}: {fmt(report[key])}")
    if "max_abs_diff_vs_hooks" in report:
        lines.append(f"  weight edit vs hooks: max |logit difference| {report['max_abs_diff_vs_hooks']:.2e}")
    return "\n".join(lines)
