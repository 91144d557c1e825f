"""Modular addition that groks (Nanda et al., ICLR 2023, arXiv 2301.05217).

Inputs are the tokens ``a b =`` (``=`` is token p), the label is ``(a + b) mod p``, and
the loss is read at the last position only. The model is the paper's: one block,
d_model 128, 4 heads of 32, a ReLU MLP of 512, learned positions, no LayerNorm, untied
embeddings, no attention biases; trained full batch on 30 % of the p² pairs with AdamW
(lr 1e-3, weight decay 1.0, betas 0.9/0.98, 10-step warm-up). It memorises first, then
(after thousands of steps) generalises through a Fourier algorithm on a few key
frequencies.

Because only the last position's output is ever read, the model computes attention for
the last query only and the MLP at the last position only (an exact shortcut: the other
positions' outputs are never used). Module paths follow the zoo transformer: ``embed``,
``pos_embed``, ``blocks.0.attn.{q,k,v,o,pattern}``, ``blocks.0.mlp.{fc_in,act,fc_out}``,
``unembed``; the MLP neurons are the output of ``blocks.0.mlp.act`` ``[batch, d_mlp]``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechscope.core.checkpoint import load_module_state, load_tensors, save_module
from mechscope.core.config import Config, ConfigError, config, param

CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / "grokking_p113.safetensors"
HISTORY = CHECKPOINT.with_suffix(".json")


@config
class GrokkingConfig(Config):
    """Model and recipe (defaults: the paper's p = 113 run)."""

    p: int = param(113, help="prime modulus")
    train_fraction: float = param(0.3, help="share of the p² pairs used for training")
    d_model: int = param(128, help="residual width", ge=1)
    n_heads: int = param(4, help="attention heads", ge=1)
    d_head: int = param(32, help="width of one head", ge=1)
    d_mlp: int = param(512, help="MLP neurons", ge=1)
    lr: float = param(1e-3, help="AdamW learning rate")
    weight_decay: float = param(1.0, help="AdamW weight decay")
    beta2: float = param(0.98, help="AdamW second-moment decay (beta1 = 0.9)")
    warmup_steps: int = param(10, help="linear learning-rate warm-up")
    steps: int = param(10_000, help="full-batch steps", ge=1)
    snapshot_every: int = param(100, help="keep a copy of the weights every this many steps (progress measures)", ge=1)
    seed: int = param(0, help="seed of the split, the initialisation")

    def validate(self) -> None:
        if self.p < 3 or any(self.p % d == 0 for d in range(2, int(self.p ** 0.5) + 1)):
            raise ConfigError(f"GrokkingConfig.p must be a prime >= 3 (the Fourier algorithm needs Z_p), got {self.p}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ConfigError(f"GrokkingConfig.train_fraction must be in (0, 1), got {self.train_fraction}")


def quick_config(**changes: Any) -> GrokkingConfig:
    """The test variant: p = 53 with half the pairs for training (groks in ~2k steps)."""
    return GrokkingConfig(**{"p": 53, "train_fraction": 0.5, "steps": 2000, **changes})


# ------------------------------------------------------------------------------ data


def all_pairs(p: int) -> tuple[Tensor, Tensor]:
    """Every input ``[p*p, 3]`` (``a b =``) in (a, b) row-major order, and its label ``[p*p]``."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def split(cfg: GrokkingConfig) -> tuple[Tensor, Tensor]:
    """Indices into :func:`all_pairs` of the training and test pairs (seeded permutation)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(cfg.p * cfg.p, generator=gen)
    n_train = int(round(cfg.train_fraction * cfg.p * cfg.p))
    return perm[:n_train], perm[n_train:]


# ------------------------------------------------------------------------------ model


class Attention(nn.Module):
    """Causal multi-head attention without biases, computed for the last query only."""

    def __init__(self, cfg: GrokkingConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        inner = cfg.n_heads * cfg.d_head
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.pattern = nn.Identity()  # [batch, n_heads, 1, pos]: a site for the patterns

    def forward(self, x: Tensor) -> Tensor:  # [batch, pos, d_model] -> [batch, d_model] (last query)
        b, t, _ = x.shape
        heads = lambda y: y.view(b, -1, self.n_heads, self.d_head).transpose(1, 2)  # noqa: E731
        q = heads(self.q(x[:, -1:]))  # [batch, n_heads, 1, d_head]
        k, v = heads(self.k(x)), heads(self.v(x))  # [batch, n_heads, pos, d_head]
        # the last query sees every position, so the causal mask removes nothing here.
        # Products as broadcast sums: a batched matmul of 1x32 by 32x3 matrices is slower.
        scores = (q * k).sum(-1, keepdim=True).transpose(-1, -2) / math.sqrt(self.d_head)  # [batch, n_heads, 1, pos]
        pattern = self.pattern(scores.softmax(-1))
        z = (pattern.transpose(-1, -2) * v).sum(-2)  # [batch, n_heads, d_head]
        z = z.reshape(b, self.n_heads * self.d_head)  # [batch, n_heads*d_head]
        return self.o(z)


class MLP(nn.Module):
    def __init__(self, cfg: GrokkingConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: GrokkingConfig) -> None:
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:  # [batch, pos, d_model] -> [batch, d_model] at the last position
        h = x[:, -1] + self.attn(x)
        return h + self.mlp(h)


class ModularAdditionTransformer(nn.Module):
    """``input_ids [batch, 3] -> logits [batch, p]`` for the last position."""

    def __init__(self, cfg: GrokkingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.p + 1, cfg.d_model)
        self.pos_embed = nn.Embedding(3, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg)])
        self.unembed = nn.Linear(cfg.d_model, cfg.p, bias=False)
        self._init_like_paper()

    def _init_like_paper(self) -> None:
        """N(0, 1/d_model) for every matrix (1/p for the unembedding), zero biases."""
        std = 1 / math.sqrt(self.cfg.d_model)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=1 / math.sqrt(self.cfg.p) if name.startswith("unembed") else std)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] != 3:
            raise ValueError(f"expected input_ids [batch, 3] (a, b, =), got {list(input_ids.shape)}")
        if int(input_ids.max()) > self.cfg.p or int(input_ids.min()) < 0:
            raise ValueError(f"tokens must be residues 0..{self.cfg.p - 1} or '=' ({self.cfg.p})")
        x = self.embed(input_ids) + self.pos_embed.weight  # [batch, 3, d_model]
        return self.unembed(self.blocks[0](x))  # [batch, p]


