"""Atomic, verified files: tensors (safetensors), JSON and module checkpoints.

Long jobs (activation stores, SAE and SPD training) write files that a later job reads,
possibly after a crash. Two rules make that safe:

- **atomic** (:mod:`mechscope.core.atomic`): every file is written to a temporary file in the same directory, flushed
  and fsynced, then ``os.replace``d onto its real name. A crash leaves either the old
  file or the new one under the real name, never half of one; the temporary file is
  removed when the write fails.
- **verified**: a tensor file records, in its safetensors metadata, a SHA-256 of every
  tensor's bytes (with its dtype and shape). Loading re-hashes the bytes it reads anyway,
  so a flipped byte is caught without a second pass over the file, and checking one
  tensor does not need reading the others. The header is parsed before anything else,
  so a truncated or damaged file is reported as such, naming the file and the fix.

On-disk format of a tensor file: a standard safetensors file whose ``__metadata__``
holds two keys: ``"mechscope"``, a JSON string::

    {"format": "mechscope.tensors", "version": 2,
     "tensors": {name: {"sha256": hex, "dtype": "float32", "shape": [..]}},
     "metadata": <the caller's JSON-serialisable metadata>}

and ``"mechscope_sha256"``, the SHA-256 of that string, so that a changed byte in the
record (a training step, a config value) is caught like one in a tensor. Version 1 files
(the record without its checksum) are still read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mechscope.core.atomic import (  # noqa: F401 - atomic_open, stale_temp_files: re-exported
    PathLike, atomic_open, atomic_path, atomic_write, stale_temp_files)

FORMAT = "mechscope.tensors"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no checksum of the record itself
_META_KEY = "mechscope"
_META_SUM = "mechscope_sha256"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header (bytes)


class CheckpointError(ValueError):
    """A file that cannot be read as written: missing, truncated, corrupted or mismatched.

    Made by :func:`checkpoint_error`, it also carries the file (``path``) and what is
    wrong with it (``problem``), so that a caller can give other advice.
    """

    path: Path | None = None
    problem: str = ""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The file does not exist (also a ``FileNotFoundError``)."""


def checkpoint_error(path: PathLike, problem: str, fix: str | None = None, cls: type = CheckpointError) -> CheckpointError:
    """An error whose message names the file, says what is wrong and how to fix it (``fix``;
    None: delete the file and re-run the step that wrote it).

    A file shipped with mechscope (``zoo/checkpoints``) is never to be deleted: the
    default advice becomes "rebuild it with ``mechscope train`` or reinstall".
    """
    fix = _REWRITE if fix is None else fix
    if fix in (_REWRITE, _MISSING) and shipped_file(path):
        fix = _SHIPPED
    err = cls(f"{path}: {problem}. {fix}")
    err.path, err.problem = Path(path), problem
    return err


_REWRITE = "Delete the file and re-run the step that wrote it (a resumable job re-creates it on resume)"
_MISSING = "Check the path, or re-run the step that writes it"
_SHIPPED = ("It ships with mechscope: rebuild it with `mechscope train NAME` (`mechscope train --list` names "
            "them), or reinstall mechscope to restore the original")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"


def shipped_file(path: PathLike) -> bool:
    """Whether ``path`` is one of the checkpoints shipped in the package (``zoo/checkpoints``)."""
    try:
        return SHIPPED_DIR in Path(path).resolve().parents
    except (OSError, RuntimeError):
        return False


# -- JSON -----------------------------------------------------------------------------
def save_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (it must be JSON-serialisable)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))


def load_json(path: PathLike, what: str = "JSON file", fix: str = _REWRITE) -> Any:
    """Read a JSON file; a missing, empty, truncated or non-JSON file is a CheckpointError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise checkpoint_error(path, f"missing: the {what} does not exist", _MISSING if fix is _REWRITE else fix,
                               MissingCheckpointError) from None
    except OSError as e:
        raise checkpoint_error(path, f"cannot read the {what} ({e.strerror})", fix) from None
    if not raw.strip():
        raise checkpoint_error(path, f"empty: the {what} has {len(raw)} bytes and no JSON", fix)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise checkpoint_error(
            path, f"corrupted or truncated: the {what} ({len(raw)} bytes) is not valid JSON ({e})", fix
        ) from None


# -- checksums ------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (row-major, native byte order) -- not of its values' text."""
    flat = t.detach().cpu().contiguous().reshape(-1)  # [numel]
    if flat.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


def _standalone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that each own their storage (safetensors refuses shared memory)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"save_tensors needs a dict of str -> Tensor, got {type(name).__name__} -> {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        whole = t.data_ptr() == storage.data_ptr() and t.numel() * t.element_size() == storage.nbytes()
        if key in seen or not whole:
            t = t.clone()
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        if t.numel():
            seen.add(key)
        out[name] = t
    return out


