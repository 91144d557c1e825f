"""Where a command's model comes from: the ``--model`` / ``--hf-config`` options that every
command on a model shares, and the one function that turns them into a model.

A command's config subclasses :class:`ModelSource`, so the two options come first in its
``--help`` and are validated the same way everywhere; a command rewords their help for
its own default through ``FIELD_HELP`` (see :func:`mechscope.core.config.field_help`).
:func:`load` is the only place a ``--model`` value is resolved: a new kind of source (a
local directory, a GGUF file, a short name) is one more branch there, and every command
gets it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from mechscope.cli import UsageError
from mechscope.core.config import Config, ConfigError, config, param


@config
class ModelSource(Config):
    """A built-in model by name, or a random Hugging Face causal LM from its config.

    At most one of the two may be given (exactly one where ``model_required`` is set);
    with neither, the command's own default model is used."""

    model_required: ClassVar[bool] = False

    model: Optional[str] = param(None, metavar="NAME_OR_PATH",
                                 help="a built-in model (`mechscope train --list`), a local Hugging Face model "
                                      "directory, a .gguf file, gemma-3-270m (the mechscope[real] extra) or a Hub "
                                      "name already in the local cache")
    hf_config: Optional[str] = param(None, metavar="PATH_OR_JSON", help="a Hugging Face config.json (random weights)")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", help="dtype of a pretrained model")
    device: str = param("cpu", metavar="DEVICE", help="cpu, cuda, cuda:N or auto (accelerate's device map)")
    download: bool = param(False, help="allow downloading a Hub model (never otherwise)")

    def validate(self) -> None:
        if self.model_required and (self.model is None) == (self.hf_config is None):
            raise ConfigError("give exactly one of --model NAME or --hf-config PATH_OR_JSON")
        if self.model is not None and self.hf_config is not None:
            raise ConfigError("give at most one of --model and --hf-config")


def load(source: ModelSource, default: Optional[str] = None, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer or None)`` that ``source`` names, ``default`` (a built-in name)
    when it names none; a Hugging Face config builds a random model seeded by ``seed``. Bad
    names and configs are usage errors (exit 2), and so is a device torch cannot use here."""
    from mechscope.core.load import ModelLoadError, load_model, place

    if source.device != "auto":  # checked before any loading, whatever the model (place() cannot fail after it)
        compute_device(source.device)
    if source.hf_config is not None:
        from mechscope.core.models import hf_model_from_config

        try:
            model = hf_model_from_config(source.hf_config, seed=seed)
        except (ImportError, OSError, ValueError) as e:
            raise hf_config_error(e) from None
        return place(model, source.dtype, source.device), None
    name = source.model or default
    from mechscope.tasks import registry  # the zoo's architectures and the worlds' trained models

    if name in registry.model_names():  # a model built in memory goes where --dtype/--device say, as a loaded one does
        return place(registry.build_model(name), source.dtype, source.device), None
    try:
        return load_model(name, dtype=source.dtype, device=source.device, allow_download=source.download)
    except ModelLoadError as e:
        if Path(name).exists():  # a real path whose contents are wrong: the loader's message says what
            raise UsageError(str(e)) from None
        raise UsageError(f"unknown model {name!r}; valid: a built-in model ({', '.join(registry.model_names())}) "
                         f"or a pretrained one: {e}") from None


def compute_device(device: str) -> str:
    """Where this process puts what a command trains, from ``--device``: ``auto`` is the first
    CUDA device torch sees, else the CPU; under ``torchrun`` a plain ``cuda`` is this rank's own
    GPU (``cuda:LOCAL_RANK``, round-robin when there are more ranks than GPUs), not every rank
    on the first. A device torch cannot use here is a usage error (exit 2)."""
    import os

    import torch

    from mechscope.core.distributed import launched_by_torchrun
    from mechscope.core.load import ModelLoadError, in_memory_device

    try:
        name = in_memory_device(device)
    except ModelLoadError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if name == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0) % torch.cuda.device_count()}"
    return name


def hf_config_error(e: Exception) -> UsageError:
    """A usage error for a config transformers cannot build, in one short line (an unknown
    ``model_type`` is already one line with the closest known ones, from
    :func:`mechscope.core.models.unknown_model_type`; other messages are cut)."""
    text = " ".join(str(e).split())
    if "Unrecognized model identifier" in text:
        return UsageError("cannot build a model from --hf-config: transformers does not know the config's "
                          "model_type; check the spelling (e.g. gpt2, llama, qwen2, gemma3_text), or upgrade "
                          "transformers")
    return UsageError(f"cannot build a model from --hf-config: {text[:500]}{'...' if len(text) > 500 else ''}")


def check_inputs(model: Any, inputs: Any, data: str) -> None:
    """Token ids of ``--data`` checked against the model's vocabulary before any forward."""
    from mechscope.core.jsonl import check_token_ids, vocab_size

    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    check_token_ids(ids, vocab_size(model), f"--data {data}")


def resolve_site(model: Any, spec: str, **fields: Any) -> Any:
    """The site ``spec`` (an alias or a module path) of ``model``; a bad one is a usage error."""
    from mechscope.core.models import resolve
    from mechscope.core.site import SiteError

    try:
        return resolve(model, spec, **fields)
    except (SiteError, ValueError) as e:
        raise UsageError(f"cannot use site {spec!r}: {e}") from None


def has_tokenizer(source: ModelSource, default: Optional[str] = None) -> bool:
    """Whether :func:`load` gives a tokenizer with the model, known before loading it: a
    pretrained model comes with one; a built-in model and a random one from a config do not."""
    if source.hf_config is not None:
        return False
    from mechscope.tasks import registry

    return (source.model or default) not in registry.model_names()


def uses_text(data: str, tokenizer: bool, builtins: tuple[str, ...]) -> bool:
    """Whether ``--data`` is read as text rows (``{"text", "label"}``, tokenised with the model's
    tokenizer): a file whose first row has "text", or has neither field, with a model that has a
    ``tokenizer`` (:func:`has_tokenizer`). Token-id rows (``{"tokens", "label"}``) keep working
    with any model."""
    if data in builtins:
        return False
    from mechscope.core.text import row_kind

    kind = row_kind(data)
    if not tokenizer:
        if kind == "text":
            raise UsageError(f"--data {data} holds text rows, but the model has no tokenizer; give a model "
                             "with one (a Hugging Face directory, a .gguf file, gemma-3-270m) or token-id rows "
                             '{"tokens": [5, 6, 7], "label": 1}')
        return False
    return kind != "tokens"
