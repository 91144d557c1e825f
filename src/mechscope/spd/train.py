"""Training a stochastic parameter decomposition of a frozen model.

``train_spd(model, data, cfg)`` decomposes the layers ``cfg.sites`` of ``model``:

1. build the :class:`Decomposition` (or resume it from ``out_dir``);
2. faithfulness-only warm-up (``cfg.warmup_steps``), pulling ``U V`` towards ``W``;
3. ``cfg.steps`` AdamW steps on the weighted losses of :class:`SPDObjective`, with the
   learning-rate schedule and the annealing of ``p``;
4. resumable checkpoints every ``cfg.checkpoint_every`` steps, the final decomposition
   and the history in ``out_dir``, which is locked for the run (:mod:`mechscope.core.lock`:
   a second job fails at once; the ranks of one ``torchrun`` job share the lock).

A run found in ``out_dir`` is resumed only with the same fingerprint (the caller's record
of the target and its data, and the config but for ``steps``, ``log_every`` and
``checkpoint_every``) and the same ``steps``; ``extend=True`` (``--continue``) trains a
run on to another ``steps``, with the learning-rate schedule and the annealing of p
recomputed for the new total (:func:`mechscope.spd.checkpoint.check_resume`).

``data(batch_size, generator)`` returns one batch of model inputs. Under ``torchrun`` each
rank draws its own batches and masks and DistributedDataParallel averages gradients.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from mechscope.core import distributed
from mechscope.core.checkpoint import save_json_atomic
from mechscope.core.lock import lock_dir
from mechscope.core.progress import Progress
from mechscope.spd.checkpoint import (check_resume, fingerprint_of, load_training_state, save_decomposition,
                                     save_training_state)
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.evals import live_counts
from mechscope.spd.losses import lr_factor
from mechscope.spd.objective import SPDObjective

DataFn = Callable[[int, torch.Generator], Any]
STATE_FILE = "training_state.safetensors"
DECOMPOSITION_FILE = "decomposition.safetensors"


@dataclass
class SPDRun:
    """What :func:`train_spd` returns."""

    decomposition: Decomposition
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    steps_run: int = 0
    out_dir: Path | None = None
    continued: list[dict[str, int]] = field(default_factory=list)  # each --continue: step, steps before, after

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else 0.0


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off gradients of the target's parameters for the duration (then restore them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW (weight decay 0) with its fused kernel: one pass over each parameter per step
    instead of ~10 small ops (the importance MLPs are many small tensors); same update up
    to float rounding. Falls back to the multi-tensor version where fused is unavailable."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)


def faithfulness_warmup(dec: Decomposition, cfg: SPDConfig, progress: Progress | None = None) -> float:
    """``cfg.warmup_steps`` AdamW steps on the faithfulness loss alone; returns its final value."""
    if cfg.warmup_steps == 0:
        return float(dec.faithfulness().detach())
    opt = torch.optim.AdamW(dec.component_parameters(), lr=cfg.warmup_lr, weight_decay=cfg.warmup_weight_decay)
    for _ in range(cfg.warmup_steps):
        opt.zero_grad(set_to_none=True)
        loss = dec.faithfulness()
        loss.backward()
        opt.step()
    final = float(dec.faithfulness().detach())
    if progress:
        progress.write(f"faithfulness warm-up: {cfg.warmup_steps} steps, ‖W - UV‖²/n = {final:.3g}")
    return final


def _record(step: int, out: dict[str, Any], lr: float, dec: Decomposition) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "lr": lr, "p": float(out["p"])}
    for key in ("total", "stochastic", "layerwise", "importance", "faithfulness"):
        row[key] = float(out[key].detach())
    for path, v in out["l0"].items():
        row[f"l0/{path}"] = float(v)
    return distributed.mean_over_ranks(row) | {"step": step, "live": {p: n for p, (n, _) in live_counts(dec).items()}}


def _short(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def progress_text(losses: Mapping[str, float], live: Mapping[str, tuple[int, int]]) -> str:
    """What the progress line shows: the losses, and each layer's live subcomponents of C."""
    loss_text = " ".join(f"{k} {_short(v)}" for k, v in losses.items())
    live_text = " ".join(f"{k} {n}/{c}" for k, (n, c) in live.items())
    return f"{loss_text} | live {live_text}"


