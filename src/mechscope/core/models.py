"""Models: structure detection, named sites, and building Hugging Face models from configs.

This is the one import for working with a model's layout::

    from mechscope.core.models import structure, resolve, resid_post, head_out

    s = structure(model)                 # block list, attention/MLP paths, sizes
    site = resid_post(model, 3)          # Site("transformer.h.3", name="resid_post.3")
    site = resolve(model, "head_out.3.2", positions="last")

Detection lives in :mod:`mechscope.core.structure` (and the probe forward in
:mod:`mechscope.core.trace`, what blocks write in :mod:`mechscope.core.writes`), aliases in :mod:`mechscope.core.aliases`. transformers is
optional: it is imported only by :func:`hf_model_from_config`, never at import time.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mechscope.core.aliases import (
    ALIASES,
    LAYER_ALIASES,
    attn_out,
    embed,
    head_out,
    list_sites,
    mlp_hidden,
    mlp_out,
    resid_post,
    resid_pre,
    resolve,
    unembed,
)
from mechscope.core.hub import check_config_attention, hub_offline
from mechscope.core.structure import BlockPaths, ModelStructure, StructureError, structure


def require_transformers() -> Any:
    """The transformers module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "this needs the optional dependency transformers, which is not installed; "
            "install it with `pip install 'mechscope[hf]'` (or `pip install transformers`)"
        ) from None
    return transformers


def hf_config_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face config as a dict, from a mapping, a ``config.json`` path or JSON text."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        text = str(source)
        path = Path(text)
        if not text.lstrip().startswith("{"):
            if not path.is_file():
                raise FileNotFoundError(f"no Hugging Face config file at {text!r}; give a config.json path or the JSON text itself")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the Hugging Face config is not valid JSON ({e}); expected a config.json object") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(
            "a Hugging Face config needs a string field 'model_type' (e.g. \"gpt2\", \"llama\"), "
            f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    return data


def hf_model_from_config(source: str | Path | Mapping[str, Any], seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM built from a Hugging Face config, with no download.

    The global RNG is left as it was; the weights depend only on ``seed``. The model is
    returned in eval mode.
    """
    transformers = require_transformers()
    data = hf_config_dict(source)
    check_config_attention(data, "the Hugging Face config")
    model_type = data.pop("model_type")
    with hub_offline():  # building from a config never needs the Hub
        try:
            config = transformers.AutoConfig.for_model(model_type, **data)
        except ValueError as e:
            raise ValueError(unknown_model_type(transformers, model_type, e)) from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def unknown_model_type(transformers: Any, model_type: str, error: Exception) -> str:
    """One line for a ``model_type`` transformers cannot build, with the closest known ones
    (transformers' own message lists every model type it knows: 10 KB)."""
    known = list(getattr(getattr(transformers, "CONFIG_MAPPING", None), "keys", lambda: [])())
    if model_type in known:  # known type, other problem: transformers' message, first line
        return f"transformers {transformers.__version__} cannot build model_type {model_type!r}: " \
               f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
    close = difflib.get_close_matches(model_type, known, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "e.g. gpt2, llama, qwen2, gemma3_text"
    return (f"transformers {transformers.__version__} does not know model_type {model_type!r} ({hint}); "
            "check the spelling, or upgrade transformers")


__all__ = [
    "ALIASES", "LAYER_ALIASES", "BlockPaths", "ModelStructure", "StructureError", "structure",
    "embed", "unembed", "resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden", "head_out",
    "resolve", "list_sites", "require_transformers", "hf_config_dict", "hf_model_from_config",
]