# ------------------------------------------------------------------------------ training


def training_logits(model: ModularAdditionTransformer, input_ids: Tensor) -> Tensor:  # [batch, p]
    """``model(input_ids)`` computed from per-token tables: the same function, fewer FLOPs.

    Training is bound by matrix products (a full-batch step is ~6 GFLOP), and a third of
    them are the keys and values of positions 0 and 1, which depend on one token each:
    ``k(E[a] + P_0)`` takes only p values, so it is computed once per step for the p
    tokens and gathered. The query and everything at position 2 see the constant ``=``
    token, so they are single rows. Hooks are not run (training needs none); the result
    equals ``model(input_ids)`` up to float rounding (tested).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] != 3 or bool((input_ids[:, 2] != model.cfg.p).any()):
        raise ValueError(f"training_logits expects rows (a, b, =) with = token {model.cfg.p}; use model(...) otherwise")
    attn, mlp, cfg = model.blocks[0].attn, model.blocks[0].mlp, model.cfg
    pos = model.pos_embed.weight  # [3, d_model]
    residues = model.embed.weight[:cfg.p]  # [p, d_model]
    eq = model.embed.weight[cfg.p] + pos[2]  # [d_model]: the last position's input, the same for every row
    x01 = torch.stack([residues + pos[0], residues + pos[1]])  # [2, p, d_model]
    k01, v01 = attn.k(x01), attn.v(x01)  # [2, p, inner]
    k2, v2, q = attn.k(eq), attn.v(eq), attn.q(eq)  # [inner]
    a, b = input_ids[:, 0], input_ids[:, 1]
    heads = lambda y: y.view(*y.shape[:-1], cfg.n_heads, cfg.d_head)  # noqa: E731  [..., n_heads, d_head]
    k = torch.stack([heads(k01[0])[a], heads(k01[1])[b], heads(k2).expand(len(a), -1, -1)], dim=2)  # [batch, n_heads, 3, d_head]
    v = torch.stack([heads(v01[0])[a], heads(v01[1])[b], heads(v2).expand(len(a), -1, -1)], dim=2)
    scores = (k * heads(q)[:, None]).sum(-1) / math.sqrt(cfg.d_head)  # [batch, n_heads, 3]
    z = (scores.softmax(-1)[..., None] * v).sum(-2)  # [batch, n_heads, d_head]
    h = eq + attn.o(z.reshape(len(a), -1))  # [batch, d_model]
    return model.unembed(h + mlp(h))


def loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, float]:
    """Cross-entropy in float64 (losses reach 1e-7, below float32's resolution of log-softmax)."""
    loss = F.cross_entropy(logits.double(), labels)
    return loss, float((logits.argmax(-1) == labels).double().mean())


def initial_model(cfg: GrokkingConfig) -> ModularAdditionTransformer:
    """The model :func:`train_grokking` starts from (same seed), untrained; the global random
    state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ModularAdditionTransformer(cfg).eval()


def train_grokking(cfg: GrokkingConfig, log: Callable[[str], None] | None = None, log_every: int = 500,
                   stop_at_accuracy: float | None = None) -> tuple[ModularAdditionTransformer, dict[str, Any]]:
    """Train by the recipe; returns the model and its history.

    The history holds, every ``snapshot_every`` steps, the train/test loss and accuracy
    and a copy of the weights (``snapshots``, for the progress measures, which need the
    final model's key frequencies), plus the step and time at which the test accuracy
    first reached 0.999. ``stop_at_accuracy`` ends the run at the first snapshot whose test
    accuracy reaches it (timing benchmarks); the recipe itself runs all ``steps``.
    """
    torch.manual_seed(cfg.seed)
    model = ModularAdditionTransformer(cfg)  # the weights of initial_model(cfg)
    tokens, labels = all_pairs(cfg.p)
    tr, te = split(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / cfg.warmup_steps, 1.0))
    hist: dict[str, Any] = {"step": [], "train_loss": [], "test_loss": [], "train_acc": [], "test_acc": [],
                            "snapshots": [], "grokked_step": None, "grokked_seconds": None}
    start = time.perf_counter()
    for step in range(cfg.steps + 1):
        logits = training_logits(model, tokens[tr])
        loss, train_acc = loss_and_accuracy(logits, labels[tr])
        if step % cfg.snapshot_every == 0 or step == cfg.steps:
            with torch.no_grad():
                test_loss, test_acc = loss_and_accuracy(model(tokens[te]), labels[te])
            for key, v in (("step", step), ("train_loss", float(loss.detach())), ("test_loss", float(test_loss)),
                           ("train_acc", train_acc), ("test_acc", test_acc)):
                hist[key].append(v)
            hist["snapshots"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if hist["grokked_step"] is None and test_acc >= 0.999:
                hist["grokked_step"], hist["grokked_seconds"] = step, time.perf_counter() - start
            if log and step % log_every == 0:
                log(f"grokking p={cfg.p} step {step}: train loss {float(loss.detach()):.3g}, test loss "
                    f"{float(test_loss):.3g}, test acc {test_acc:.4f} ({time.perf_counter() - start:.0f}s)")
        if step == cfg.steps or (stop_at_accuracy is not None and hist["test_acc"]
                                 and hist["step"][-1] == step and hist["test_acc"][-1] >= stop_at_accuracy):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    hist["seconds"] = time.perf_counter() - start
    hist["steps_per_second"] = step / max(hist["seconds"], 1e-9)
    return model.eval(), hist


def evaluate(model: ModularAdditionTransformer) -> dict[str, float]:
    """Train and test loss / accuracy of a model on its config's split."""
    tokens, labels = all_pairs(model.cfg.p)
    tr, te = split(model.cfg)
    out = {}
    with torch.no_grad():
        for name, idx in (("train", tr), ("test", te)):
            loss, acc = loss_and_accuracy(model(tokens[idx]), labels[idx])
            out[f"{name}_loss"], out[f"{name}_acc"] = float(loss), acc
    return out


def save(path: str | Path, model: ModularAdditionTransformer) -> None:
    save_module(path, model, model.cfg)


def load(path: str | Path = CHECKPOINT) -> ModularAdditionTransformer:
    """Load a checkpoint (default: the shipped p = 113 model), rebuilding it from its config."""
    _, meta = load_tensors(path)
    model = ModularAdditionTransformer(GrokkingConfig.from_dict(meta["config"]))
    load_module_state(path, model)
    return model.eval()
