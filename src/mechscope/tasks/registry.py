"""The one registry of built-in worlds and of the models trained on them.

Every name that ``mechscope train`` accepts, that the bench retrains or loads, and that
``--model NAME`` builds is one :class:`Task` here (the zoo's random architectures are
added by :func:`build_model`, which is how the zoo is read). A task says:

- ``name`` and ``description``;
- ``ship(out_dir, log) -> [paths]``: retrain by the published recipe and write the
  checkpoint(s) into ``out_dir`` (what ``mechscope train NAME`` runs);
- ``checkpoint``: the shipped file, and ``load()``: that model in eval mode;
- ``Recipe`` and ``train(recipe)``: where a world retrains at a seed
  (``task.train(task.Recipe(seed=s))``, what the bench's ``--full`` does);
- ``sample`` (its data) and ``causal_model`` (its high-level model), where it has them.

Adding a task is one :class:`Task` in :data:`TASKS`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mechscope import zoo
from mechscope.tasks import grokking, hierarchical_equality, induction, instructions, modular, othello
from mechscope.tasks import price_tagging, sae_synthetic, sae_worlds, spd_targets, steering_toy
from mechscope.tasks import ravel
from mechscope.tasks import rival_variables

Log = Callable[[str], None]


@dataclass(frozen=True)
class Task:
    """One built-in world or trained model: how to retrain it, where it ships, how to load it."""

    name: str
    description: str
    ship: Callable[[Path, Log], list[Path]]
    checkpoint: Path | None = None
    load: Callable[[], nn.Module] | None = None
    Recipe: Callable[..., Any] | None = None  # a frozen recipe class (or factory) taking seed=
    train: Callable[..., nn.Module] | None = None
    sample: Callable[..., Any] | None = None
    causal_model: Callable[[], Any] | None = None

    @property
    def has_model(self) -> bool:
        return self.load is not None

    def retrain(self, seed: int = 0) -> nn.Module:
        """The model retrained by its recipe at ``seed`` (only tasks with a ``Recipe``)."""
        if self.Recipe is None or self.train is None:
            raise ValueError(f"task {self.name!r} has no seeded recipe; retrain it with `mechscope train {self.name}`")
        return self.train(self.Recipe(seed=seed))


def _induction(n_layers: int) -> nn.Module:
    return induction.load(n_layers=n_layers)[0]


def _quiet(*_: Any) -> None:
    return None


def _model_of(train: Callable[..., tuple[nn.Module, Any]]) -> Callable[[Any], nn.Module]:
    """``train(recipe, log=...) -> (model, record)`` as ``recipe -> model`` (the protocol's ``train``)."""
    return lambda recipe: train(recipe, log=_quiet)[0]


def _spd_sample(name: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return spd_targets.data_fn(name)(batch_size, generator)


def _spd(name: str) -> list[Task]:
    t = spd_targets.target(name)
    return [Task(f"spd_{name}", f"SPD target: {t.description}", getattr(spd_targets, f"train_and_ship_{name}"),
                 t.checkpoint, partial(spd_targets.load_target, name), sample=partial(_spd_sample, name)),
            Task(f"spd_{name}_decomposition", f"SPD decomposition of {t.description} at the published settings",
                 getattr(spd_targets, f"decompose_and_ship_{name}"), t.decomposition_checkpoint)]


def _recipe_world(name: str, module: Any, description: str) -> Task:
    """A world whose model is a zoo transformer trained by a frozen ``Recipe``."""
    return Task(name, description, module.train_and_ship, module.CHECKPOINT, module.load, module.Recipe,
                module.train, getattr(module, "sample", None))


def _tasks() -> list[Task]:
    he, pt = hierarchical_equality, price_tagging
    return [
        Task("grokking", "modular addition (p = 113), one layer: grokking and its Fourier algorithm",
             modular.train_and_ship, grokking.CHECKPOINT, grokking.load, grokking.GrokkingConfig,
             _model_of(grokking.train_grokking)),
        Task("grokking_quick", "modular addition, p = 53 (the quick variant the tests use)",
             modular.train_and_ship_quick, grokking.CHECKPOINT.with_name("grokking_p53.safetensors"),
             partial(grokking.load, grokking.CHECKPOINT.with_name("grokking_p53.safetensors")), grokking.quick_config,
             _model_of(grokking.train_grokking)),
        Task("induction", "2-layer attention-only transformer with induction heads", induction.train_and_ship,
             induction.checkpoint_path(2), partial(_induction, 2), induction.InductionConfig,
             _model_of(induction.train_induction)),
        Task("induction_1l", "1-layer attention-only control (no induction heads)", induction.train_and_ship_1l,
             induction.checkpoint_path(1), partial(_induction, 1), partial(induction.InductionConfig, n_layers=1),
             _model_of(induction.train_induction)),
        Task(he.NAME, "hierarchical equality: MLP 16-16-16-16-2 with two known intermediate variables",
             he.train_and_ship, he.CHECKPOINT, he.load_model, he.TrainConfig, _model_of(he.train), he.sample,
             he.causal_model),
        Task(pt.NAME, "price tagging: 2-layer transformer deciding whether a price lies in a bracket",
             pt.train_and_ship, pt.CHECKPOINT, pt.load_model, pt.TrainConfig, _model_of(pt.train), pt.sample,
             pt.causal_model),
        *[task for name in spd_targets.TARGETS for task in _spd(name)],
        Task("sae_synthetic", "TopK dictionaries (with and without AuxK) on synthetic ground-truth features",
             sae_synthetic.train_and_ship_synthetic),
        Task("sae_toy_worlds", "TopK and JumpReLU dictionaries of the induction and grokking models",
             sae_worlds.train_and_ship_toy_worlds),
        Task("sae_induction", "both dictionaries of the induction model", sae_worlds.train_and_ship_induction),
        Task("sae_grokking", "both dictionaries of the grokking model", sae_worlds.train_and_ship_grokking),
        _recipe_world("steering_toy", steering_toy,
                      "trained 3-layer transformer that emits R when a planted concept (a marked token) is present"),
        _recipe_world("instructions", instructions,
                      "trained 3-layer transformer following instruction tokens (copy, reverse, sort, shift)"),
        _recipe_world("othello", othello, "trained 6-layer world model of 6x6 Othello (legal moves of random games)"),
        Task(ravel.NAME, "RAVEL, small: 3-layer transformer answering colour/shape queries about 48 entities",
             ravel.train_and_ship, ravel.CHECKPOINT, ravel.load, ravel.Recipe, ravel.train, ravel.sample,
             ravel.causal_model),
        Task(rival_variables.NAME, "rival intermediates: MLP on digits x, y, z -> x + y + z whose blocks compute "
             "S = x + y and never T = y + z (known by construction)", rival_variables.train_and_ship,
             rival_variables.CHECKPOINT, rival_variables.load, rival_variables.Recipe, rival_variables.train,
             rival_variables.sample, rival_variables.causal_model),
    ]


TASKS: dict[str, Task] = {t.name: t for t in _tasks()}


class UnknownTaskError(KeyError):
    """A name that is no registered task; the message lists the valid ones (and the closest)."""

    def __str__(self) -> str:
        return str(self.args[0])


def names() -> list[str]:
    """Every registered task, sorted (what ``mechscope train --list`` prints)."""
    return sorted(TASKS)


def _unknown(name: str, what: str, valid: list[str]) -> UnknownTaskError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownTaskError(f"unknown {what} {name!r}{hint}; valid: {', '.join(valid)}")


def get(name: str) -> Task:
    """The task registered under ``name``."""
    if name not in TASKS:
        raise _unknown(name, "task", names())
    return TASKS[name]


def model_names() -> list[str]:
    """Every built-in model: the zoo's architectures and each task's trained model."""
    return sorted(set(zoo.names()) | {t.name for t in TASKS.values() if t.has_model})


def describe_model(name: str) -> str:
    return zoo.describe(name) if name in zoo.names() else get(name).description


def build_model(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A built-in model in eval mode: a zoo architecture (randomly initialised at ``seed``)
    or a task's shipped model; unknown names list the valid ones."""
    if name in zoo.names():
        return zoo.build(name, seed, **kwargs)
    if name not in TASKS or not TASKS[name].has_model:
        raise _unknown(name, "built-in model", model_names())
    torch.manual_seed(seed)
    return TASKS[name].load(**kwargs).eval()
