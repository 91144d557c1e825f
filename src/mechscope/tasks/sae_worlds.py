"""Dictionaries on the toy worlds' activations, scored by CE loss recovered.

Two sites of two trained models with known mechanisms (``mechscope.tasks``):

- **induction**: the 2-layer attention-only model's residual stream after layer 0
  (``blocks.0``, d = 64: what the induction heads of layer 1 read), on its training
  distribution (``BOS r r`` with the period drawn per sequence: a table of 8192
  sequences' token rows); CE is the next-token loss over every position of the
  evaluation batches (exact repeats, other sequences);
- **grokking**: the modular-addition model's MLP neurons (``blocks.0.mlp.act``,
  d = 512), on all p² inputs; CE is the loss of the answer.

For each, a TopK and a JumpReLU dictionary (:data:`ARCHS`) are trained by
:func:`train_toy_sae` and shipped as ``zoo/checkpoints/sae_<world>_<arch>.safetensors``
with the model file they belong to: ``mechscope train sae_toy_worlds`` writes all four,
``mechscope train sae_induction`` / ``sae_grokking`` the two of one world (run the first
after retraining the induction model: the dictionaries read its activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.sae.arch import SAE, SAEConfig
from mechscope.sae.io import load_sae, read_sae_metadata, save_sae
from mechscope.sae.splice import ce_loss_recovered, next_token_loss
from mechscope.sae.train import TrainConfig, TrainResult, train
from mechscope.tasks import grokking, induction

CHECKPOINTS = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"
WORLDS = ("induction", "grokking")
ARCHS = ("topk", "jumprelu")


@dataclass
class ToyWorld:
    """A trained model, the site a dictionary reads, its data and its loss."""

    name: str
    model: nn.Module
    site: Site
    model_file: str
    stream: Callable[[int, int], Iterator[Tensor]]  # (batch_size, seed) -> rows [batch_size, d]
    eval_batches: list[Any]
    loss_fn: Callable[[Any, Any], tuple[Tensor, Tensor]]


def _table_stream(make_table: Callable[[], Tensor]) -> Callable[[int, int], Iterator[Tensor]]:
    """Random rows of an activation table (built on first use, then kept), in a seeded order (endless)."""
    built: list[Tensor] = []

    def stream(batch_size: int, seed: int) -> Iterator[Tensor]:
        if not built:
            with torch.no_grad():
                built.append(make_table())
        table = built[0]
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield table[torch.randint(table.shape[0], (batch_size,), generator=gen)]

    return stream


def induction_world(model_file: str = "induction_2l.safetensors", n_sequences: int = 8192) -> ToyWorld:
    """The residual stream after layer 0 over ``n_sequences`` training-distribution sequences (41 tokens each)."""
    model, cfg = induction.load(CHECKPOINTS / model_file)
    site = Site("blocks.0", name="resid_post.0")

    def table() -> Tensor:  # ~336 k token rows [rows, d_model]: the model is tiny, a table beats a live stream here
        gen = torch.Generator().manual_seed(0)
        return torch.cat([cache(model, induction.training_batch(cfg, gen), [site])[site].reshape(-1, cfg.d_model)
                          for _ in range(n_sequences // cfg.batch_size)])

    evals = [induction.eval_batch(cfg, n=256, seed=4321 + i) for i in range(2)]
    return ToyWorld("induction", model, site, model_file, _table_stream(table), evals, next_token_loss)


def _default_grokking_file() -> str:
    """The shipped p = 113 model when present, else the quick p = 53 one."""
    return "grokking_p113.safetensors" if (CHECKPOINTS / "grokking_p113.safetensors").exists() else "grokking_p53.safetensors"


def grokking_world(model_file: str | None = None) -> ToyWorld:
    model_file = model_file or _default_grokking_file()
    model = grokking.load(CHECKPOINTS / model_file)
    p = model.cfg.p
    site = Site("blocks.0.mlp.act", name="mlp_neurons")
    tokens, _ = grokking.all_pairs(p)  # [p*p, 3]: the whole input space

    def answer_loss(output: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        labels = (inputs[:, 0] + inputs[:, 1]) % p
        return F.cross_entropy(output.double(), labels, reduction="none"), output

    evals = list(tokens.split(4096))
    table = lambda: cache(model, tokens, [site])[site]  # noqa: E731 - [p*p, d_mlp]
    return ToyWorld("grokking", model, site, model_file, _table_stream(table), evals, answer_loss)


def load_world(name: str, model_file: str | None = None) -> ToyWorld:
    if name == "induction":
        return induction_world(model_file or "induction_2l.safetensors")
    if name == "grokking":
        return grokking_world(model_file)
    raise ValueError(f"unknown toy world {name!r}; valid: {', '.join(WORLDS)}")


def sae_setting(world: str, arch: str, d: int) -> tuple[SAEConfig, TrainConfig]:
    """Dictionary and recipe per (world, arch): 8x (induction) or 1x (grokking) latents.

    TopK and JumpReLU use their recipes' defaults (spec §1.2, §1.4: the JumpReLU paper's
    lr 7e-5 and Adam betas (0, 0.999), θ₀ = ε = 0.001 with E|x|² = 1 inputs). L0: k = 16
    on induction, for TopK and as the target of JumpReLU's penalty; on grokking TopK keeps
    k = 32 and JumpReLU aims at 24, because a penalty centred on 32 leaves L0 on either
    side of the check's L0 <= 32. TopK trains for 4000 steps. JumpReLU's θ moves about lr
    per Adam step, so on induction it needs 12000; on grokking, whose whole input space is
    p² = 12,769 rows, it takes 1024-row batches and 4000 steps (its L0 reaches the target
    by step 3000), which keeps that run to minutes on two cores.
    """
    if world not in WORLDS or arch not in ARCHS:
        raise ValueError(f"no setting for world {world!r} and arch {arch!r}; worlds {WORLDS}, archs {ARCHS}")
    d_sae, k = (8 * d, 16) if world == "induction" else (d, 32 if arch == "topk" else 24)
    steps = 12000 if (world, arch) == ("induction", "jumprelu") else 4000
    batch = 1024 if (world, arch) == ("grokking", "jumprelu") else 4096
    return (SAEConfig(d_in=d, d_sae=d_sae, arch=arch, k=k),
            TrainConfig(steps=steps, batch_size=batch, log_every=500, dead_tokens=10_000_000, seed=0))


def train_toy_sae(world: ToyWorld, arch: str, steps: int | None = None, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> TrainResult:
    """Train the (world, arch) dictionary of :func:`sae_setting` on the world's stream."""
    d = int(next(world.stream(8, 0)).shape[-1])
    sae_cfg, cfg = sae_setting(world.name, arch, d)
    cfg = cfg.replace(steps=steps or cfg.steps, progress=progress)

    def on_log(entry: dict[str, float], trainer: Any) -> None:
        if log is not None:
            log(f"{world.name} {arch} step {int(entry['step'])}: FVU {entry['fvu']:.4f}, L0 {entry['l0']:.1f}, "
                f"dead {100 * entry['dead']:.1f}%")

    return train(sae_cfg, cfg, world.stream(cfg.batch_size, 1), on_log=on_log)


