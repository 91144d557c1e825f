"""The baselines table: prompting, steering, ReFT, LoRA and full finetuning on one task.

Every method is scored on the same held-out inputs with the same measures: trainable
parameters, task accuracy, and KL divergence on *unrelated* inputs (whose answers the
method should leave alone), teacher-forced, averaged over their answer positions. The
trained methods see the same training batches in the same order for the same number of
steps (:func:`mechscope.steer.finetune.train_loop`).

A method is run through a :data:`Forward`: ``(inputs, prompt_start, prompt_len) -> output``,
so that methods that act on positions (ReFT at the first/last prompt tokens, steering
from the last prompt token on) find them in any batch, padded or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.collect import activations
from mechscope.core.run import logits_of, run
from mechscope.core.site import Site
from mechscope.steer.apply import Steer
from mechscope.steer.directions import paired_mean_difference
from mechscope.steer.finetune import (
    TrainRecipe,
    frozen,
    train_full,
    train_lora,
    train_reft,
)
from mechscope.steer.reft import Reft, n_trainable, prompt_positions

Forward = Callable[[dict, Tensor, Tensor], Any]


@dataclass(frozen=True)
class SupervisedTask:
    """What a comparison needs from a task.

    ``train`` / ``test`` hold examples of the behaviour to induce (no instruction);
    ``prompted_train`` / ``prompted_test`` the same inputs with the instruction written in
    (for prompting, and for the steering direction); ``unrelated`` examples whose answers
    must not change. ``batch(examples)`` makes a supervised batch (see
    :mod:`mechscope.steer.finetune`); ``accuracy(forward, examples)`` scores a method.
    """

    train: Sequence[Any]
    test: Sequence[Any]
    prompted_train: Sequence[Any]
    prompted_test: Sequence[Any]
    unrelated: Sequence[Any]
    batch: Callable[[Sequence[Any]], Any]
    accuracy: Callable[[Forward, Sequence[Any]], float]
    steer_positions: tuple[int, ...] = (-1,)  # prompt positions (from its start, or <0 from its end) to steer at


@dataclass
class MethodResult:
    """One row of the table."""

    method: str
    trainable_params: int
    accuracy: float
    kl_unrelated: float
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "trainable_params": self.trainable_params, "accuracy": self.accuracy,
                "kl_unrelated": self.kl_unrelated, **self.detail}


# --------------------------------------------------------------------------- forwards
def plain(model: nn.Module) -> Forward:
    return lambda inputs, start, length: model(**inputs)


def reft_forward(model: nn.Module, reft: Reft) -> Forward:
    def fwd(inputs: dict, start: Tensor, length: Tensor) -> Any:
        return reft.forward_fn(model, prompt_positions(start, length, reft.positions))(inputs)
    return fwd


def _prompt_column(start: Tensor, length: Tensor, where: int) -> Tensor:  # [batch] absolute column
    return start + (where if where >= 0 else length + where)


def steering_forward(model: nn.Module, vector: Tensor, site: Site, coeff: float, where: int = -1) -> Forward:
    """Add ``coeff * vector`` at ``site`` at prompt position ``where``; at the last prompt token
    (``where = -1``) also at every position after it (contrastive activation addition)."""
    def fwd(inputs: dict, start: Tensor, length: Tensor) -> Any:
        cols = torch.arange(inputs["input_ids"].shape[1])[None, :]
        col = _prompt_column(start, length, where)[:, None]
        mask = cols >= col if where == -1 else cols == col  # [batch, pos]
        return run(model, inputs, [(site.replace(positions=None), Steer(vector, coeff, mask))])[0]
    return fwd


# --------------------------------------------------------------------------- measures
@torch.no_grad()
def kl_unrelated(base: Forward, method: Forward, task: SupervisedTask, batch_size: int = 256) -> float:
    """Mean KL(base || method) of next-token distributions over the unrelated examples' answer positions."""
    total, count = 0.0, 0
    for i in range(0, len(task.unrelated), batch_size):
        b = task.batch(task.unrelated[i:i + batch_size])
        p = logits_of(base(b.inputs, b.prompt_start, b.prompt_len)).float().log_softmax(-1)
        q = logits_of(method(b.inputs, b.prompt_start, b.prompt_len)).float().log_softmax(-1)
        keep = b.labels != -100
        kl = (p.exp() * (p - q)).sum(-1)  # [batch, pos]
        total += float(kl[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


def train_batches(task: SupervisedTask, batch_size: int, seed: int) -> Callable[[int], Any]:
    """Step -> a batch of training examples, reshuffled every epoch (the same for every method)."""
    n = len(task.train)

    def get(step: int) -> Any:
        per_epoch = max(1, n // batch_size)
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        return task.batch([task.train[i] for i in order[k * batch_size:(k + 1) * batch_size]])
    return get


# --------------------------------------------------------------------------- the methods
def caa_vectors(model: nn.Module, task: SupervisedTask, sites: Sequence[Site], where: int = -1) -> list[Tensor]:
    """Mean over training pairs of h(prompted) - h(plain) at prompt position ``where``, per site."""
    with_instr, without = task.batch(list(task.prompted_train)), task.batch(list(task.train))
    out = []
    for site in sites:
        rows = [activations(model, b.inputs, site.replace(positions=_prompt_column(b.prompt_start, b.prompt_len, where)[:, None]),
                            batch_size=10**9) for b in (with_instr, without)]
        out.append(paired_mean_difference(*rows))
    return out


def steering_baseline(model: nn.Module, task: SupervisedTask, sites: Sequence[Site],
                      coeffs: Sequence[float] = (0.5, 1.0, 2.0, 4.0), n_select: int = 100) -> tuple[Forward, dict]:
    """The best (site, prompt position, coefficient) for the contrastive vector, chosen by accuracy
    on training examples: a tuned steering baseline, not a strawman."""
    select = list(task.train[:n_select])
    best: tuple[float, Forward | None, dict] = (-1.0, None, {})
    grid = {}
    for where in task.steer_positions:
        for site, v in zip(sites, caa_vectors(model, task, sites, where)):
            if float(v.norm()) < 1e-6:  # nothing differs there (e.g. an embedding the instruction cannot reach)
                continue
            for c in coeffs:
                fwd = steering_forward(model, v, site, c, where)
                acc = task.accuracy(fwd, select)
                grid[f"{site}@pos{where}x{c:g}"] = acc
                if acc > best[0]:
                    best = (acc, fwd, {"site": str(site), "prompt_position": where, "coeff": c,
                                       "vector_norm": float(v.norm())})
    return best[1], {**best[2], "selection": grid}


def reft_alone(model: nn.Module, task: SupervisedTask, sites: Sequence[Site], d_model: int, *, kind: str = "loreft",
               rank: int = 4, positions: str = "f2+l2", recipe: TrainRecipe = TrainRecipe(), batch_size: int = 32,
               seed: int = 0) -> tuple[MethodResult, Reft]:
    """One ReFT intervention trained on ``task`` with the model frozen, and its row of the table
    (KL is NaN when the task has no unrelated examples; ``detail`` holds the final loss and
    the model's own accuracy on the test examples)."""
    torch.manual_seed(seed)
    reft = Reft(sites, d_model, kind, rank, positions, seed)
    losses = train_reft(model, reft, train_batches(task, batch_size, seed), recipe)
    fwd = reft_forward(model, reft)
    kl = kl_unrelated(plain(model), fwd, task) if task.unrelated else float("nan")
    row = MethodResult(kind, n_trainable(reft), task.accuracy(fwd, task.test), kl,
                       {"final_loss": losses[-1], "base_accuracy": task.accuracy(plain(model), task.test)})
    return row, reft


def compare(model: nn.Module, task: SupervisedTask, sites: Sequence[Site], d_model: int, *,
            recipe: TrainRecipe = TrainRecipe(), batch_size: int = 32, rank: int = 4, positions: str = "f2+l2",
            lora_rank: int = 8, lora_alpha: float = 16.0, full_lr: float | None = None, seed: int = 0,
            methods: Sequence[str] = ("prompting", "steering", "loreft", "direft", "lora", "full_finetuning"),
            log: Callable[[str], None] | None = None) -> list[MethodResult]:
    """Every method of ``methods`` on ``task``, in one table (see the module docstring)."""
    frozen(model)
    base = plain(model)
    batches = train_batches(task, batch_size, seed)
    rows: list[MethodResult] = []

    def add(name: str, fwd: Forward, params: int, data: Sequence[Any], **detail: Any) -> None:
        rows.append(MethodResult(name, params, task.accuracy(fwd, data), kl_unrelated(base, fwd, task), detail))
        if log:
            log(f"{name}: {rows[-1].row()}")

    for name in methods:
        if name == "prompting":
            add(name, base, 0, task.prompted_test, note="instruction token written in the prompt")
        elif name == "steering":
            fwd, info = steering_baseline(model, task, sites)
            add(name, fwd, d_model, task.test, **info)
        elif name in ("loreft", "direft"):
            torch.manual_seed(seed)
            reft = Reft(sites, d_model, name, rank, positions, seed)
            losses = train_reft(model, reft, batches, recipe)
            add(name, reft_forward(model, reft), n_trainable(reft), task.test, rank=rank, positions=positions,
                final_loss=losses[-1])
        elif name == "lora":
            torch.manual_seed(seed)
            tuned = train_lora(model, batches, recipe, lora_rank, lora_alpha)
            add(name, plain(tuned), n_trainable(tuned), task.test, rank=lora_rank, alpha=lora_alpha)
        elif name == "full_finetuning":
            torch.manual_seed(seed)
            r = recipe if full_lr is None else TrainRecipe(**{**recipe.__dict__, "lr": full_lr})
            tuned = train_full(model, batches, r)
            add(name, plain(tuned), n_trainable(tuned), task.test, lr=r.lr)
        else:
            raise ValueError(f"unknown method {name!r}; choose from prompting, steering, loreft, direft, lora, full_finetuning")
    return rows
