"""``mechscope train TASK``: retrain a built-in world's model by its recipe.

Each trainable task is one entry of :data:`TRAINABLE`, ``name -> "module:function"``;
adding a task is one line here. The function is called as
``function(out_dir: pathlib.Path, log: Callable[[str], None]) -> list[pathlib.Path]``
and writes its checkpoint(s) (and any history) into ``out_dir``, returning the paths.
The default ``out_dir`` is the package's ``zoo/checkpoints``, so a run reproduces the
shipped files in place.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, add_config_arguments, config, config_from_args, param

TRAINABLE: dict[str, str] = {
    "grokking": "mechscope.circuits.modular:train_and_ship",
    "grokking_quick": "mechscope.circuits.modular:train_and_ship_quick",
    "induction": "mechscope.tasks.induction:train_and_ship",
    "induction_1l": "mechscope.tasks.induction:train_and_ship_1l",
    "hierarchical_equality": "mechscope.tasks.hierarchical_equality:train_and_ship",
    "price_tagging": "mechscope.tasks.price_tagging:train_and_ship",
    "spd_tms_5_2": "mechscope.spd.targets:train_and_ship_tms_5_2",
    "spd_tms_40_10": "mechscope.spd.targets:train_and_ship_tms_40_10",
    "spd_tms_5_2_id": "mechscope.spd.targets:train_and_ship_tms_5_2_id",
    "spd_resid_mlp": "mechscope.spd.targets:train_and_ship_resid_mlp",
    "spd_tms_5_2_decomposition": "mechscope.spd.targets:decompose_and_ship_tms_5_2",
    "spd_tms_40_10_decomposition": "mechscope.spd.targets:decompose_and_ship_tms_40_10",
    "spd_tms_5_2_id_decomposition": "mechscope.spd.targets:decompose_and_ship_tms_5_2_id",
    "spd_resid_mlp_decomposition": "mechscope.spd.targets:decompose_and_ship_resid_mlp",
    "sae_synthetic": "mechscope.sae.recipes:train_and_ship_synthetic",
    "sae_toy_worlds": "mechscope.sae.worlds:train_and_ship_toy_worlds",
    "sae_induction": "mechscope.sae.worlds:train_and_ship_induction",
    "sae_grokking": "mechscope.sae.worlds:train_and_ship_grokking",
    "steering_toy": "mechscope.tasks.steering_toy:train_and_ship",
    "instructions": "mechscope.tasks.instructions:train_and_ship",
    "othello": "mechscope.tasks.othello:train_and_ship",
}

CHECKPOINTS = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"


@config
class TrainConfig(Config):
    """Options of ``mechscope train``."""

    out: Optional[Path] = param(None, metavar="DIR", help="where to write (default: the package's zoo/checkpoints)")
    threads: int = param(1, help="torch threads (one is often fastest for these small models)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="retrain a built-in world's model by its recipe",
        description="Retrain a built-in world's model by its recipe and write its checkpoint. "
                    f"Tasks: {', '.join(sorted(TRAINABLE))}.")
    parser.add_argument("task", nargs="?", metavar="TASK", help="what to train (--list shows the choices)")
    parser.add_argument("--list", action="store_true", help="list the trainable tasks and exit")
    add_config_arguments(parser, TrainConfig)
    return parser


def resolve(name: str):
    """The training function registered under ``name``."""
    import importlib

    if name not in TRAINABLE:
        import difflib

        close = difflib.get_close_matches(name, list(TRAINABLE), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown task {name!r}{hint}; trainable: {', '.join(sorted(TRAINABLE))}")
    module, _, fn = TRAINABLE[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in sorted(TRAINABLE):
            print(f"{name:20s} {TRAINABLE[name]}")
        return 0
    if not args.task:
        raise UsageError(f"give a task to train; trainable: {', '.join(sorted(TRAINABLE))}")
    cfg = config_from_args(TrainConfig, args)
    if cfg.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {cfg.threads}")
    fn = resolve(args.task)
    import torch

    torch.set_num_threads(cfg.threads)
    out = cfg.out or CHECKPOINTS
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = fn(out, lambda line: print(line, file=sys.stderr, flush=True))
    print(f"trained {args.task} in {time.perf_counter() - start:.0f}s (threads: {cfg.threads}):")
    for p in paths:
        print(f"  {p}")
    return 0
