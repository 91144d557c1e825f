"""Collating token sequences into padded batches with attention masks.

Base and source batches are collated separately (each padded to its own longest
sequence); sites then resolve positions per example against each batch's own attention
mask, so "the last token" is the last real token under left or right padding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def collate(
    sequences: Sequence[Sequence[int] | Tensor],
    pad_id: int = 0,
    side: str = "right",
    max_len: int | None = None,
    position_ids: bool = True,
) -> dict[str, Tensor]:
    """Pad token sequences into ``input_ids`` / ``attention_mask`` (and ``position_ids``).

    ``position_ids`` count real tokens from 0 in every row (0 on padding), so a model
    that takes them computes the same thing for an example under either padding side.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if len(sequences) == 0:
        raise ValueError("cannot collate an empty list of sequences; the dataset or batch is empty")
    rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    empty = [i for i, r in enumerate(rows) if r.numel() == 0]
    if empty:
        raise ValueError(f"sequences {empty[:5]} are empty; every example needs at least one token")
    longest = max(r.numel() for r in rows)
    width = longest if max_len is None else max_len
    if width < longest:
        raise ValueError(f"a sequence has {longest} tokens, more than max_len={max_len}; truncate the inputs or raise max_len")
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - r.numel(), width) if side == "left" else slice(0, r.numel())
        ids[i, sl] = r
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0) * mask
    return out


def real_tokens(batch: dict[str, Tensor]) -> Tensor:  # [batch, pos] bool
    """Which positions of a collated batch hold real tokens."""
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)
