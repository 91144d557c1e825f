"""An activation store's ``manifest.json``: read it and check it before any shard is opened.

The manifest is the store's table of contents (its layout is in :mod:`mechscope.core.store`).
A reader trusts nothing in it: every field has its type checked, shard files must lie in
the store's own directory (no ``..``, absolute paths or links out), and the shards' input
batch ranges must follow each other without a gap from batch 0 to ``n_batches``, their
rows add up to ``n_rows``, and a complete store's directory holds no shard file the
manifest does not list, so a manifest edited to drop a shard (even consistently) is an
error, not a silently short store. Each problem is a :class:`CheckpointError` naming the
entry.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from mechscope.core.checkpoint import CheckpointError, MissingCheckpointError, load_json
from mechscope.core.paths import PathError, confined
from mechscope.core.site import Site, SiteError

FORMAT = "mechscope.store"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
RECREATE = "Delete the store directory and write it again with write_store"
_HEX = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("dtype", "sites", "shards", "n_rows", "n_batches", "complete")
SHARD_GLOB = "shard-*.safetensors"


def rank_shard_name(rank: int, index: int) -> str:
    """Shard ``index`` of rank ``rank`` of a store written under torchrun (:mod:`mechscope.core.store_ranks`)."""
    return f"shard-r{rank:05d}-{index:05d}.safetensors"


def rank_manifest_name(rank: int) -> str:
    """The progress manifest of rank ``rank`` while a store is written under torchrun."""
    return f"manifest-r{rank:05d}.json"


def rank_shard_glob(rank: int | None = None) -> str:
    """The shard files of one rank (every rank's when None)."""
    return f"shard-r{'*' if rank is None else f'{rank:05d}'}-*.safetensors"


def rank_files(out_dir: Path) -> list[Path]:
    """Every rank's shards and progress manifests in ``out_dir`` (torchrun's files)."""
    return sorted([*out_dir.glob(rank_shard_glob()), *out_dir.glob("manifest-r*.json")])


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupted manifest, {problem}. {RECREATE}")


def _check_sites(path: Path, sites: Any) -> list[str]:
    """Check the site entries; returns their keys."""
    if not isinstance(sites, list) or not sites:
        raise _bad(path, f"'sites' must be a non-empty list, got {type(sites).__name__}")
    for i, entry in enumerate(sites):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not isinstance(entry.get("site"), dict):
            raise _bad(path, f"site entry {i} must be an object with a string 'key' and a 'site' object")
        try:
            Site.from_dict(entry["site"])
        except SiteError as e:
            raise _bad(path, f"site entry {i} ({entry['key']}) is not a valid site ({e})") from None
        d, shape = entry.get("d"), entry.get("row_shape")
        if d is not None and not _count(d):
            raise _bad(path, f"site entry {i} ({entry['key']}) has width d={d!r}, not a count")
        if (shape is None) != (d is None) or (shape is not None and not (
                isinstance(shape, list) and shape and all(_count(n) for n in shape) and math.prod(shape) == d)):
            raise _bad(path, f"site entry {i} ({entry['key']}) has row_shape={shape!r}, which does not give width d={d!r}")
    keys = [e["key"] for e in sites]
    if len(set(keys)) != len(keys):
        raise _bad(path, "two site entries have the same key")
    return keys


def _check_shard(path: Path, i: int, shard: Any, start: int, keys: list[str]) -> int:
    """Check shard ``i``, which must cover input batches from ``start``; returns where it stops."""
    if not isinstance(shard, dict):
        raise _bad(path, f"shard {i} must be an object, got {type(shard).__name__}")
    try:
        confined(path.parent, shard.get("file"), f"{path}: shard {i}")
    except PathError as e:
        raise CheckpointError(str(e)) from None
    if not _count(shard.get("rows")):
        raise _bad(path, f"shard {i} ({shard['file']}) has rows={shard.get('rows')!r}, not a count")
    sums = shard.get("sha256")
    if not isinstance(sums, dict) or sorted(sums) != sorted(keys) or \
            not all(isinstance(v, str) and _HEX.fullmatch(v) for v in sums.values()):
        raise _bad(path, f"shard {i} ({shard['file']}) needs a 'sha256' object with one SHA-256 (64 hex digits) "
                         "per site key")
    batches = shard.get("batches")
    if not (isinstance(batches, list) and len(batches) == 2 and all(_count(b) for b in batches)):
        raise _bad(path, f"shard {i} ({shard['file']}) has batches={batches!r}, expected [first, stop)")
    if batches[0] != start or batches[1] <= start:
        raise _bad(path, f"shard {i} ({shard['file']}) covers input batches {batches}, but the shards before it "
                         f"end at batch {start}: the batch ranges must follow each other with no gap "
                         "(a shard is missing or was edited)")
    return batches[1]


def check_manifest(path: Path, m: Any, shard_glob: str = SHARD_GLOB) -> dict[str, Any]:
    """Every field of a parsed manifest, checked; returns it. ``shard_glob``: the shard files a
    complete manifest must list (one rank's own, for a rank's progress manifest)."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an activation-store manifest (no format {FORMAT!r}). {RECREATE}")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: store schema version {m.get('schema_version')!r}, this mechscope reads "
                              f"{SCHEMA_VERSION}. Upgrade mechscope, or write the store again")
    missing = [k for k in _FIELDS if k not in m]
    if missing:
        raise _bad(path, f"missing field(s) {missing}")
    if not isinstance(m["shards"], list):
        raise _bad(path, f"'shards' must be a list, got {type(m['shards']).__name__}")
    for field in ("n_rows", "n_batches"):
        if not _count(m[field]):
            raise _bad(path, f"{field}={m[field]!r}, not a count")
    if not isinstance(m["complete"], bool):
        raise _bad(path, f"'complete' must be true or false, got {m['complete']!r}")
    if not isinstance(m["dtype"], str) or not isinstance(getattr(torch, m["dtype"], None), torch.dtype):
        raise _bad(path, f"dtype={m['dtype']!r} is not a torch dtype")
    keys = _check_sites(path, m["sites"])
    stop = 0
    for i, shard in enumerate(m["shards"]):
        stop = _check_shard(path, i, shard, stop, keys)
    if stop != m["n_batches"]:
        raise _bad(path, f"the shards cover input batches [0, {stop}) but n_batches says {m['n_batches']} "
                         "(a shard is missing or was edited)")
    rows = sum(s["rows"] for s in m["shards"])
    if rows != m["n_rows"]:
        raise _bad(path, f"shard rows add up to {rows} but n_rows says {m['n_rows']}")
    files = [s["file"] for s in m["shards"]]
    if len(set(files)) != len(files):
        raise _bad(path, f"two shards name the same file ({sorted(f for f in files if files.count(f) > 1)[0]})")
    if m["complete"]:  # a finished writer leaves no shard it did not record
        extra = sorted(p.name for p in path.parent.glob(shard_glob) if p.name not in set(files))
        if extra:
            raise _bad(path, f"shard file(s) {extra[:3]} are in the store's directory but not in the manifest "
                             "(a shard was dropped from it)")
    return m


def read_manifest(out_dir: Path, allow_incomplete: bool) -> dict[str, Any]:
    """The checked manifest of the store in ``out_dir`` (an incomplete one only when allowed)."""
    path = out_dir / MANIFEST
    if not path.exists():
        raise MissingCheckpointError(f"{path}: missing: there is no activation store in {out_dir}. "
                                     "Check the path, or write one with write_store")
    m = check_manifest(path, load_json(path, "activation-store manifest",
                                       RECREATE + " (or resume it with write_store(..., resume=True))"))
    if not m["complete"] and not allow_incomplete:
        raise CheckpointError(
            f"{path}: the store is incomplete ({len(m['shards'])} shard(s), {m['n_batches']} input batches, "
            "written by an interrupted write_store). Finish it with write_store(..., resume=True) on the "
            "same dataset, or open it with allow_incomplete=True to read what is there"
        )
    return m
