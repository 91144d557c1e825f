"""``mechscope hypothesis test|compare|scrub|disentangle``: state a hypothesis about a built-in network and test it.

``test`` prints IIA of each variable alone and all together with 95 % intervals; ``compare``
scores two rival hypotheses on the same pairs with a paired bootstrap of the IIA
difference; ``scrub`` runs causal scrubbing and prints the fraction of the loss recovered
beside the full-scrub and clean losses; ``disentangle`` prints RAVEL's Cause, Isolate and
Disentangle of every featurizer on the RAVEL world (the bench's table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, add_config_arguments, config, config_from_args, param

HELP = "test, compare and scrub hypotheses (causal model + where its variables live) on built-in worlds"
DESCRIPTION = """\
Test a hypothesis (a causal model plus, for each of its variables, a site, a featurizer and
features) on a built-in network with interchange interventions, compare two rivals on the
same pairs, or run causal scrubbing over a network's graph.

  test     --world rival_variables [--hypothesis FILE]
           IIA of each variable alone and all together (default: S = X + Y at hidden.1)
  compare  --world rival_variables [--hypothesis FILE --rival FILE]
           paired bootstrap of IIA(a) - IIA(b) (default: S vs T = Y + Z at hidden.1)
  scrub    --world induction|hierarchical_equality [--hypothesis NAME|FILE]
           fraction of the loss recovered (built-in names: induction k_composition,
           q_composition; hierarchical_equality wx_and_yz, wx_only, yz_only)
  disentangle --world ravel [--full]
           Cause, Isolate and Disentangle of neurons, PCA, DAS, multi-task DAS, DBM, SAE
           latents and the featurizer trained on interventions, with the controls

Worlds for test/compare: rival_variables (causal models S, T; sites acts.0..2, XY block =
units 0..15 of acts.0/acts.1), hierarchical_equality (causal model "default"; sites
acts.0..2; variables WX, YZ).

Hypothesis file (JSON) for test/compare:
  {"name": "S at hidden.1", "causal_model": "S",
   "variables": {"S": {"site": "acts.1", "featurizer": "identity", "features": [0, 1, 2]}}}
  site: a module path (its output) or a site object ({"path": ..., "io": "input", ...});
  featurizer: "identity" (neurons) or "pca" (fitted on the world's inputs); features:
  indices in its feature space (default all); causal_model may be left out where the
  world has one.
Scrubbing hypothesis file (JSON), over the world's graph nodes:
  {"name": "h", "output": ["hidden.2"],
   "claims": {"hidden.2": {"parents": ["hidden.1"], "key": "O"},
              "hidden.1": {"parents": ["hidden.0"], "key": "WX+YZ"}, "hidden.0": {}}}
  key: what the node carries, one of the world's keys (hierarchical_equality: O, WX, YZ,
  WX+YZ; induction: none), null or left out for the input itself."""

WORLDS = ("rival_variables", "hierarchical_equality")
SCRUB_WORLDS = ("induction", "hierarchical_equality")


@config
class HypothesisConfig(Config):
    """Options of ``mechscope hypothesis``."""

    world: str = param("rival_variables", help="built-in world (see above)")
    hypothesis: Optional[str] = param(None, metavar="FILE|NAME", help="hypothesis file (JSON), or for scrub a "
                                      "built-in hypothesis name (default: the world's own)")
    rival: Optional[Path] = param(None, metavar="FILE", help="compare: the rival hypothesis file (JSON)")
    pairs: int = param(400, ge=2, help="test/compare: counterfactual pairs")
    inputs: int = param(0, ge=0, help="scrub: inputs in the pool (0: the world's default)")
    seed: int = param(0, ge=0, help="seed of the data, the resampling and the bootstrap")
    full: bool = param(False, help="disentangle: retrain the world and fit at the published setting (slow)")
    json: bool = param(False, help="print the result as JSON")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("hypothesis", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="hypothesis_command", metavar="ACTION", required=True)
    for action, text in (("test", "IIA of a hypothesis's variables, alone and together"),
                         ("compare", "two rival hypotheses on the same pairs"),
                         ("scrub", "causal scrubbing: fraction of the loss recovered"),
                         ("disentangle", "RAVEL's Cause / Isolate / Disentangle of every featurizer")):
        p = sub.add_parser(action, help=text, description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, HypothesisConfig)
    return parser


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(HypothesisConfig, args)
    # hypothesis, scrubbing and site errors carry their fix: mechscope.cli.errors prints them on one line (exit 2)
    return {"test": _test, "compare": _compare, "scrub": _scrub,
            "disentangle": _disentangle}[args.hypothesis_command](cfg)


def _world(cfg: HypothesisConfig) -> dict[str, Any]:
    """The world's network, causal models, data recipe and default hypotheses."""
    if cfg.world not in WORLDS:
        raise UsageError(f"--world {cfg.world!r}: test and compare run on {', '.join(WORLDS)}")
    if cfg.world == "rival_variables":
        from mechscope.tasks import rival_variables as w

        return {"model": w.load(), "models": {"S": w.causal_model("S"), "T": w.causal_model("T")}, "task": w,
                "balance": False, "default": (w.hypothesis("S"), w.hypothesis("T"))}
    from mechscope.tasks import hierarchical_equality as w

    return {"model": w.load_model(), "models": {"default": w.causal_model()}, "task": w, "balance": True,
            "default": None}


