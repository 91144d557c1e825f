"""``mechscope das``: find where a task's causal variables live, print IIA with its controls.

Trains (or searches) one alignment method at one site of a built-in task's network,
prints the IIA table on held-out counterfactual data beside the random-subspace and
full-vector controls, and writes the alignment (``alignment.safetensors`` +
``alignment.json``, loadable with ``mechscope.causal.persist.load_alignment``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, add_config_arguments, config, config_from_args, param

DESCRIPTION = """\
Find where a built-in task's high-level variables live in its trained network.
Tasks: hierarchical_equality (MLP; --layer is the hidden layer 0..2; variables WX, YZ),
price_tagging (transformer; --layer is the block 0..1, --position 0..3 of "X Y Z ?",
default the last; variables L, R). Methods: das (low-rank subspace), rotation, boundless
(learns its own size), dbm (neuron masks), neurons and pca (brute-force/greedy search).
Prints IIA per test set (each variable alone, and all together) with the controls, and
writes the alignment to --out."""


@config
class DasConfig(Config):
    """Options of ``mechscope das``."""

    task: Literal["hierarchical_equality", "price_tagging"] = param("hierarchical_equality", help="built-in task")
    method: Literal["das", "rotation", "boundless", "dbm", "neurons", "pca"] = param("das", help="alignment method")
    layer: int = param(0, help="hidden layer (MLP) or block (transformer) whose output is searched")
    position: Optional[int] = param(None, metavar="POS", help="token position for transformers (default: last)")
    dims: int = param(8, ge=1, help="dimensions per variable (das, rotation, and the random-subspace control)")
    variables: tuple[str, ...] = param((), metavar="VAR[,VAR...]", help="variables to align (default: the task's)")
    n_train: int = param(10_000, ge=1, help="training examples per intervention kind")
    n_test: int = param(1000, ge=1, help="test examples per intervention kind")
    epochs: int = param(10, ge=1, help="training epochs")
    batch_size: int = param(1024, ge=1, help="examples per step")
    lr: float = param(1e-2, help="Adam learning rate")
    seed: int = param(0, help="seed of the data and the initialisation")
    out: Optional[Path] = param(None, metavar="DIR", help="where to write the alignment (default: das-out/TASK-METHOD-LAYER)")
    controls: bool = param(True, help="also report the random-subspace and full-vector controls")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("das", help="find where a task's causal variables live (DAS and friends)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DasConfig)
    return parser


def setup(cfg: DasConfig) -> dict[str, Any]:
    """The task's network, site, variables, readout and counterfactual data, as the options ask."""
    if cfg.task == "hierarchical_equality":
        from mechscope.causal.engine import identity_readout
        from mechscope.tasks import hierarchical_equality as task

        if cfg.position is not None:
            raise UsageError("--position is for transformers; the hierarchical-equality MLP has no positions")
        site, readout, default = task.site(cfg.layer), identity_readout, task.VARIABLES
    else:
        from mechscope.tasks import price_tagging as task

        site = task.site(cfg.layer, task.SEQ - 1 if cfg.position is None else cfg.position)
        readout, default = task.readout, ("L",)
    variables = cfg.variables or default
    unknown = [v for v in variables if v not in task.VARIABLES]
    if unknown:
        raise UsageError(f"task {cfg.task} has no variable(s) {unknown}; choose from {list(task.VARIABLES)}")
    kinds = {v: (v,) for v in variables}
    if len(variables) > 1:
        kinds["+".join(variables)] = tuple(variables)

    from mechscope.causal.counterfactual import default_label, make_counterfactuals

    label_of = getattr(task, "answer_token", default_label)  # price tagging answers with a token

    def sets(n: int, seed: int) -> dict:
        return {name: make_counterfactuals(task.causal_model(), vs, task.sample, n, task.to_model_inputs,
                                           label_of=label_of, seed=seed + i, name=name)
                for i, (name, vs) in enumerate(kinds.items())}

    return {"model": task.load_model(), "site": site, "variables": tuple(variables), "readout": readout,
            "train": sets(cfg.n_train, cfg.seed * 1000), "test": sets(cfg.n_test, cfg.seed * 1000 + 500)}


def run(args: argparse.Namespace) -> int:
    from mechscope.core.lock import lock_dir

    cfg = config_from_args(DasConfig, args)
    out = cfg.out or Path("das-out") / f"{cfg.task}-{cfg.method}-layer{cfg.layer}"
    with lock_dir(out, "--out"):  # checked (a directory, writable) and locked before any work
        return _run(cfg, out)


def _run(cfg: DasConfig, out: Path) -> int:
    from mechscope.causal.compare import compare, table
    from mechscope.causal.das import FitConfig
    from mechscope.causal.persist import save_alignment

    # alignment errors and deliberate ValueErrors are bad input: mechscope.cli.errors prints them (exit 2)
    s = setup(cfg)
    fit = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    results = compare(s["model"], s["train"], s["test"], s["site"], s["variables"], cfg.dims, (cfg.method,),
                      s["readout"], fit, with_controls=cfg.controls)
    print(f"{cfg.task}: {cfg.method} at {s['site']} ({s['site'].describe()}), {cfg.dims} dims per variable")
    print(table(results, list(s["test"])))
    found = results[cfg.method].alignment
    save_alignment(out, found, s["model"], meta={"task": cfg.task, "options": cfg.to_dict(),
                                                 "iia": {k: r.to_dict() for k, r in results[cfg.method].iia.items()}})
    print(f"alignment: {found.describe()}\nwrote {out}", file=sys.stderr)
    return 0
