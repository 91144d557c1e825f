"""Saving and loading dictionaries in mechscope's own format: one checksummed safetensors file.

``save_sae(path, sae)`` writes the state dict with the :class:`SAEConfig` and a fingerprint
(via :func:`mechscope.core.checkpoint.save_module`, atomic); ``load_sae(path)`` rebuilds
the SAE from the recorded config and verifies every tensor. ``extra`` metadata (the site,
the training history, the data it was trained on) travels along and comes back from
:func:`read_sae_metadata`. Weights may be stored at half precision (``dtype=torch.float16``)
where size matters (the shipped checkpoints); they load back as fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechscope.core.checkpoint import (CheckpointError, checkpoint_error, load_tensors, module_fingerprint,
                                       save_tensors)
from mechscope.sae.arch import SAE, SAEConfig

FORMAT = "mechscope.sae"
VERSION = 1


def save_sae(path: str | Path, sae: SAE, extra: dict[str, Any] | None = None,
             dtype: torch.dtype | None = None) -> None:
    """Write ``sae`` (and JSON-able ``extra`` metadata) to ``path`` atomically."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k != "threshold" else v)
             for k, v in sae.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "config": sae.cfg.to_dict(),
            "fingerprint": module_fingerprint(sae.state_dict()), "extra": extra or {}}
    save_tensors(path, state, meta)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mechscope SAE file (format {FORMAT!r}); an SAELens directory "
                              "loads with mechscope.sae.load_saelens")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: SAE file version {meta.get('version')}, this mechscope reads {VERSION}")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("extra", {}), dict):
        raise checkpoint_error(path, "corrupted metadata: its 'config' and 'extra' must be objects")
    return tensors, meta


def load_sae(path: str | Path) -> SAE:
    """Rebuild the SAE saved at ``path`` (fp32, eval mode)."""
    path = Path(path)
    tensors, meta = _read(path)
    cfg = SAEConfig.from_dict(meta["config"])
    want = {"W_enc": [cfg.d_in, cfg.d_sae], "W_dec": [cfg.d_sae, cfg.d_out or cfg.d_in]}
    found = {k: list(tensors[k].shape) if k in tensors else None for k in want}
    if found != want:  # checked before building: a damaged size must not allocate a huge dictionary
        raise checkpoint_error(path, f"damaged: its tensors do not fit the config it records (config {want}, "
                               f"file {found})")
    sae = SAE(cfg)
    expected = sae.state_dict()
    if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in expected):
        raise checkpoint_error(path, f"damaged: its tensors do not fit the config it records "
                               f"({sorted(tensors)} vs {sorted(expected)})")
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return sae.eval()


def read_sae_metadata(path: str | Path) -> dict[str, Any]:
    """The ``extra`` metadata saved with an SAE, plus its config under ``"config"``."""
    _, meta = _read(Path(path))
    return {**meta.get("extra", {}), "config": meta["config"]}