def _load(path: str | Path, world: dict[str, Any], seed: int) -> Any:
    import torch

    from mechscope.causal.hypothesis_file import hypothesis_from_dict, read_json
    from mechscope.core.run import cache

    task = world["task"]
    inputs = task.to_model_inputs(task.sample(2000, torch.Generator().manual_seed(seed + 99)))

    def activations(site: Any) -> Any:  # [n, d]: the site's rows on the world's inputs (widths, PCA)
        acts = cache(world["model"], inputs, [site])[site]
        return acts.reshape(-1, acts.shape[-1])
    return hypothesis_from_dict(read_json(path, "hypothesis"), world["models"], activations)


def _hypotheses(cfg: HypothesisConfig, world: dict[str, Any], two: bool) -> tuple[Any, Any]:
    if cfg.hypothesis is None and cfg.rival is None:
        if world["default"] is None:
            raise UsageError(f"--world {cfg.world} has no built-in hypothesis; give --hypothesis FILE"
                             + (" and --rival FILE" if two else ""))
        return world["default"]
    if cfg.hypothesis is None or (two and cfg.rival is None):
        raise UsageError("compare needs both --hypothesis FILE and --rival FILE (or neither, for the world's own)"
                         if two else "give --hypothesis FILE")
    if not two and cfg.rival is not None:
        raise UsageError("--rival is for compare")
    a = _load(cfg.hypothesis, world, cfg.seed)
    return a, (_load(cfg.rival, world, cfg.seed) if two else None)


def _data(h: Any, world: dict[str, Any], cfg: HypothesisConfig) -> Any:
    task = world["task"]
    return h.counterfactuals(task.sample, cfg.pairs, task.to_model_inputs, seed=cfg.seed, balance=world["balance"])


def _test(cfg: HypothesisConfig) -> int:
    from mechscope.causal.hypothesis import test

    world = _world(cfg)
    h, _ = _hypotheses(cfg, world, two=False)
    res = test(h, world["model"], _data(h, world, cfg))
    print(json.dumps(res.to_dict(), indent=2) if cfg.json else res.table())
    return 0


def _compare(cfg: HypothesisConfig) -> int:
    from mechscope.causal.hypothesis import compare

    world = _world(cfg)
    a, b = _hypotheses(cfg, world, two=True)
    res = compare(a, b, world["model"], _data(a, world, cfg), seed=cfg.seed)
    print(json.dumps(res.to_dict(), indent=2) if cfg.json else res.table())
    return 0


def _scrub(cfg: HypothesisConfig) -> int:
    from mechscope.causal.hypothesis_file import read_json, scrub_hypothesis_from_dict
    from mechscope.causal.scrub import scrub
    from mechscope.tasks import scrub_worlds

    if cfg.world not in SCRUB_WORLDS:
        raise UsageError(f"--world {cfg.world!r}: scrub runs on {', '.join(SCRUB_WORLDS)}")
    if cfg.rival is not None:
        raise UsageError("--rival is for compare")
    world = scrub_worlds.world(cfg.world, **({"n": cfg.inputs} if cfg.inputs else {}))
    name = cfg.hypothesis or next(iter(world.hypotheses))
    if name in world.hypotheses:
        h = world.hypotheses[name]
    elif Path(name).suffix == ".json" or Path(name).exists():
        h = scrub_hypothesis_from_dict(read_json(name, "scrubbing hypothesis"), world.keys)
    else:
        raise UsageError(f"--hypothesis {name!r} is neither a hypothesis of {cfg.world} "
                         f"({', '.join(world.hypotheses)}) nor a JSON file")
    res = scrub(world.model, world.inputs, world.graph, h, world.loss, seed=cfg.seed)
    print(json.dumps(res.to_dict(), indent=2) if cfg.json else res.summary())
    return 0


def _disentangle(cfg: HypothesisConfig) -> int:
    from mechscope.bench import ravel_checks  # an SAE and a causal search meet: composed in the bench

    if cfg.world != "ravel":
        raise UsageError(f"--world {cfg.world!r}: disentangle runs on ravel")
    if cfg.hypothesis is not None or cfg.rival is not None:
        raise UsageError("disentangle scores the built-in featurizers; --hypothesis and --rival are for "
                         "test, compare and scrub")
    t = ravel_checks.table(cfg.seed, cfg.full)
    rows = {**t["results"], **{f"control: {k}": v for k, v in t["controls"].items()}}
    if cfg.json:
        print(json.dumps({k: v.to_dict() for k, v in rows.items()}, indent=2))
        return 0
    print(f"RAVEL world ({t['setting']} setting, seed {cfg.seed}), places at {t['site']}; held-out entities")
    print(f"{'featurizer':<26}{'Cause':>8}{'Isolate':>9}  {'Disentangle [95 % CI]':<28}")
    for name, r in rows.items():
        lo, hi = r.disentangle.interval
        print(f"{name:<26}{r.cause.value:>8.3f}{r.isolate.value:>9.3f}  {r.disentangle.value:.3f} [{lo:.3f}, {hi:.3f}]")
    return 0