# -- tensor files ---------------------------------------------------------------------
def save_tensors(path: PathLike, tensors: Mapping[str, Tensor], metadata: Any = None) -> dict[str, str]:
    """Write ``tensors`` to a safetensors file atomically, with checksums; returns them.

    ``metadata`` is any JSON-serialisable value (stored as one JSON string, since
    safetensors metadata is str -> str). The returned ``{name: sha256}`` lets a caller
    (an activation store's manifest) record the checksums without reading the file back.
    """
    tensors = _standalone(tensors)
    sums = {name: tensor_sha256(t) for name, t in tensors.items()}
    record = {
        "format": FORMAT,
        "version": VERSION,
        "tensors": {n: {"sha256": sums[n], "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for n, t in tensors.items()},
        "metadata": metadata,
    }
    text = json.dumps(record, sort_keys=True, allow_nan=False)
    header_meta = {_META_KEY: text, _META_SUM: hashlib.sha256(text.encode("utf-8")).hexdigest()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header_meta)
    return sums


def read_header(path: PathLike, fix: str = _REWRITE) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Parse and check a safetensors header without reading the data.

    Returns ``(tensor_info, record)``: ``{name: {"dtype", "shape", "data_offsets"}}`` and
    the mechscope record (None for a file mechscope did not write). Raises a
    CheckpointError for a missing, truncated or corrupted file; ``fix`` is the advice it gives.
    """
    path = Path(path)

    def bad(problem: str) -> CheckpointError:
        return checkpoint_error(path, problem, fix)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"truncated: the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise bad(f"corrupted header: it claims {n} bytes of header, more than any safetensors file has")
            if 8 + n > size:
                raise bad(f"truncated: the header says it is {n} bytes, the file has {size - 8} after the length")
            raw = f.read(n)
    except FileNotFoundError:
        advice = _MISSING if fix is _REWRITE else fix
        raise checkpoint_error(path, "missing: the file does not exist", advice, MissingCheckpointError) from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"corrupted header: not valid safetensors JSON ({e})") from None
    meta = header.pop("__metadata__", None)
    info = _check_layout(path, header, size - 8 - n, fix)
    if not isinstance(meta, dict) or _META_KEY not in meta:
        return info, None
    return info, _check_record(path, meta, info, fix)


def _check_record(path: Path, meta: dict, info: dict[str, dict[str, Any]], fix: str) -> dict[str, Any]:
    """The mechscope record of a header, checked against its own checksum and the tensors it describes."""
    def bad(problem: str) -> CheckpointError:
        return checkpoint_error(path, f"corrupted header: the mechscope record {problem}", fix)

    text = meta[_META_KEY]
    try:
        record = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") not in READABLE_VERSIONS:
        version = record.get("version") if isinstance(record, dict) else None
        raise bad(f"is not a {FORMAT} record of version {' or '.join(map(str, READABLE_VERSIONS))} (version {version!r}); "
                  "a newer mechscope may have written it")
    if record["version"] >= 2 and meta.get(_META_SUM) != hashlib.sha256(text.encode("utf-8")).hexdigest():
        raise bad("does not match its SHA-256 (a changed byte in the metadata)")
    entries = record.get("tensors")
    ok = isinstance(entries, dict) and sorted(entries) == sorted(info) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("dtype"), str)
        and isinstance(e.get("shape"), list) for e in entries.values())
    if not ok:
        raise bad(f"does not describe the file's tensors {sorted(info)[:10]} with sha256, dtype and shape")
    return record


def _check_layout(path: Path, header: dict, data_bytes: int, fix: str) -> dict[str, dict[str, Any]]:
    """Each entry is well formed and the data section is exactly as long as the header says."""
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
                raise ValueError
            list(entry["shape"]), str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            problem = f"corrupted header: the entry for tensor {name!r} is malformed ({entry!r})"
            raise checkpoint_error(path, problem, fix) from None
        end = max(end, stop)
    if data_bytes < end:
        raise checkpoint_error(path, f"truncated: header says {end} bytes of data, file has {data_bytes}", fix)
    if data_bytes > end:
        problem = f"corrupted: header says {end} bytes of data, file has {data_bytes} (extra bytes at the end)"
        raise checkpoint_error(path, problem, fix)
    return header


def load_tensors(
    path: PathLike, verify: bool = True, names: Iterable[str] | None = None, fix: str = _REWRITE
) -> tuple[dict[str, Tensor], Any]:
    """Read tensors written by :func:`save_tensors`; returns ``(tensors, metadata)``.

    ``names`` reads only those tensors (memory-mapped: the others are never read). With
    ``verify`` every tensor read is re-hashed against its recorded SHA-256, dtype and
    shape. A missing, truncated or corrupted file, or one without mechscope checksums
    when ``verify`` is on, is a :class:`CheckpointError` naming the file (``fix`` is the
    advice it gives, e.g. a store's "write the store again").
    """
    path = Path(path)
    info, record = read_header(path, fix)
    if record is None or record.get("format") != FORMAT:
        if verify:
            raise checkpoint_error(path, "has no mechscope checksums (not written by mechscope.save_tensors)",
                                   "Pass verify=False to read it unchecked")
        record = {"tensors": {}, "metadata": None}
    wanted = list(info) if names is None else list(names)
    unknown = [n for n in wanted if n not in info]
    if unknown:
        raise CheckpointError(f"{path}: no tensor(s) {unknown[:5]}; the file holds {sorted(info)[:10]}")
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in wanted:
                tensors[name] = f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise checkpoint_error(path, f"corrupted: safetensors cannot read it ({e})", fix) from None
    if verify:
        for name, t in tensors.items():
            verify_tensor(path, name, t, record["tensors"].get(name), fix)
    return tensors, record.get("metadata")


def verify_tensor(path: PathLike, name: str, t: Tensor, expected: Mapping[str, Any] | None, fix: str = _REWRITE) -> None:
    """Check a tensor read from ``path`` against ``{"sha256", "dtype", "shape"}`` as written."""
    if expected is None:
        raise checkpoint_error(path, f"corrupted header: tensor {name!r} has no recorded checksum", fix)
    if _dtype_name(t.dtype) != expected["dtype"] or list(t.shape) != expected["shape"]:
        raise checkpoint_error(
            path, f"corrupted header: tensor {name!r} reads as {_dtype_name(t.dtype)}{list(t.shape)}, "
            f"but was written as {expected['dtype']}{expected['shape']}", fix)
    got = tensor_sha256(t)
    if got != expected["sha256"]:
        raise checkpoint_error(
            path, f"corrupted data: tensor {name!r} has SHA-256 {got[:12]}..., written as {expected['sha256'][:12]}... "
            "(a changed byte on disk)", fix)


# -- module checkpoints ---------------------------------------------------------------
def module_fingerprint(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, shapes and dtypes: the architecture, not the weights."""
    spec = [[n, list(t.shape), _dtype_name(t.dtype)] for n, t in sorted(state.items())]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _plain_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or have .to_dict(), got {type(config).__name__}")
    return json.loads(json.dumps(dict(config)))  # JSON-normalised (tuples -> lists)


def save_module(path: PathLike, module: nn.Module, config: Any = None) -> None:
    """Save ``module.state_dict()`` with its config and architecture fingerprint, atomically."""
    state = module.state_dict()
    meta = {
        "kind": "module",
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": _plain_config(config),
        "fingerprint": module_fingerprint(state),
    }
    save_tensors(path, state, meta)


def load_module_state(
    path: PathLike, module: nn.Module, expect_config: Any = None, verify: bool = True
) -> dict[str, Any]:
    """Load a :func:`save_module` checkpoint into ``module``; returns its metadata.

    Refuses, before touching the module, a checkpoint whose tensor names or shapes differ
    from the module's (naming the first mismatches) or, when ``expect_config`` is given,
    whose recorded config differs from it (naming the differing keys).
    """
    path = Path(path)
    tensors, meta = load_tensors(path, verify=verify)
    if not isinstance(meta, dict) or meta.get("kind") != "module":
        raise checkpoint_error(path, "is a tensor file, not a module checkpoint",
                               "Load it with load_tensors, or write it with save_module")
    if not isinstance(meta.get("config"), dict):
        raise checkpoint_error(path, f"corrupted metadata: its config is {type(meta.get('config')).__name__}, "
                               "not an object", _REWRITE)
    problems = state_mismatches(module.state_dict(), tensors)
    if problems:
        raise checkpoint_error(
            path, f"does not fit {type(module).__name__} (saved from {meta.get('module_class')}): " + "; ".join(problems),
            "Build the module with the config the checkpoint was saved with, or retrain")
    if expect_config is not None:
        diffs = config_differences(meta.get("config", {}), _plain_config(expect_config))
        if diffs:
            raise checkpoint_error(path, "was saved with a different config: " + "; ".join(diffs),
                                   "Load it with the config it was saved with, or retrain with the new one")
    module.load_state_dict(tensors, strict=True)
    return meta


def state_mismatches(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], limit: int = 5) -> list[str]:
    """Human-readable differences in names and shapes between two state dicts (first ``limit`` of each kind)."""
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    shapes = [f"{n}: checkpoint {list(found[n].shape)}, module {list(t.shape)}"
              for n, t in expected.items() if n in found and found[n].shape != t.shape]
    out = []
    if missing:
        out.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:limit]}")
    if extra:
        out.append(f"{len(extra)} unexpected tensor(s) in the checkpoint, e.g. {extra[:limit]}")
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es): " + ", ".join(shapes[:limit]))
    return out


def config_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``key: saved X, expected Y`` for every key whose value differs (absent keys included)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key, missing), expected.get(key, missing)
        if a != b:
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: saved {show(a)}, expected {show(b)}")
    return out
