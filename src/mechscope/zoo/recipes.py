"""The recipe loop and the checkpoint files of the zoo transformers that tasks ship.

The steering toy, the instruction model and the Othello world model are each a zoo
:class:`~mechscope.zoo.transformer.Transformer` trained by a frozen recipe (AdamW with a
one-cycle schedule) and shipped as one safetensors file that records the model config and
the recipe. The loop and the file format live here once; each task supplies its loss.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mechscope.core.checkpoint import MissingCheckpointError, load_module_state, save_module
from mechscope.zoo.transformer import Transformer, TransformerConfig


def train_steps(model: Transformer, recipe: Any, loss_at: Callable[[int], Tensor], pct_start: float,
                clip: float | None = None, log: Callable[[str], None] | None = None) -> Transformer:
    """Run ``recipe.steps`` AdamW steps (``recipe.lr``, ``recipe.weight_decay``, one-cycle
    schedule warming up for ``pct_start`` of the run) on ``loss_at(step)``; with ``clip``,
    the gradient norm is clipped to it. Returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=pct_start)
    start = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == recipe.steps - 1):
            log(f"step {step} ({time.perf_counter() - start:.0f}s): loss {loss.item():.4f}")
    return model.eval()


def save_shipped(path: str | Path, model: Transformer, model_cfg: TransformerConfig, recipe: Any) -> None:
    """Write the weights with the model config and the recipe as metadata (atomically)."""
    save_module(path, model, {"model": dataclasses.asdict(model_cfg), "recipe": dataclasses.asdict(recipe)})


def load_shipped(path: str | Path, model_cfg: TransformerConfig, what: str, task: str) -> Transformer:
    """A shipped (or retrained) checkpoint in eval mode; a missing file names the command
    that writes it (``mechscope train <task>``)."""
    if not Path(path).exists():
        raise MissingCheckpointError(f"no {what} checkpoint at {path}; run `mechscope train {task}`")
    model = Transformer(model_cfg)
    load_module_state(path, model)
    return model.eval()
