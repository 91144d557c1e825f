"""``mechscope train TASK``: retrain a built-in world's model by its recipe.

The trainable tasks are the entries of :data:`mechscope.tasks.registry.TASKS` (adding a
task is one entry there). Each task's ``ship(out_dir, log) -> list[pathlib.Path]`` writes
its checkpoint(s) (and any history) into ``out_dir`` and returns the paths. The default
``out_dir`` is the package's ``zoo/checkpoints``, so a run reproduces the shipped files in
place. This module imports the registry (and so torch) only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, add_config_arguments, config, config_from_args, param

CHECKPOINTS = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"


@config
class TrainConfig(Config):
    """Options of ``mechscope train``."""

    out: Optional[Path] = param(None, metavar="DIR", help="where to write (default: the package's zoo/checkpoints)")
    threads: int = param(1, ge=1, help="torch threads (one is often fastest for these small models)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mechscope.tasks import registry

    parser = subparsers.add_parser(
        "train", help="retrain a built-in world's model by its recipe",
        description="Retrain a built-in world's model by its recipe and write its checkpoint. "
                    f"Tasks: {', '.join(registry.names())}.")
    parser.add_argument("task", nargs="?", metavar="TASK", help="what to train (--list shows the choices)")
    parser.add_argument("--list", action="store_true", help="list the trainable tasks and exit")
    add_config_arguments(parser, TrainConfig)
    return parser


def resolve(name: str) -> Callable[[Path, Callable[[str], None]], list[Path]]:
    """The training function (``ship``) of the task registered under ``name``."""
    from mechscope.tasks import registry

    try:
        return registry.get(name).ship
    except registry.UnknownTaskError as e:
        raise UsageError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from mechscope.tasks import registry

    if args.list:
        for name in registry.names():
            print(f"{name:28s} {registry.get(name).description}")
        return 0
    if not args.task:
        raise UsageError(f"give a task to train; trainable: {', '.join(registry.names())}")
    cfg = config_from_args(TrainConfig, args)
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
