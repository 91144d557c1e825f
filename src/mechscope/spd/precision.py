"""The precision of an SPD step: float32, or bfloat16 autocast of its matrix multiplies.

``SPDConfig.dtype = "bfloat16"`` runs the step's forward (the target pass, the inner
activations, the masked passes) under ``torch.autocast(dtype=torch.bfloat16)``, as the
reference implementation does by default: the matrix multiplies take bf16 inputs and
accumulate in float32, everything else stays float32 — the parameters, their gradients
and the optimiser, the importance functions (elementwise work on the inner activations,
computed in float32 from them), the masks and the losses. The backward follows the
forward's casts (autograd), so it multiplies in bf16 too.

On CPU this needs hardware bf16 dot products (AVX-512 BF16 or AMX): without them PyTorch
emulates bf16 and the step gets slower, not faster, so :func:`step_precision` refuses
with an error saying so (CUDA: ``torch.cuda.is_bf16_supported()``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from mechscope.spd.components import SPDError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    return False


def check_dtype(dtype: str, device: torch.device | str = "cpu") -> None:
    """An error (saying how to fix it) where ``dtype`` cannot run fast on ``device``."""
    if dtype not in DTYPES:
        raise SPDError(f"unknown SPD dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and not bf16_supported(device):
        what = ("this CPU has neither AVX-512 BF16 nor AMX, so bf16 matrix multiplies would be emulated (slower "
                "than float32)" if torch.device(device).type == "cpu" else f"device {device} has no bf16 support")
        raise SPDError(f"SPD dtype bfloat16 needs hardware bf16: {what}; use dtype float32 (--dtype float32)")


def step_precision(dtype: str, device: torch.device | str = "cpu") -> AbstractContextManager:
    """The context an SPD step's forward runs in: nothing for float32, bf16 autocast otherwise."""
    check_dtype(dtype, device)
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def full_precision(device_type: str = "cpu") -> AbstractContextManager:
    """Autocast off (inside a bf16 step: the parts that stay float32)."""
    return torch.autocast(device_type=device_type, enabled=False)