def score(world: ToyWorld, sae: SAE) -> dict[str, float]:
    """CE loss recovered (with KL score and delta loss) and the L0 on the evaluation inputs."""
    ce = ce_loss_recovered(world.model, world.eval_batches, world.site, sae, loss_fn=world.loss_fn)
    with torch.no_grad():
        views = torch.cat([cache(world.model, b, [world.site])[world.site].reshape(-1, sae.d_in)
                           for b in world.eval_batches])
        f = sae.encode(views)
        fvu = float((sae.decode(f) - views).pow(2).sum() / (views - views.mean(0)).pow(2).sum())
    return {**ce, "l0": float((f != 0).sum()) / f.shape[0], "fvu": fvu}


def checkpoint_name(world: str, arch: str) -> str:
    return f"sae_{world}_{arch}.safetensors"


def load_shipped(world: str, arch: str, directory: Path = CHECKPOINTS) -> tuple[SAE, dict[str, Any]]:
    """A shipped toy-world dictionary and its metadata (which model file it was trained on)."""
    path = directory / checkpoint_name(world, arch)
    return load_sae(path), read_sae_metadata(path)


def train_and_ship_toy_worlds(out_dir: Path, log: Callable[[str], None] = print,
                              worlds: tuple[str, ...] = WORLDS, archs: tuple[str, ...] = ARCHS) -> list[Path]:
    """Train and write the TopK and JumpReLU dictionary of each toy world (``mechscope train sae_toy_worlds``).

    ``worlds`` and ``archs`` pick a subset; each file depends only on its own (world, arch)
    recipe, so a subset writes the same files as the whole run.
    """
    bad = [w for w in worlds if w not in WORLDS] + [a for a in archs if a not in ARCHS]
    if bad:
        raise ValueError(f"unknown toy world or architecture {bad}; worlds {WORLDS}, archs {ARCHS}")
    paths = []
    for name in worlds:
        world = load_world(name)
        for arch in archs:
            result = train_toy_sae(world, arch, log=log)
            scores = score(world, result.sae)
            path = Path(out_dir) / checkpoint_name(name, arch)
            save_sae(path, result.sae, dtype=torch.float16 if result.sae.d_in * result.sae.d_sae > 2 ** 17 else None,
                     extra={"recipe": "mechscope.tasks.sae_worlds:train_and_ship_toy_worlds", "world": name,
                            "model_file": world.model_file, "site": world.site.to_dict(),
                            "history": result.history, "scores_fp32": scores})
            log(f"wrote {path}: CE loss recovered {scores['ce_loss_recovered']:.4f}, L0 {scores['l0']:.1f}, "
                f"FVU {scores['fvu']:.4f}")
            paths.append(path)
    return paths


def train_and_ship_induction(out_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Both dictionaries of the induction model (``mechscope train sae_induction``): rerun after retraining it."""
    return train_and_ship_toy_worlds(out_dir, log, worlds=("induction",))


def train_and_ship_grokking(out_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Both dictionaries of the grokking model (``mechscope train sae_grokking``)."""
    return train_and_ship_toy_worlds(out_dir, log, worlds=("grokking",))
