"""Built-in architectures, by name: ``build("transformer")``, ``names()``.

Architectures only: each entry is randomly initialised, seeded, and needs no files. The
trained models of the built-in worlds (the steering toy, the instruction model, Othello,
...) are tasks: :func:`mechscope.tasks.registry.build_model` builds either by name.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mechscope.zoo.mlp import MLP
from mechscope.zoo.transformer import Transformer, TransformerConfig

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register(name: str, doc: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = (fn, doc)
        return fn

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    return _REGISTRY[name][1]


def build(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A built-in architecture in eval mode; unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown built-in model {name!r}; valid: {', '.join(names())}")
    torch.manual_seed(seed)
    return _REGISTRY[name][0](**kwargs).eval()


@register("mlp", "random MLP 16-16-16-16-2 with ReLU (hierarchical-equality shape)")
def _mlp(widths: tuple[int, ...] = (16, 16, 16, 16, 2)) -> nn.Module:
    return MLP(widths)


@register("transformer", "random 2-layer GPT-style transformer, d_model 64, 4 heads")
def _transformer(**cfg: Any) -> nn.Module:
    return Transformer(TransformerConfig(**cfg))


@register("gpt2_small_shape", "random 12-layer transformer shaped like GPT-2 small (d_model 768, 12 heads)")
def _gpt2_small(**cfg: Any) -> nn.Module:
    base = dict(vocab=50257, n_ctx=1024, d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072)
    return Transformer(TransformerConfig(**{**base, **cfg}))
