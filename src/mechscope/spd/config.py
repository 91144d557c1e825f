"""The frozen configuration of one SPD run (also the source of ``mechscope spd train``'s options).

Defaults are the paper's TMS 5-2 settings (``spd.md``): C = 20 per matrix, scalar MLP
importance functions of width 16, importance coefficient 3e-3 with p = 1, stochastic and
layerwise reconstruction at coefficient 1, batch 4096, 10k steps, AdamW lr 1e-3 cosine.
Faithfulness is the delta component with a 200-step faithfulness-only warm-up, as in the
reference code (``faithfulness="loss"`` uses the paper's ‖W − UV‖² term instead).
"""

from __future__ import annotations

from typing import Literal, Optional

from mechscope.core.config import Config, ConfigError, config, param


@config
class SPDConfig(Config):
    """Options of one stochastic parameter decomposition."""

    sites: tuple[str, ...] = param((), help="module paths of the layers to decompose (linear, Conv1D, embedding or identity)")
    C: int = param(20, ge=1, help="subcomponents per decomposed matrix")
    C_per_site: dict[str, int] = param(default_factory=dict, cli=False,
                                       help="per-site C overriding C, {path: C}")
    tied: tuple[str, ...] = param((), metavar="DST=SRC[,...]",
                                  help="tie DST's subcomponents to SRC's transpose (U_dst = V_srcᵀ, V_dst = U_srcᵀ)")
    ci_fn: Literal["mlp", "vector_mlp"] = param("mlp", help="causal-importance function: scalar MLP per subcomponent, "
                                                           "or an MLP on the whole layer input")
    ci_hidden: tuple[int, ...] = param((16,), help="hidden widths of the importance MLPs")
    leak: float = param(0.01, ge=0, help="slope of the leaky parts of the hard sigmoids")
    mask: Literal["continuous", "binomial"] = param("continuous", help="stochastic source r of the masks")
    faithfulness: Literal["delta", "loss"] = param(
        "delta", help="delta: add W - UV under its own random mask; loss: penalise ‖W - UV‖² / n_params")
    faithfulness_coeff: float = param(1.0, ge=0, help="coefficient of the faithfulness loss (faithfulness=loss)")
    warmup_steps: int = param(200, ge=0, help="faithfulness-only warm-up steps before training")
    warmup_lr: float = param(0.01, gt=0, help="learning rate of the warm-up")
    warmup_weight_decay: float = param(0.1, ge=0, help="AdamW weight decay of the warm-up")
    stochastic_coeff: float = param(1.0, ge=0, help="coefficient of the stochastic reconstruction loss")
    layerwise_coeff: float = param(1.0, ge=0, help="coefficient of the layerwise stochastic reconstruction loss")
    importance_coeff: float = param(3e-3, ge=0, help="coefficient of the importance-minimality loss")
    p: float = param(1.0, gt=0, help="exponent p of the importance-minimality loss (start value when annealed)")
    p_final: Optional[float] = param(None, gt=0, help="anneal p linearly to this value (none: keep p)")
    p_anneal_start: float = param(0.0, help="fraction of training where p starts to anneal")
    p_anneal_end: float = param(1.0, help="fraction of training where p reaches p_final")
    recon: Literal["mse", "kl"] = param("mse", help="reconstruction distance: mse (toy models) or kl (language models)")
    lr: float = param(1e-3, gt=0, help="AdamW learning rate (weight decay 0)")
    lr_schedule: Literal["cosine", "constant"] = param("cosine", help="learning-rate schedule")
    lr_warmup: float = param(0.0, help="fraction of steps of linear learning-rate warm-up")
    steps: int = param(10_000, ge=0, help="optimiser steps")
    batch_size: int = param(4096, ge=1, help="examples per step (per process under torchrun)")
    seed: int = param(0, ge=0, lt=2**63, help="seed of the initialisation, the data and the masks")
    dtype: Literal["float32", "bfloat16"] = param(
        "float32", help="precision of the step's matrix multiplies: float32, or bfloat16 autocast (the reference "
                        "implementation's default; on CPUs with AVX-512 BF16 or AMX, or a CUDA device with bf16); "
                        "parameters, optimiser, importance functions and losses stay float32")
    batched_passes: bool = param(True, help="run the stochastic and layerwise forwards as one batched forward "
                                            "that reuses the target's inner activations")
    log_every: int = param(100, ge=1, help="steps between progress lines and history records")
    checkpoint_every: int = param(1000, ge=0, help="steps between resumable checkpoints (0: only at the end)")

    def validate(self) -> None:
        bad = {k: v for k, v in self.C_per_site.items() if v < 1}
        if bad:
            raise ConfigError(f"SPDConfig.C_per_site values must be >= 1, got {bad}")
        for pair in self.tied:
            if pair.count("=") != 1 or not all(pair.split("=")):
                raise ConfigError(f"SPDConfig.tied entries are 'DST=SRC' (e.g. 'decoder=encoder'), got {pair!r}")
        if not 0.0 <= self.p_anneal_start <= self.p_anneal_end <= 1.0:
            raise ConfigError("SPDConfig needs 0 <= p_anneal_start <= p_anneal_end <= 1, got "
                              f"{self.p_anneal_start} and {self.p_anneal_end}")
        if not 0.0 <= self.lr_warmup < 1.0:
            raise ConfigError(f"SPDConfig.lr_warmup is a fraction of the steps in [0, 1), got {self.lr_warmup}")
        if any(h < 1 for h in self.ci_hidden) or not self.ci_hidden:
            raise ConfigError(f"SPDConfig.ci_hidden needs at least one width >= 1, got {self.ci_hidden}")

    def C_of(self, path: str) -> int:
        return self.C_per_site.get(path, self.C)

    def tied_pairs(self) -> dict[str, str]:
        """``{dst: src}`` from the ``tied`` entries."""
        return dict(pair.split("=") for pair in self.tied)  # type: ignore[misc]
