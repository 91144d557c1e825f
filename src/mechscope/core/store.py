"""An activation store on disk: sites of a model streamed over a dataset into shards.

SAEs, transcoders and probes train on far more activations than fit in memory. A store
is written once (``write_store``: one forward per input batch for every site, stopped
after the deepest site) and read many times (``Store.batches``: shuffled minibatches
from a bounded, memory-mapped buffer of shards).

On disk, ``out_dir`` holds::

    shard-00000.safetensors   one tensor [rows, d] per site, named by site_key(site),
    shard-00001.safetensors   written by checkpoint.save_tensors (checksummed, atomic)
    ...
    manifest.json             {"format": "mechscope.store", "schema_version": 1,
                               "dtype": "float32", "drop_padding": true, "shard_rows": N,
                               "sites": [{"key", "site": Site.to_dict(), "d", "row_shape"}],
                               "shards": [{"file", "rows", "batches": [first, stop),
                                           "sha256": {key: hex}}],
                               "n_rows", "n_batches", "complete",
                               "meta": {...} (optional: what the dataset was, see write_store)}
    .mechscope.lock           while a write_store runs (mechscope.core.lock): a second
                              writer of the same directory fails at once

Rows of every site are aligned: row ``i`` of each site comes from the same token. A
shard holds whole input batches, so the manifest (rewritten atomically after each shard)
always says exactly which input batches are done; an interrupted ``write_store`` resumes
by skipping them. Rows are ``[n, d]``: a ``[batch, pos, ...]`` view loses its padding
positions (by the batch's attention mask) and trailing dims are flattened (``row_shape``
keeps them, e.g. ``[n_heads, d_head]``). Reading checks the manifest first
(:mod:`mechscope.core.store_manifest`): shard files inside the directory, batch ranges
without gaps.

Under ``torchrun`` the ranks write one store together (:mod:`mechscope.core.store_ranks`):
rank-named shards (``shard-r00001-00000.safetensors``), one merged manifest that every reader
here reads as it reads this one, and ``meta["world_size"]``, which an interrupted store's
resume must match (a complete store is reused by any world size).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.checkpoint import (
    CheckpointError,
    load_tensors,
    save_json_atomic,
    save_tensors,
    verify_tensor,
)
from mechscope.core.collect import site_rows
from mechscope.core.lock import lock_dir
from mechscope.core.paths import confined
from mechscope.core.run import cache
from mechscope.core.site import Site, SiteError
from mechscope.core.store_manifest import FORMAT, MANIFEST, SCHEMA_VERSION, rank_files, read_manifest
from mechscope.core.store_manifest import RECREATE as _RECREATE

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")

SiteRef = Site | str | int


def site_key(site: Site) -> str:
    """Stable tensor name of a site in the shards: readable path + hash of its full spec."""
    spec = {k: v for k, v in site.to_dict().items() if k != "name"}  # the label is not identity
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{site.path or 'model'}.{site.io}.{digest}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def row_shape(view: Tensor, site: Site) -> list[int]:
    """Shape of one row before flattening: ``[d]``, or ``[n_heads, d_head]`` for a head site."""
    return list(view.shape[-2:] if site.heads is not None else view.shape[-1:])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- writing ---------------------------------------------------------------------------
def _new_manifest(sites: Sequence[Site], dtype: torch.dtype, drop_padding: bool, shard_rows: int,
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "dtype": _dtype_name(dtype),
        "drop_padding": drop_padding,
        "shard_rows": shard_rows,
        "sites": [{"key": site_key(s), "site": s.to_dict(), "d": None, "row_shape": None} for s in sites],
        "shards": [],
        "n_rows": 0,
        "n_batches": 0,
        "complete": False,
    }
    if meta is not None:  # what the dataset was (a corpus, a model record): resume needs the same
        manifest["meta"] = json.loads(json.dumps(meta))
    return manifest


def _resume_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between an existing store and the one asked for (empty: resumable)."""
    out = []
    old_keys = [e.get("key") for e in old.get("sites", [])]
    new_keys = [e["key"] for e in new["sites"]]
    if old_keys != new_keys:
        show = lambda m: [str(Site.from_dict(e["site"])) for e in m["sites"]]  # noqa: E731
        out.append(f"sites: store has {show(old)}, asked for {show(new)}")
    for field in ("dtype", "drop_padding"):
        if old.get(field) != new[field]:
            out.append(f"{field}: store has {old.get(field)!r}, asked for {new[field]!r}")
    old_meta, new_meta = old.get("meta") or {}, new.get("meta") or {}
    was, now = old_meta.get("world_size", 1), new_meta.get("world_size", 1)
    if was != now and not old.get("complete"):  # a complete store holds the same rows for any world size
        how = "without torchrun" if was == 1 else f"under torchrun --nproc-per-node {was}"
        out.append(f"world size: store has {was} process(es), asked for {now}; an interrupted store resumes only "
                   f"with the same number ({how})")
    for field in sorted(set(old_meta) | set(new_meta), key=lambda k: (k not in new_meta, k)):
        was, now = old_meta.get(field), new_meta.get(field)
        if was == now or field == "world_size":
            continue
        if isinstance(was, dict) and isinstance(now, dict):  # name the part that differs: model.torch
            out += [f"{field}.{k}: store has {_short(was.get(k))}, asked for {_short(now.get(k))}"
                    for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        else:
            out.append(f"{field}: store has {_short(was)}, asked for {_short(now)}")
    return out


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def _clean_leftovers(out_dir: Path, n_shards: int) -> None:
    """Remove temp files of a hard-killed write and shards the manifest never recorded."""
    for p in out_dir.glob(".shard-*.tmp"):
        p.unlink(missing_ok=True)
    for p in out_dir.glob(f".{MANIFEST}.*.tmp"):
        p.unlink(missing_ok=True)
    for p in out_dir.glob("shard-*.safetensors"):
        m = _SHARD_RE.match(p.name)
        if m and int(m.group(1)) >= n_shards:
            p.unlink()


def _start(out_dir: Path, fresh: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The manifest to continue from: the existing one (checked) or a fresh one."""
    old = existing_manifest(out_dir, fresh, resume)
    if old is None:
        if out_dir.exists():
            _clean_leftovers(out_dir, 0)
            for p in rank_files(out_dir):  # of a torchrun store whose manifest.json was deleted
                p.unlink()
        return fresh
    old["shard_rows"] = fresh["shard_rows"]
    _clean_leftovers(out_dir, len(old["shards"]))
    return old


def existing_manifest(out_dir: Path, fresh: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The store already in ``out_dir`` (checked: it can be resumed or reused as ``fresh``
    asks), or None when there is none; changes nothing on disk."""
    if not (out_dir / MANIFEST).exists():
        return None
    if not resume:
        raise ValueError(
            f"{out_dir} already holds an activation store; pass resume=True to continue or reuse "
            "it, or delete the directory (or choose another out_dir) to write a new one"
        )
    old = read_manifest(out_dir, allow_incomplete=True)
    conflicts = _resume_conflicts(old, fresh)
    if conflicts:
        raise ValueError(
            f"cannot resume the store in {out_dir}: it was written with different settings ("
            + "; ".join(conflicts) + "); write to another out_dir, or delete this one to start over"
        )
    return old


class _ShardWriter:
    """Buffers rows of whole input batches and writes them as shards, then the manifest."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], dtype: torch.dtype, manifest_file: str = MANIFEST,
                 name: Callable[[int], str] = shard_name, header: dict[str, Any] | None = None) -> None:
        self.out_dir, self.manifest, self.dtype = out_dir, manifest, dtype
        self.manifest_file, self.name, self.header = manifest_file, name, header or {}  # a rank's own files
        self.keys = [e["key"] for e in manifest["sites"]]
        self.buffers: dict[str, list[Tensor]] = {k: [] for k in self.keys}
        self.rows = 0
        self.first_batch = manifest["n_batches"]
        self.next_batch = manifest["n_batches"]

    def add(self, views: dict[str, Tensor], row_shapes: dict[str, list[int]], batch_index: int) -> None:
        counts = {k: v.shape[0] for k, v in views.items()}
        if len(set(counts.values())) > 1:
            raise SiteError(
                f"input batch {batch_index}: the sites give different numbers of rows {counts}, so their "
                "rows cannot be aligned; write sites with different positions to separate stores"
            )
        for entry in self.manifest["sites"]:
            key, shape = entry["key"], row_shapes[entry["key"]]
            if entry["row_shape"] is None:
                entry["row_shape"], entry["d"] = shape, math.prod(shape)
            elif entry["row_shape"] != shape:
                raise SiteError(
                    f"input batch {batch_index}: site {Site.from_dict(entry['site'])} gives rows of shape "
                    f"{shape}, but the store holds {entry['row_shape']}; did the model change since the store was started?"
                )
            self.buffers[key].append(views[key].detach().to("cpu", self.dtype))
        self.rows += next(iter(counts.values()))
        self.next_batch = batch_index + 1

    def flush(self, complete: bool = False) -> None:
        """Write the buffered batches as the next shard (if any), then the manifest."""
        m = self.manifest
        if self.next_batch > self.first_batch:
            name = self.name(len(m["shards"]))
            tensors = {k: torch.cat(parts) for k, parts in self.buffers.items()}  # key -> [rows, d]
            covered = [self.first_batch, self.next_batch]
            header = {"store_shard": len(m["shards"]), **self.header, "batches": covered}
            sums = save_tensors(self.out_dir / name, tensors, header)
            m["shards"].append({"file": name, "rows": self.rows, "batches": covered, "sha256": sums})
            m["n_rows"] += self.rows
            m["n_batches"] = self.next_batch
            self.buffers = {k: [] for k in self.keys}
            self.rows, self.first_batch = 0, self.next_batch
        m["complete"] = complete
        save_json_atomic(self.out_dir / self.manifest_file, m)


def write_store(
    model: nn.Module,
    sites: Site | Sequence[Site],
    batches: Iterable[Any],
    out_dir: str | Path,
    *,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float32,
    drop_padding: bool = True,
    resume: bool = True,
    progress: Callable[[int, int], None] | None = None,
    meta: dict[str, Any] | None = None,
    row_mask: Callable[[Any], Tensor] | None = None,
) -> "Store":
    """Stream ``sites`` of ``model`` over ``batches`` into a sharded store in ``out_dir``.

    ``batches`` yields model inputs (dicts from ``collate``, tensors, or tuples of
    positional args). A shard is written once it holds at least ``shard_rows`` rows (it
    always holds whole input batches). With ``resume`` an interrupted store is continued:
    the input batches its manifest covers are skipped (not run), so the dataset must
    yield the same batches in the same order; a complete store is returned as is.
    ``progress(batches_done, rows_done)`` is called after every input batch.

    ``meta`` (JSON) is recorded in the manifest (``Store.meta``) and must be equal to
    resume: describe there what determines the dataset (a corpus, its windows, the model).
    ``row_mask(inputs)`` gives ``[batch, pos]`` bool of the positions to store, in place
    of the attention mask (e.g. :func:`mechscope.core.text.analysis_mask`, which leaves
    out BOS); the model still runs on the batch as given.
    """
    sites = check_sites(sites, shard_rows)
    out_dir = Path(out_dir)
    with lock_dir(out_dir, "activation store"):
        manifest = _start(out_dir, _new_manifest(sites, dtype, drop_padding, shard_rows, meta), resume)
        if not manifest["complete"]:
            _write(model, sites, batches, out_dir, manifest, dtype, drop_padding, progress, row_mask)
    return Store(out_dir)


def check_sites(sites: Site | Sequence[Site], shard_rows: int) -> list[Site]:
    """The sites of a store as a list, checked (with ``shard_rows``)."""
    sites = [sites] if isinstance(sites, Site) else list(sites)
    if not sites or not all(isinstance(s, Site) for s in sites):
        raise TypeError(f"write_store needs one or more Site values, got {sites!r}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"write_store got the same site twice: {[str(s) for s in sites]}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
    return sites


def _write(model: nn.Module, sites: list[Site], batches: Iterable[Any], out_dir: Path, manifest: dict[str, Any],
           dtype: torch.dtype, drop_padding: bool, progress: Callable[[int, int], None] | None,
           row_mask: Callable[[Any], Tensor] | None = None, writer: _ShardWriter | None = None) -> None:
    """The loop of :func:`write_store`: run the batches not yet covered, shard by shard.
    ``writer`` (one rank's, under torchrun) may see no batch: its slice can be empty."""
    shard_rows, one_rank = manifest["shard_rows"], writer is not None
    writer = writer or _ShardWriter(out_dir, manifest, dtype)
    keys = dict(zip(sites, writer.keys))
    done, seen = manifest["n_batches"], 0
    with torch.no_grad():
        for index, inputs in enumerate(batches):
            seen = index + 1
            if index < done:
                continue
            acts = cache(model, inputs, sites)
            kept = inputs if row_mask is None else {"attention_mask": row_mask(inputs)}  # positions to store
            rows = site_rows(acts, kept, sites, drop_padding or row_mask is not None)
            views = {keys[s]: r for s, r in rows.items()}
            shapes = {keys[s]: row_shape(acts[s], s) for s in sites}
            writer.add(views, shapes, index)
            if writer.rows >= shard_rows:
                writer.flush()
            if progress is not None:
                progress(seen, manifest["n_rows"] + writer.rows)
    if seen == 0 and not one_rank:
        raise ValueError(f"the dataset produced no batches, so there is nothing to write to {out_dir}; "
                         "check that the batch iterable is not empty or already exhausted")
    if seen < done:
        raise ValueError(
            f"the dataset produced {seen} batches, but the store in {out_dir} already covers {done}; "
            "resume needs the same deterministic dataset (delete the directory to start over)"
        )
    writer.flush(complete=True)


# -- reading ---------------------------------------------------------------------------
class Store:
    """A written activation store: its sites, sizes and shuffled minibatches.

    Reading never loads the whole store: ``batches`` holds a few shards at a time
    (memory-mapped reads of only the sites asked for), and every shard read is checked
    against the manifest (row count, width, checksum) so damage is an error naming the
    file, never a silent short read.
    """

    def __init__(self, out_dir: str | Path, allow_incomplete: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir, allow_incomplete)
        self._entries = {e["key"]: e for e in self.manifest["sites"]}
        self._sites = [Site.from_dict(e["site"]) for e in self.manifest["sites"]]

    # -- description ---------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return list(self._sites)

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def meta(self) -> dict[str, Any]:
        """What ``write_store`` was told about the dataset (``meta=``; empty when nothing)."""
        meta = self.manifest.get("meta")
        return dict(meta) if isinstance(meta, dict) else {}

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.manifest["shards"]]

    def d(self, site: SiteRef | None = None) -> int:
        """Width of a site's rows."""
        return int(self._entries[self.key(site)]["d"])

    def row_shape(self, site: SiteRef | None = None) -> list[int]:
        """Shape of one row before flattening (``[d]``, or ``[n_heads, d_head]``)."""
        return list(self._entries[self.key(site)]["row_shape"])

    def key(self, site: SiteRef | None = None) -> str:
        """Tensor name of a site, found by Site, key, label, description, unique module path or index."""
        keys = list(self._entries)
        if site is None:
            if len(keys) == 1:
                return keys[0]
            raise ValueError(f"this store holds {len(keys)} sites {[str(s) for s in self._sites]}; say which")
        if isinstance(site, int) and not isinstance(site, bool) and -len(keys) <= site < len(keys):
            return keys[site]
        for key, s in zip(keys, self._sites):
            if site == s or (isinstance(site, str) and site in (key, s.name, s.describe())):
                return key
        by_path = [key for key, s in zip(keys, self._sites) if s.path == site]
        if len(by_path) == 1:  # a module path names the site when only one site is there
            return by_path[0]
        raise KeyError(f"site {site} is not in the store at {self.out_dir}; it holds {[str(s) for s in self._sites]}")

    def __repr__(self) -> str:
        sites = ", ".join(f"{s} (d={self.d(i)})" for i, s in enumerate(self._sites))
        state = "" if self.complete else ", incomplete"
        return f"Store({str(self.out_dir)!r}: {self.n_rows} rows of {sites}, {len(self.manifest['shards'])} shards{state})"

    # -- reading -------------------------------------------------------------------
    def read_shard(self, index: int, keys: Sequence[str], verify: bool = True) -> dict[str, Tensor]:
        """Tensors ``{key: [rows, d]}`` of one shard, checked against the manifest."""
        shard = self.manifest["shards"][index]
        path = confined(self.out_dir, shard["file"], f"{self.out_dir / MANIFEST}: shard {index}")
        tensors, _ = load_tensors(path, verify=False, names=keys, fix=_RECREATE)
        for key, t in tensors.items():
            want = [shard["rows"], self._entries[key]["d"]]
            if list(t.shape) != want or t.dtype != self.dtype:
                raise CheckpointError(
                    f"{path}: holds {list(t.shape[:1])} rows x {list(t.shape[1:])} ({t.dtype}) for site "
                    f"{key}, but the manifest says {want[0]} rows of width {want[1]} ({self.dtype}). {_RECREATE}"
                )
            if verify:
                expected = {"sha256": shard["sha256"].get(key), "dtype": self.manifest["dtype"], "shape": want}
                verify_tensor(path, key, t, expected if expected["sha256"] else None, _RECREATE)
        return tensors

    def to_tensor(self, site: SiteRef | None = None, verify: bool = True) -> Tensor:  # [n_rows, d]
        """Every row of one site in store order, in memory: for small stores."""
        key = self.key(site)
        parts = [self.read_shard(i, [key], verify)[key] for i in range(len(self.manifest["shards"]))]
        return torch.cat(parts) if parts else torch.empty(0, self.d(site), dtype=self.dtype)

    def batches(
        self,
        sites: SiteRef | Sequence[SiteRef] | None = None,
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        verify: bool = True,
        buffer_shards: int = 4,
    ) -> Iterator[Tensor | dict[Site, Tensor]]:
        """One epoch of minibatches: ``[batch_size, d]``, or ``{Site: [batch_size, d]}`` for a list.

        Shards are visited in a seeded random order, ``buffer_shards`` at a time; rows
        are shuffled within that buffer (plus the few left over from the last one), so
        memory stays bounded and every row appears exactly once. Use a new ``seed`` per
        epoch for a new order. The last batch is smaller unless ``drop_last``.
        """
        if batch_size < 1 or buffer_shards < 1:
            raise ValueError(f"batch_size and buffer_shards must be at least 1, got {batch_size} and {buffer_shards}")
        if sites is None:  # every site: a tensor for a one-site store, else a dict
            many, keys = len(self._entries) > 1, list(self._entries)
        else:
            many = isinstance(sites, (list, tuple))
            keys = list(dict.fromkeys(self.key(s) for s in (sites if many else [sites])))
            if not keys:
                raise ValueError("batches() got an empty list of sites")
        by_key = dict(zip(self._entries, self._sites))
        to_site = {k: by_key[k] for k in keys}
        gen = iter(self._minibatches(keys, batch_size, shuffle, seed, drop_last, verify, buffer_shards))
        return ({to_site[k]: b[k] for k in keys} if many else b[keys[0]] for b in gen)

    def _minibatches(self, keys, batch_size, shuffle, seed, drop_last, verify, buffer_shards) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        n_shards = len(self.manifest["shards"])
        order = torch.randperm(n_shards, generator=gen).tolist() if shuffle else list(range(n_shards))
        carry: dict[str, Tensor] = {}  # rows left from the last buffer, fewer than batch_size
        for start in range(0, n_shards, buffer_shards):
            parts = [self.read_shard(i, keys, verify) for i in order[start:start + buffer_shards]]
            buf = {k: torch.cat(([carry[k]] if carry else []) + [p[k] for p in parts]) for k in keys}  # [R, d]
            n = buf[keys[0]].shape[0]
            perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)  # [R]
            full = n - n % batch_size
            for b in range(0, full, batch_size):
                yield {k: v[perm[b:b + batch_size]] for k, v in buf.items()}
            carry = {k: v[perm[full:]] for k, v in buf.items()}  # fresh copies: the buffer is freed
        if carry and carry[keys[0]].shape[0] and not drop_last:
            yield carry

    def verify(self) -> None:
        """Read and check every shard (row counts, widths, checksums); raises on damage."""
        keys = list(self._entries)
        for i in range(len(self.manifest["shards"])):
            self.read_shard(i, keys, verify=True)


def open_store(out_dir: str | Path, allow_incomplete: bool = False) -> Store:
    """Open a store written by :func:`write_store` (an incomplete one only when allowed)."""
    return Store(out_dir, allow_incomplete=allow_incomplete)