def train_spd(model: nn.Module, data: DataFn, cfg: SPDConfig, *, out_dir: str | Path | None = None,
              resume: bool = True, progress: bool = True, example_inputs: Any = None,
              log: Callable[[str], None] | None = None,
              on_record: Callable[[dict[str, Any]], None] | None = None,
              fingerprint: dict[str, Any] | None = None, extend: bool = False) -> SPDRun:
    """Decompose ``model``'s layers ``cfg.sites``; see the module docstring. ``on_record`` is
    called with every history record (e.g. an experiment tracker's ``log``); ``fingerprint``
    records what the target and its data are (JSON values), checked on resume."""
    rank, _ = distributed.world()
    out = Path(out_dir) if out_dir is not None else None
    gens = {"data": distributed.generator(cfg.seed, 1, rank), "mask": distributed.generator(cfg.seed, 2, rank)}
    if example_inputs is None:
        example_inputs = data(min(cfg.batch_size, 8), torch.Generator().manual_seed(cfg.seed))
    bar = Progress(cfg.steps, label="spd", enabled=progress and rank == 0)
    lock = lock_dir(out, "SPD run directory") if out is not None else nullcontext()
    with lock, frozen(model):
        dec = Decomposition(model, cfg, example_inputs)
        objective = SPDObjective(dec)
        opt = make_optimizer(dec.parameters(), cfg.lr)
        start, history, continued, record = 0, [], [], fingerprint_of(cfg, fingerprint)
        state_path = out / STATE_FILE if out is not None else None
        if resume and state_path is not None and state_path.exists():
            continued = check_resume(state_path, cfg, record, extend)
            start, history = load_training_state(state_path, dec, opt, gens)
            if distributed.world()[1] > 1:  # the file holds rank 0's generators: re-seed per rank
                gens = {"data": distributed.generator(cfg.seed + start, 1, rank),
                        "mask": distributed.generator(cfg.seed + start, 2, rank)}
            bar.write(f"resumed from {state_path} at step {start}")
        else:
            faithfulness_warmup(dec, cfg, bar)
        step_fn = distributed.wrap(objective)  # DDP broadcasts rank 0's parameters
        bar.start = start
        t0, steps_run = time.perf_counter(), 0
        for step in range(start, cfg.steps):
            lr = cfg.lr * lr_factor(step, cfg.steps, cfg.lr_schedule, cfg.lr_warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            inputs = data(cfg.batch_size, gens["data"])
            result = step_fn(inputs, step / max(cfg.steps, 1), gens["mask"])
            opt.zero_grad(set_to_none=True)
            result["total"].backward()
            opt.step()
            steps_run += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = _record(done, result, lr, dec)
                history.append(row)
                if on_record is not None and rank == 0:
                    on_record(row)
                live = live_counts(dec)
                bar.update(done, progress_text({k: row[k] for k in ("stochastic", "layerwise", "importance",
                                                                    "faithfulness")}, live))
                if log:
                    log(bar.line(done, progress_text({k: row[k] for k in ("stochastic", "layerwise", "importance")},
                                                     live)))
            if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                if rank == 0:
                    save_training_state(state_path, dec, opt, done, gens, history, record, continued)
                distributed.barrier()
        seconds = time.perf_counter() - t0
        bar.close()
        if out is not None:
            if rank == 0:
                save_training_state(state_path, dec, opt, cfg.steps, gens, history, record, continued)
                extra = {"steps_per_second": steps_run / max(seconds, 1e-9)}
                save_decomposition(out / DECOMPOSITION_FILE, dec, extra | ({"continued": continued} if continued else {}))
                save_json_atomic(out / "history.json", history)
            distributed.barrier()
    return SPDRun(dec, history, seconds, steps_run, out, continued)
