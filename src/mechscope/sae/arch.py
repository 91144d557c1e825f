"""Sparse dictionaries: sparse autoencoders and transcoders, one module for every architecture.

Notation (spec §1), with ``x`` the input ``[..., d_in]`` and ``y`` the target ``[..., d_out]``:

- pre-activations ``h = (x - b_pre) W_enc + b_enc`` where ``b_pre = b_dec`` for an
  autoencoder (the decoder bias is subtracted before the encoder) and ``0`` for a
  transcoder (its input and output live in different spaces);
- latents ``f = σ(h)``, ``σ`` set by the architecture;
- reconstruction ``ŷ = f W_dec + b_dec`` (``+ x W_skipᵀ`` for a skip transcoder).

| arch          | σ at inference                 | trained with (see objectives.py)            |
|---------------|--------------------------------|---------------------------------------------|
| ``relu``      | ``ReLU(h)``                    | MSE + λ Σ fᵢ‖W_dec,i‖ (Anthropic, April 2024) |
| ``topk``      | ``ReLU(TopK_k(h))``            | FVU + AuxK (Gao et al. 2024)                |
| ``batchtopk`` | ``ReLU(h)·1[h > θ]``, global θ | top B·k of the batch, θ estimated (EMA)     |
| ``matryoshka``| as batchtopk                   | batchtopk on nested prefixes                |
| ``jumprelu``  | ``ReLU(h)·1[h > θᵢ]``          | MSE + λ·L0 with a straight-through θ        |

Weights keep SAELens' shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``,
``W_skip [d_out, d_in]``. A trained dictionary is stored in the units of the raw
activations: the trainer's input normalisation is folded into the weights
(:func:`fold_scale`), which keeps every latent activation (and so every threshold) the
same. ``batchtopk`` and ``matryoshka`` dictionaries are saved as ``jumprelu`` with one
global threshold (:func:`to_jumprelu`), so one inference class covers them all.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from mechscope.core.config import Config, ConfigError, config, param

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
KINDS = ("sae", "transcoder", "skip_transcoder")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


class SAEError(ValueError):
    """A dictionary used with inputs or settings it cannot take."""


@config
class SAEConfig(Config):
    """Shape and architecture of a sparse dictionary (not how it is trained: see TrainConfig)."""

    d_in: int = param(ge=1, help="width of the input activation")
    d_sae: int = param(ge=1, help="number of latents (dictionary size)")
    arch: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = param(
        "topk", help="activation and objective: relu (L1), topk, batchtopk, jumprelu, matryoshka (batchtopk)")
    kind: Literal["sae", "transcoder", "skip_transcoder"] = param(
        "sae", help="sae: reconstruct the input; transcoder: predict another site (MLP in -> MLP out); "
                    "skip_transcoder: a transcoder plus a linear skip W_skip x")
    d_out: Optional[int] = param(None, ge=1, help="width of the target of a transcoder (default: d_in)")
    k: int = param(32, ge=1, help="active latents per token: exact for topk, the batch average for batchtopk and "
                            "matryoshka, the L0 target of jumprelu's default penalty")
    matryoshka_widths: tuple[int, ...] = param(
        (), help="nested prefix sizes m1 < ... < d_sae of matryoshka; empty: d_sae/16, /8, /4, /2 and d_sae")
    threshold_init: float = param(0.001, ge=0, help="JumpReLU initial threshold θ0 (paper: 0.001 for E|x|²=1 inputs)")
    bandwidth: float = param(0.001, gt=0, help="JumpReLU straight-through kernel width ε (paper: 0.001)")

    def validate(self) -> None:
        if self.d_out is not None and self.kind == "sae" and self.d_out != self.d_in:
            raise ConfigError(f"SAEConfig.d_out={self.d_out} differs from d_in={self.d_in}, but an autoencoder "
                              "reconstructs its input; use kind='transcoder' to predict another site")
        if self.arch in TOPK_FAMILY and self.k > self.d_sae:
            raise ConfigError(f"SAEConfig.k={self.k} exceeds d_sae={self.d_sae}; k latents must fit in the dictionary")
        if self.matryoshka_widths:
            if self.arch != "matryoshka":
                raise ConfigError("SAEConfig.matryoshka_widths is only used by arch='matryoshka'")
            w = list(self.matryoshka_widths)
            if any(b <= a for a, b in zip(w, w[1:])) or w[0] < 1 or w[-1] > self.d_sae:
                raise ConfigError(f"SAEConfig.matryoshka_widths must increase strictly within [1, d_sae={self.d_sae}], "
                                  f"got {self.matryoshka_widths}")

    @property
    def out_width(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def subtracts_b_dec(self) -> bool:
        """An autoencoder subtracts b_dec from its input; a transcoder's b_dec lives in the output space."""
        return self.kind == "sae"

    def widths(self) -> list[int]:
        """Nested prefix sizes of a matryoshka dictionary, ending at d_sae."""
        if self.matryoshka_widths:
            w = list(self.matryoshka_widths)
            return w if w[-1] == self.d_sae else w + [self.d_sae]
        w = [max(1, self.d_sae // 2 ** i) for i in (4, 3, 2, 1)] + [self.d_sae]
        return sorted(set(w))


class SAE(nn.Module):
    """A sparse autoencoder or transcoder at inference: ``encode``, ``decode``, ``forward``.

    ``forward(x)`` is the reconstruction ``ŷ`` (for a transcoder, its prediction of the
    target). ``threshold`` is a ``[d_sae]`` fp32 parameter for jumprelu and a scalar fp64
    buffer (the running global estimate) for batchtopk and matryoshka.
    """

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE needs an SAEConfig, got {type(cfg).__name__}; e.g. SAE(SAEConfig(d_in=64, d_sae=512))")
        self.cfg = cfg
        m, d_in, d_out = cfg.d_sae, cfg.d_in, cfg.out_width
        self.W_enc = nn.Parameter(torch.empty(d_in, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.kind == "skip_transcoder":
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))
        if cfg.arch == "jumprelu":
            # θ is a parameter in its own right, in fp32 (never log θ, never bf16: spec §1.4 traps 1-2)
            self.threshold = nn.Parameter(torch.full((m,), cfg.threshold_init, dtype=torch.float32))
        elif cfg.arch in ("batchtopk", "matryoshka"):
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init_weights(self, gen)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.out_width

    def check_input(self, x: Tensor, width: int | None = None, what: str = "input") -> None:
        width = self.d_in if width is None else width
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != width:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SAEError(f"{type(self).__name__} ({self.cfg.arch}, {self.cfg.kind}) expects a {what} of shape "
                           f"[..., {width}], got {shape}; pick the site the dictionary was trained on")

    def pre_acts(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        self.check_input(x)
        xc = x - self.b_dec if self.cfg.subtracts_b_dec else x
        return xc @ self.W_enc + self.b_enc

    def activate(self, h: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_sae]
        """The inference nonlinearity σ of the architecture (see the module table)."""
        arch = self.cfg.arch
        if arch == "relu":
            return h.relu()
        if arch == "topk":
            vals, idx = h.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(h).scatter(-1, idx, vals.relu())
        return h.relu() * (h > self.threshold.to(h.dtype))

    def encode(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:  # [..., d_sae] -> [..., d_out]
        """``f W_dec + b_dec``; a skip transcoder also needs its input ``x`` for ``x W_skipᵀ``."""
        self.check_input(f, self.d_sae, "latent tensor")
        out = f @ self.W_dec + self.b_dec
        if self.cfg.kind == "skip_transcoder":
            if x is None:
                raise SAEError("a skip transcoder's decode needs its input x as well (decode(f, x)), "
                               "for the skip term x W_skip^T")
            out = out + x @ self.W_skip.T
        return out

    def forward(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_out]
        return self.decode(self.encode(x), x)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.arch in TOPK_FAMILY else ""
        return f"arch={c.arch}, kind={c.kind}, d_in={c.d_in}, d_sae={c.d_sae}, d_out={c.out_width}{k}"


# -- initialisation ----------------------------------------------------------------------
@torch.no_grad()
def init_weights(sae: SAE, gen: torch.Generator | None = None) -> None:
    """Data-free initialisation (spec §1-2); the trainer then sets the data-dependent biases.

    Autoencoders: decoder rows in random directions, unit norm (TopK family, JumpReLU) or
    norm 0.1 (ReLU, April update), and a tied encoder ``W_enc = W_decᵀ``. Transcoders
    (sparsify): random unit encoder columns and a zero decoder and skip, so the first
    prediction is the bias ``b_dec``.
    """
    cfg = sae.cfg
    rows = torch.randn(cfg.d_sae, max(cfg.d_in, cfg.out_width), generator=gen)
    if cfg.kind == "sae":
        w = rows[:, :cfg.d_in]
        w = w / w.norm(dim=1, keepdim=True)
        w = w * (0.1 if cfg.arch == "relu" else 1.0)  # [d_sae, d_in]
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
    else:
        w = rows[:, :cfg.d_in]
        sae.W_enc.copy_((w / w.norm(dim=1, keepdim=True)).T)
        sae.W_dec.zero_()
    sae.b_enc.zero_()
    sae.b_dec.zero_()


# -- output-preserving transformations ---------------------------------------------------
@torch.no_grad()
def fold_scale(sae: SAE, in_scale: float, out_scale: float | None = None) -> SAE:
    """A copy of ``sae`` that takes raw inputs, given that it was trained on ``x·in_scale``
    (and targets ``y·out_scale``): ``fold_scale(sae, s)(x) == sae(x·s) / s``.

    ``W_enc·s_in`` with ``b_dec/s_out`` keeps every pre-activation (so latents and
    thresholds are unchanged: no θ rescaling, SAELens #763); ``W_dec``, ``b_dec`` and
    ``W_skip`` absorb the output scale.
    """
    s_in = float(in_scale)
    s_out = float(in_scale if out_scale is None else out_scale)
    if not all(math.isfinite(v) and v > 0 for v in (s_in, s_out)):
        raise SAEError(f"scales must be finite and positive, got in_scale={in_scale}, out_scale={out_scale}")
    if sae.cfg.kind == "sae" and s_in != s_out:
        raise SAEError("an autoencoder's input and target share one scale; give in_scale only")
    out = copy.deepcopy(sae)
    out.W_enc.mul_(s_in)
    out.W_dec.div_(s_out)
    out.b_dec.div_(s_out)
    if sae.cfg.kind == "skip_transcoder":
        out.W_skip.mul_(s_in / s_out)
    return out


@torch.no_grad()
def fold_decoder_norm(sae: SAE) -> SAE:
    """A copy with unit-norm decoder rows and the norms moved into the encoder.

    ``f_i`` scales by ``n_i = ‖W_dec,i‖`` and ``W_dec,i`` by ``1/n_i``, so outputs are kept
    for ReLU and JumpReLU (whose θᵢ scales by ``n_i`` too). TopK selects the k largest
    ``h_i``; rescaling them would change which latents win, so it is refused unless the
    norms are already equal.
    """
    norms = sae.W_dec.norm(dim=1)  # [d_sae]
    if sae.cfg.arch == "topk" and not torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4):
        raise SAEError("folding unequal decoder norms into a topk SAE changes which latents are selected; "
                       "train it with unit-norm decoder rows instead")
    if sae.cfg.arch in ("batchtopk", "matryoshka"):
        raise SAEError("a batchtopk/matryoshka SAE has one global threshold, which per-latent norms would split; "
                       "convert it with to_jumprelu(sae) first")
    if bool((norms == 0).any()):
        raise SAEError(f"{int((norms == 0).sum())} decoder rows are zero; their norm cannot be folded")
    out = copy.deepcopy(sae)
    out.W_dec.div_(norms[:, None])
    out.W_enc.mul_(norms[None, :])
    out.b_enc.mul_(norms)
    if sae.cfg.arch == "jumprelu":
        out.threshold.mul_(norms)
    return out


@torch.no_grad()
def to_jumprelu(sae: SAE) -> SAE:
    """BatchTopK / Matryoshka at inference: a JumpReLU with its global θ on every latent.

    Any other architecture is returned unchanged (a copy).
    """
    if sae.cfg.arch not in ("batchtopk", "matryoshka"):
        return copy.deepcopy(sae)
    cfg = sae.cfg.replace(arch="jumprelu", matryoshka_widths=())
    out = SAE(cfg)
    state = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    state["threshold"] = torch.full((cfg.d_sae,), float(sae.threshold), dtype=torch.float32)
    out.load_state_dict(state)
    return out.train(sae.training)
