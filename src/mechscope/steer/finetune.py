"""Training on a supervised task, for ReFT and for the finetuning baselines (LoRA, full).

One loop for every method, so that they see the same data in the same order for the
same number of steps: only *what is trainable* and *how the model is run* differ.

A supervised batch is any object with ``inputs`` (a dict for the model: ``input_ids``,
``attention_mask``, ``position_ids``), ``labels`` ``[batch, pos]`` (-100 where nothing
is predicted), and the prompt's ``prompt_start`` / ``prompt_len`` ``[batch]`` (absolute
column of its first token, and its length), e.g.
:class:`mechscope.tasks.instructions.TrainBatch`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.models import structure
from mechscope.core.run import logits_of
from mechscope.steer.reft import Reft, prompt_positions

BatchFn = Callable[[int], Any]  # step -> supervised batch


@dataclass(frozen=True)
class TrainRecipe:
    """Optimiser settings shared by every method in a comparison."""

    steps: int = 300
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps of linear warm-up (one-cycle schedule)
    clip: float = 1.0


def supervised_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled positions."""
    if not bool((labels != -100).any()):
        raise ValueError("a training batch has no labelled position (every label is -100)")
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def train_loop(params: Sequence[nn.Parameter], loss_fn: Callable[[Any], Tensor], batches: BatchFn,
               recipe: TrainRecipe, log: Callable[[str], None] | None = None) -> list[float]:
    """AdamW with a one-cycle schedule over ``params``; returns the loss curve."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps,
                                                pct_start=recipe.warmup)
    losses = []
    for step in range(recipe.steps):
        loss = loss_fn(batches(step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step % 100 == 0 or step == recipe.steps - 1):
            log(f"step {step}: loss {losses[-1]:.4f}")
    return losses


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter frozen (returned for chaining)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_reft(model: nn.Module, reft: Reft, batches: BatchFn, recipe: TrainRecipe = TrainRecipe(),
               log: Callable[[str], None] | None = None) -> list[float]:
    """Train ``reft``'s interventions with ``model`` frozen (its parameters are not touched)."""
    was = {p: p.requires_grad for p in model.parameters()}
    frozen(model)
    reft.train()

    def loss_fn(b: Any) -> Tensor:
        fwd = reft.forward_fn(model, prompt_positions(b.prompt_start, b.prompt_len, reft.positions))
        return supervised_loss(logits_of(fwd(b.inputs)), b.labels)

    try:
        return train_loop(list(reft.parameters()), loss_fn, batches, recipe, log)
    finally:
        reft.eval()
        for p, g in was.items():
            p.requires_grad_(g)


def train_full(model: nn.Module, batches: BatchFn, recipe: TrainRecipe = TrainRecipe(),
               log: Callable[[str], None] | None = None) -> nn.Module:
    """Full finetuning of a copy of ``model`` (every parameter trainable)."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    tuned.train()
    train_loop(list(tuned.parameters()), lambda b: supervised_loss(logits_of(tuned(**b.inputs)), b.labels),
               batches, recipe, log)
    return tuned.eval()


def lora_targets(model: nn.Module) -> list[str]:
    """Names (last path component) of every nn.Linear inside the model's blocks: LoRA's usual targets."""
    s = structure(model)
    inside = tuple(b.path + "." for b in s.blocks)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name.startswith(inside) and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}
    if not names:
        raise ValueError(f"{type(model).__name__}: no linear layer was found inside the blocks to put LoRA on; "
                         "pass target_modules explicitly")
    return sorted(names)


def train_lora(model: nn.Module, batches: BatchFn, recipe: TrainRecipe = TrainRecipe(), rank: int = 8,
               alpha: float = 16.0, target_modules: Iterable[str] | None = None,
               log: Callable[[str], None] | None = None) -> nn.Module:
    """LoRA (``W + (alpha/r) B A``, B zero-initialised) with the ``peft`` library, on a copy of ``model``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("the LoRA baseline needs the optional dependency peft; install it with "
                          "`pip install 'mechscope[peft]'` (or `pip install peft`)") from None
    targets = list(target_modules) if target_modules is not None else lora_targets(model)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    tuned = get_peft_model(copy.deepcopy(model), cfg)
    tuned.train()
    train_loop([p for p in tuned.parameters() if p.requires_grad],
               lambda b: supervised_loss(logits_of(tuned(**b.inputs)), b.labels), batches, recipe, log)
    return tuned.eval()
