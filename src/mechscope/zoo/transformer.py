"""A small, readable GPT-style transformer: the built-in worlds' model.

Module paths are plain and stable so sites read naturally: ``embed``, ``pos_embed``,
``blocks.{l}`` (``ln1``, ``attn`` with ``q k v o`` and ``pattern``, ``ln2``, ``mlp``
with ``fc_in act fc_out``), ``ln_final``, ``unembed``. ``attn.pattern`` is an identity
module applied to the attention probabilities ``[batch, n_heads, q_pos, k_pos]`` so that
patterns can be cached and patched like any other site; the input of ``attn.o`` is the
concatenated head outputs ``[batch, pos, n_heads * d_head]``. ``Block.forward_from`` runs a
block on the last positions only, given the earlier positions' keys and values (a KV
cache): what patching replays use to recompute only what a patch can change.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from mechscope.core.config import Config, config, param


@config
class TransformerConfig(Config):
    """Shape of a built-in transformer; the bounds are declared on the fields (checked when built)."""

    vocab: int = param(64, ge=1, help="vocabulary size")
    n_ctx: int = param(64, ge=1, help="positions")
    d_model: int = param(64, ge=1, help="residual width")
    n_layers: int = param(2, ge=1, help="blocks")
    n_heads: int = param(4, ge=1, help="attention heads per block")
    d_head: int = param(16, ge=1, help="width of each head")
    d_mlp: Optional[int] = param(256, ge=1, help="MLP width (None: attention-only)")
    layer_norm: bool = param(True, help="LayerNorm before each sublayer and at the end")
    act: Literal["gelu", "relu"] = param("gelu", help="MLP activation")


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

    def forward_from(self, x: Tensor, past: tuple[Tensor, Tensor], key_mask: Tensor | None = None,
                     queries: Tensor | None = None) -> Tensor:
        """``forward`` at the last positions of sequences whose earlier keys and values are known.

        ``x`` [c*batch, n, d_model] is the input at positions s .. s+n-1 of ``c`` copies of
        a batch, ``past`` the outputs of ``k`` and ``v`` at positions 0 .. s-1 of that batch
        (each [batch, s, n_heads*d_head], as a cache of those sites holds them; shared by
        the copies, row i of copy j is row j*batch + i of ``x``), ``key_mask`` [c*batch, s+n]
        as in ``forward``, ``queries`` the (non-negative) indices into the n positions whose
        outputs are wanted (all when None). Returns [c*batch, n_queries, d_model]: what
        ``forward`` gives at those positions (a causal model's earlier positions do not
        depend on later ones: a KV cache).
        """
        cb, n, _ = x.shape
        b, s, inner = past[0].shape
        t, h, dh = s + n, self.n_heads, self.d_head
        if cb % b:
            raise ValueError(f"forward_from: x has {cb} rows, not a multiple of the {b} rows of the past keys/values")
        if queries is not None and 2 * len(queries) <= n:  # few queries: cheaper not to project every key
            return self._few_queries(x, past, key_mask, queries)

        def heads(old: Tensor, new: Tensor) -> Tensor:  # [c*batch, n_heads, s+n, d_head], contiguous
            old = old.view(1, b, s, h, dh).transpose(2, 3).expand(cb // b, b, h, s, dh)  # the same for every copy
            return torch.cat([old, new.view(cb // b, b, n, h, dh).transpose(2, 3)], 3).view(cb, h, t, dh)
        k, v = heads(past[0], self.k(x)), heads(past[1], self.v(x))
        xq = x if queries is None else x[:, queries]
        n_q = xq.shape[1]
        q = self.q(xq).view(cb, n_q, h, dh).transpose(1, 2)  # [c*batch, n_heads, n_q, d_head]
        # additive mask [n_q, s+n]: query i (position s+i) sees keys <= s+i, as forward's tril
        bias = torch.full((n, t), float("-inf"), dtype=x.dtype, device=x.device).triu_(s + 1)
        bias = bias if queries is None else bias[queries]
        if key_mask is not None:  # as forward: padding keys masked, a query always sees itself
            q_pos = torch.arange(s, t, device=x.device) if queries is None else s + queries.to(x.device)
            own = torch.arange(t, device=x.device)[None, :] == q_pos[:, None]  # [n_q, s+n]
            pad = ~key_mask[:, None, None, :].bool() & ~own  # [c*batch, 1, n_q, s+n]
            bias = bias.masked_fill(pad, float("-inf"))
        # a query always sees itself, so no row is all -inf; softmax equals forward's masked_fill
        scores = (q @ k.transpose(-1, -2)).div_(math.sqrt(dh)).add_(bias)  # [c*batch, n_heads, n_q, s+n]
        pattern = self.pattern(scores.softmax(-1))
        z = (pattern @ v).transpose(1, 2).reshape(cb, n_q, h * dh)  # [c*batch, n_q, n_heads*d_head]
        return self.o(z)

    def _few_queries(self, x: Tensor, past: tuple[Tensor, Tensor], key_mask: Tensor | None, queries: Tensor) -> Tensor:
        """``forward_from`` for a few queries, without the keys and values of the n new
        positions: q·k_j = (W_k,hᵀ q)·x_j + q·b_k,h and Σ_j p_j v_j = W_v,h (Σ_j p_j x_j) + b_v,h
        (the pattern sums to 1 with the past's share taken out), so each new position costs
        2·n_heads·d_model multiplies instead of two projections of d_model·n_heads·d_head."""
        cb, n, d = x.shape
        b, s, inner = past[0].shape
        h, dh, c, n_q = self.n_heads, self.d_head, cb // b, len(queries)
        q = self.q(x[:, queries]).view(cb, n_q, h, dh).transpose(1, 2)  # [c*batch, n_heads, n_q, d_head]
        w_k, w_v = self.k.weight.view(h, dh, d), self.v.weight.view(h, dh, d)
        # the past, shared by the copies: fold the copies into the query dimension
        q_f = q.reshape(c, b, h, n_q, dh).permute(1, 2, 0, 3, 4).reshape(b, h, c * n_q, dh)
        k_p, v_p = (y.view(b, s, h, dh).transpose(1, 2) for y in past)  # [batch, n_heads, s, d_head]
        old = (q_f @ k_p.transpose(-1, -2)).view(b, h, c, n_q, s).permute(2, 0, 1, 3, 4).reshape(cb, h, n_q, s)
        q_k = torch.einsum("bhqe,hed->bhqd", q, w_k)  # [c*batch, n_heads, n_q, d_model]
        new = (q_k.flatten(1, 2) @ x.transpose(1, 2)).view(cb, h, n_q, n)  # [c*batch, n_heads, n_q, n]
        new = new + (q * self.k.bias.view(h, dh)[None, :, None]).sum(-1, keepdim=True)
        scores = torch.cat([old, new], -1).div_(math.sqrt(dh))  # [c*batch, n_heads, n_q, s+n]
        t = s + n
        bias = torch.full((n, t), float("-inf"), dtype=x.dtype, device=x.device).triu_(s + 1)[queries]
        if key_mask is not None:  # as forward: padding keys masked, a query always sees itself
            own = torch.arange(t, device=x.device)[None, :] == (s + queries.to(x.device))[:, None]  # [n_q, s+n]
            bias = bias.masked_fill(~key_mask[:, None, None, :].bool() & ~own, float("-inf"))
        pattern = self.pattern((scores + bias).softmax(-1))
        p_old, p_new = pattern[..., :s], pattern[..., s:]
        z_old = (p_old.reshape(c, b, h, n_q, s).permute(1, 2, 0, 3, 4).reshape(b, h, c * n_q, s) @ v_p)
        z_old = z_old.view(b, h, c, n_q, dh).permute(2, 0, 1, 3, 4).reshape(cb, h, n_q, dh)
        mixed = (p_new.flatten(1, 2) @ x).view(cb, h, n_q, d)  # Σ_j p_j x_j per head
        z_new = torch.einsum("bhqd,hed->bhqe", mixed, w_v) + p_new.sum(-1, keepdim=True) * self.v.bias.view(h, 1, dh)
        z = (z_old + z_new).transpose(1, 2).reshape(cb, n_q, h * dh)  # [c*batch, n_q, n_heads*d_head]
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

    def forward_from(self, x: Tensor, past: tuple[Tensor, Tensor], key_mask: Tensor | None = None,
                     queries: Tensor | None = None) -> Tensor:
        """``forward`` at positions s.. given the attention keys/values of positions < s
        (see :meth:`Attention.forward_from`); [batch, n_queries, d_model]."""
        h = self.attn.forward_from(self.ln1(x), past, key_mask, queries)
        x = (x if queries is None else x[:, queries]) + h
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
