"""A small, readable GPT-style transformer: the built-in worlds' model.

Module paths are plain and stable so sites read naturally: ``embed``, ``pos_embed``,
``blocks.{l}`` (``ln1``, ``attn`` with ``q k v o`` and ``pattern``, ``ln2``, ``mlp``
with ``fc_in act fc_out``), ``ln_final``, ``unembed``. ``attn.pattern`` is an identity
module applied to the attention probabilities ``[batch, n_heads, q_pos, k_pos]`` so that
patterns can be cached and patched like any other site; the input of ``attn.o`` is the
concatenated head outputs ``[batch, pos, n_heads * d_head]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TransformerConfig:
    vocab: int = 64
    n_ctx: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 16
    d_mlp: int | None = 256  # None: attention-only
    layer_norm: bool = True
    act: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab", "n_ctx", "d_model", "n_layers", "n_heads", "d_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.act not in ("gelu", "relu"):
            raise ValueError(f"TransformerConfig.act must be 'gelu' or 'relu', got {self.act!r}")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        inner = cfg.n_heads * cfg.d_head
        self.q = nn.Linear(cfg.d_model, inner)
        self.k = nn.Linear(cfg.d_model, inner)
        self.v = nn.Linear(cfg.d_model, inner)
        self.o = nn.Linear(inner, cfg.d_model)
        self.pattern = nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:  # [batch, pos, d_model]
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # [batch, n_heads, pos, d_head]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)  # [batch, n_heads, q_pos, k_pos]
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if key_mask is not None:  # padding keys are never attended to
            allowed = allowed & key_mask[:, None, None, :].bool()
            allowed = allowed | torch.eye(t, dtype=torch.bool, device=x.device)  # pad queries: no empty rows
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        pattern = self.pattern(scores.softmax(-1))
        z = (pattern @ v).transpose(1, 2).reshape(b, t, self.n_heads * self.d_head)  # [batch, pos, n_heads*d_head]
        return self.o(z)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = nn.GELU() if cfg.act == "gelu" else nn.ReLU()
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.ln1, self.attn = norm(), Attention(cfg)
        self.ln2 = norm() if cfg.d_mlp else None
        self.mlp = MLP(cfg) if cfg.d_mlp else None

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), key_mask)
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    """Decoder-only transformer taking ``input_ids`` and optional mask / position ids."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        b, t = input_ids.shape
        if t > self.cfg.n_ctx:
            raise ValueError(f"sequence of length {t} exceeds the model's context n_ctx={self.cfg.n_ctx}")
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids) + self.pos_embed(position_ids)  # [batch, pos, d_model]
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.unembed(self.ln_final(x))  # [batch, pos, vocab]
